"""One writer at a time: advisory locks on save directories and session caches, and stale leftovers.

A lock is ``fcntl.flock`` on a small file beside what it guards (``.<name>.llavaq-lock``), holding the pid
of its owner. It is removed on release (after a re-check that the file locked is still the one at that
path, so a waiter never locks an unlinked file), and the kernel drops it when a process dies, even by
``kill -9``. A second run refuses in one line naming the pid that holds it. Locks are re-entrant within a
process (a ``quantize`` that exports into the directory it already holds). Where ``fcntl`` is missing
(Windows) locking is a no-op.

Temporary directories carry their owner's pid in their name (``.<name>.llavaq-tmp-<pid>-<hex>``); one whose
pid is dead is a leftover of a killed run and is removed by the next run on the same target.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llavaq.errors import LlavaqError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_HELD: dict[str, list[int]] = {}  # lock path -> [fd, depth]
_TMP = re.compile(r"\.llavaq-(?:tmp|old)-(\d+)-[0-9a-f]+$")


class Busy(LlavaqError):
    """Another llavaq run holds the lock."""


def lock_path_for(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.llavaq-lock"


def _owner(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return "another process"
    return f"pid {pid}" if pid.isdigit() else "another process"


def _acquire(path: Path, what: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LlavaqError(f"cannot create the lock file {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise Busy(f"{what} is in use by another llavaq run ({_owner(path)}); wait for it to finish, "
                       "or choose another directory") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the holder removed it between our open and our lock: take the new one


@contextmanager
def exclusive(target: str | Path, what: str) -> Iterator[None]:
    """Hold the advisory lock of ``target`` (a directory that may not exist yet) for the block."""
    path = lock_path_for(Path(target).absolute())
    key = str(path)
    if fcntl is None or not path.parent.is_dir():
        yield
        return
    if key in _HELD:
        _HELD[key][1] += 1
    else:
        _HELD[key] = [_acquire(path, what), 1]
    try:
        yield
    finally:
        held = _HELD[key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            try:
                path.unlink()
            except OSError:
                pass
            os.close(held[0])


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_stale(target: str | Path) -> list[Path]:
    """Remove ``.<name>.llavaq-tmp-<pid>-*`` / ``-old-`` siblings of ``target`` whose pid is dead."""
    target = Path(target)
    removed = []
    try:
        siblings = list(target.parent.glob(f".{target.name}.llavaq-*"))
    except OSError:
        return removed
    for p in siblings:
        m = _TMP.search(p.name)
        if m and p.name.startswith(f".{target.name}.") and not pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
