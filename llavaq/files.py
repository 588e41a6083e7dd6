"""Files: the names llavaq gives them, the package data it ships, and writes that never leave half a file.

Every module may import this one (it imports only :mod:`llavaq.errors`).
"""

from __future__ import annotations

import hashlib
import os
from importlib.resources import files as _package_files
from pathlib import Path

import torch

from llavaq.errors import CacheError

#: The provenance record of every output llavaq writes (tool, format, recipe, ...).
RECORD_FILE = "llavaq_record.json"
#: The candidates of ``quantize --recipe auto``, written beside the chosen model.
TUNING_FILE = "llavaq_tuning.json"
#: A session cache's identity and progress.
CACHE_MANIFEST = "manifest.json"
#: A session cache's folder of tuning scores (``<session>/tuning/<key>.json``).
TUNING_DIR = "tuning"

#: Third-party modules imported inside functions (heavy, or optional: the only imports allowed there, so that
#: ``import llavaq`` and ``llavaq --help`` stay fast and a missing extra fails only the command that needs it).
#: tests/test_architecture.py enforces it.
OPTIONAL_IMPORTS = (
    "transformers",  # heavy (seconds): only commands that load a processor or a float model
    "safetensors",  # only where a file is read or written
    "tokenizers",  # test and demo model builders
    "rich",  # rendering, for the CLI only (the library API prints nothing)
    "gguf",  # the demo model's weights (optional extra)
    "matplotlib",  # the HTML report's charts (optional extra: llavaq[report])
    "torch_npu",  # Ascend NPUs only
)


def shipped(*parts: str) -> Path | None:
    """A file or folder shipped under ``llavaq/data`` (e.g. ``shipped("eval", "heldout.txt")``), if installed."""
    try:
        p = Path(str(_package_files("llavaq").joinpath("data", *parts)))
    except (ModuleNotFoundError, TypeError):
        return None
    return p if p.exists() else None


def fsync_path(path: Path) -> None:
    """Flush a written file's data, or a directory's entries, to the disk (raises ``OSError``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """:func:`fsync_path` of a directory, where the platform allows it."""
    try:
        fsync_path(path)
    except OSError:  # Windows cannot open a directory; some file systems cannot fsync one
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temp file, flushed to the disk, renamed, and the rename flushed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as e:  # Ctrl-C or a full disk: never leave the temp file behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CacheError(f"cannot write cache file {path} ({e.strerror or e})") from None
        raise


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """:func:`atomic_write_bytes` of a safetensors file; its sha256 (the cache manifest's checksum of it)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()
