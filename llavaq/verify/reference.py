"""The float side of ``verify``'s scores, computed once per model and evaluation set and kept in the session cache.

What KL, top-1, cosine and perplexity need of the float model, exactly as ``verify`` uses it: per prompt the
greedy answer (token ids) and the float32 logits at the prompt's text positions, per held-out window the float32
logits at every position but the last. The logits are kept whole (cosine needs every logit; the logits are
float32 in the forward, so they are stored without loss): the size is positions x vocabulary x 4 bytes, bounded
by the evaluation set (``--max_text_tokens`` and the prompts), never by the model's depth — 0.5 GB for 4096
held-out tokens of a 32k vocabulary.

One safetensors file per sample under ``<cache dir>/float-side/<model fingerprint>/``, written
as soon as the sample is scored (temp file + rename), its sha256 in ``index.json`` (rewritten the same way after
each file): an interrupted ``verify`` or ``--recipe auto`` resumes with what was written. On read every file is
checked against its sha256: a changed or truncated one is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from llavaq.errors import CacheError
from llavaq.files import atomic_save_tensors, atomic_write_bytes

FLOAT_SIDE_DIR = "float-side"
INDEX = "index.json"
#: bump when what a float side holds changes
FLOAT_SIDE_VERSION = 1


def float_side_dir(cache_root: str | Path, fingerprint: dict) -> Path:
    """The float side of one model (its fingerprint): one entry per evaluation sample, keyed by what the sample
    is (a prompt's question, photo digest and answer length; a window's token ids), so the evaluation sets of
    ``verify`` and of ``--recipe auto`` (and its screening subset) share it."""
    blob = json.dumps({"v": FLOAT_SIDE_VERSION, "model": fingerprint}, sort_keys=True, default=str).encode()
    return Path(cache_root) / FLOAT_SIDE_DIR / hashlib.sha256(blob).hexdigest()[:20]


def _name(key: tuple) -> str:
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:32] + ".safetensors"


class FloatReference(MutableMapping):
    """``verify``'s ``float_reference`` kept on disk (see the module docstring); keys as :mod:`llavaq.verify.paired`
    makes them, values ``(answer, logits)`` for a prompt and ``logits`` for a held-out window."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.index: dict[str, str] = {}
        self.reads = 0  # entries read back (tests: the float side computed once)
        path = self.root / INDEX
        if path.is_file():
            try:
                index = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                raise CacheError(f"{path}: corrupted float-side index; delete {self.root}") from None
            if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
                raise CacheError(f"{path}: corrupted float-side index; delete {self.root}")
            self.index = index

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and _name(key) in self.index

    def __getitem__(self, key: tuple) -> Any:
        from safetensors.torch import load

        name = _name(key)
        if name not in self.index:
            raise KeyError(key)
        path = self.root / name
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        if hashlib.sha256(data).hexdigest() != self.index[name]:
            raise CacheError(f"{path}: corrupted float-side file (sha256 differs from {INDEX}'s: changed, truncated "
                             f"or missing); delete {self.root} to compute the float side again")
        self.reads += 1
        t = load(data)
        return (t["answer"], t["logits"]) if "answer" in t else t["logits"]

    def __setitem__(self, key: tuple, value: Any) -> None:
        tensors = {"answer": value[0], "logits": value[1]} if isinstance(value, tuple) else {"logits": value}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            name = _name(key)
            self.index[name] = atomic_save_tensors(self.root / name, {k: t.contiguous() for k, t in tensors.items()})
            atomic_write_bytes(self.root / INDEX, json.dumps(self.index, indent=0).encode())
        except OSError as e:
            raise CacheError(f"cannot write the float side in {self.root} ({e.strerror or e})") from None

    def __delitem__(self, key: tuple) -> None:
        raise TypeError("a float side is not edited")

    def __iter__(self) -> Iterator[Any]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)
