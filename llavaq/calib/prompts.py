"""Reading prompt files (text-only calibration prompts, evaluation prompts)."""

from __future__ import annotations

import json
from pathlib import Path

from llavaq.errors import LlavaqError
from llavaq.safety import note_input


def read_user_text(path: str | Path, what: str) -> str:
    """The text of a user-supplied file, or a one-line error naming ``what`` it is and the path."""
    path = Path(path)
    if not path.is_file():
        raise LlavaqError(f"{what} {path} does not exist")
    note_input(path, what)  # (hostile: never an output)
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaqError(f"{what} {path}: cannot read ({e.__class__.__name__})") from None


def read_text_prompts(path: str | Path) -> tuple[str, ...]:
    """A JSON list of strings, or a text file with one prompt per non-empty line."""
    path = Path(path)
    text = read_user_text(path, "prompt file")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlavaqError(f"prompt file {path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise LlavaqError(f"prompt file {path}: expected a JSON list of strings")
        prompts = tuple(data)
    else:
        prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise LlavaqError(f"prompt file {path} has no prompts")
    return prompts
