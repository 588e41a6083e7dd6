"""The score store: scores kept in the session cache, so an interrupted run resumes without scoring again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llavaq.files import TUNING_DIR, atomic_write_bytes
from llavaq.tuning.tables import SCORE_VERSION


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ScoreStore:
    """Scores kept in a session cache directory (``<session>/tuning``), one atomic JSON file per key."""

    def __init__(self, session: Path) -> None:
        self.dir = Path(session) / TUNING_DIR
        self.session = Path(session)

    @staticmethod
    def key(fingerprint: dict, eval_digest: str, recipe: dict, fmt: str, part_file_size: float | None) -> str:
        """Model fingerprint + evaluation data (and subset) + candidate recipe + output format."""
        return digest({"v": SCORE_VERSION, "fingerprint": fingerprint, "eval": eval_digest, "recipe": recipe,
                        "format": fmt, "part_file_size": part_file_size})

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            obj = json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return obj if isinstance(obj, dict) else None

    def put(self, key: str, obj: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / f"{key}.json", json.dumps(obj, indent=1, default=str).encode())

    @property
    def scratch(self) -> Path:
        """Candidates' exports while they may still be scored or chosen (removed when done or restarted): beside
        the session, never inside it (an export never writes into its own input)."""
        return self.session.parent / f".{self.session.name}.tuning-scratch"
