"""Inputs are sacred: no save or cache directory may be, contain or lie inside an input.

Every place that writes a directory (the save directory, the session cache) names the inputs of the run
(model, photos, prompt files, evaluation data, the session cache); files llavaq read as user text are also
remembered here (:func:`note_input`), so a prompt file is protected even where only its contents travel on.
The comparison resolves symlinks (``Path.resolve``) and also catches the same directory reached through a
hard link or bind mount (``os.path.samefile``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from llavaq.errors import LlavaqError, OutputError

#: user files this process read as inputs (prompt files, evaluation text); see :func:`note_input`
_NOTED: dict[str, str] = {}


def note_input(path: str | Path, what: str = "input file") -> None:
    """Remember that ``path`` was read as an input of this process (it may never become an output)."""
    try:
        _NOTED.setdefault(str(Path(path).resolve()), what)
    except OSError:  # an unresolvable path is not an input we read
        pass


def noted_inputs() -> list[tuple[str, Path]]:
    return [(what, Path(p)) for p, what in _NOTED.items()]


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def relation(target: str | Path, inp: str | Path) -> str | None:
    """How ``target`` relates to ``inp`` after resolving symlinks: "is", "lies inside", "contains" or None."""
    t, i = Path(target).resolve(), Path(inp).resolve()
    if t == i or _same(t, i):
        return "is"
    if i in t.parents or any(_same(p, i) for p in t.parents):
        return "lies inside"
    if t in i.parents or any(_same(p, t) for p in i.parents):
        return "contains"
    return None


def check_not_input(target: str | Path, what: str, inputs: Iterable[tuple[str, str | Path | None]],
                    flag: str = "--save_directory") -> None:
    """Refuse (one line) a ``target`` directory that is, contains or lies inside any of ``inputs``.

    ``inputs``: (label, path) pairs; a ``None`` path is skipped. Files noted by :func:`note_input` are
    checked too. ``--overwrite`` changes nothing here: an input is never replaced.
    """
    for label, path in [*inputs, *noted_inputs()]:
        if path is None or not str(path):
            continue
        rel = relation(target, path)
        if rel is not None:
            raise OutputError(
                f"{what} {target} {rel} the {label} {path}; llavaq never writes into, over or around an input "
                f"(with or without --overwrite): choose another {flag}"
            )


# ------------------------------------------------------------------------------------------ the final move
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it (then fall back)."""

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def move_new(src: Path, dst: Path) -> None:
    """Move ``src`` to an absent ``dst``; ``FileExistsError`` if anything appeared there meanwhile."""
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):  # (no atomic no-replace rename here: the narrowest check we can make)
        raise FileExistsError(17, "File exists", str(dst))
    os.rename(src, dst)


def exchange(src: Path, dst: Path) -> bool:
    """Atomically swap ``src`` and ``dst`` (both exist); False where the system cannot."""
    return _renameat2(src, dst, RENAME_EXCHANGE)


# ------------------------------------------------------------------------------------------ the CLI's process
_SIGNAL: list[int] = []


def _terminate(signum: int, frame: object) -> None:
    _SIGNAL.append(signum)
    raise KeyboardInterrupt  # unwinds exactly like Ctrl-C: temp files and locks are released on the way out


def handle_termination() -> None:
    """SIGTERM and SIGHUP handled like Ctrl-C (the CLI calls this at start; exit with :func:`exit_code`)."""

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, _terminate)


def exit_code(default: int = 130) -> int:
    """128 + the number of the signal that stopped the run (``default`` = Ctrl-C's 130)."""
    return 128 + _SIGNAL[-1] if _SIGNAL else default


def harden_streams() -> None:
    """Output to an ASCII or other non-UTF-8 stream degrades symbols (``?``) and never raises."""

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (captured, redirected by a host)
            pass


# ------------------------------------------------------------------------------------------ verify's inputs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def check_output_of_model(model_path: str | Path, fingerprint: dict[str, str], quantized_dir: str | Path,
                          record: dict | None, force: bool = False) -> None:
    """``verify``: refuse (one line, before any forward pass) an output made from another model (the
    fingerprint ``llavaq_record.json`` carries; ``force`` skips this) or one whose tokenizer differs."""

    theirs = (record or {}).get("model_fingerprint")
    if isinstance(theirs, dict) and not force:
        differ = [k for k in ("layout", "config", "weights") if k in theirs and theirs[k] != fingerprint.get(k)]
        if differ:
            raise LlavaqError(f"{quantized_dir} was made from another model than {model_path} ({', '.join(differ)} "
                              f"differ; made from {(record or {}).get('model_path')}); give its float model, or "
                              "pass --force to compare anyway")
    for name in TOKENIZER_FILES:
        a, b = Path(model_path) / name, Path(quantized_dir) / name
        if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            raise LlavaqError(f"{b} differs from {a}: the quantized model's tokenizer is not the float model's, so "
                              "their tokens cannot be compared; give the float model it was made from")
