"""Shared helpers of the input-safety tests (issue 24): every input file is hashed before and after a hostile
test, and any change fails it; plus the in-process CLI runner and its one-line-error assertion."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), plus every directory's name list."""
    root = Path(root)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out[f"{rel}/"] = ",".join(sorted(dirnames + filenames))
        for f in filenames:
            p = Path(dirpath, f)
            out[os.path.join(rel, f)] = hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink() else \
                f"-> {os.readlink(p)}"
    return out


class InputGuard:
    def __init__(self) -> None:
        self.watched: dict[Path, dict[str, str]] = {}

    def watch(self, *paths: Path) -> None:
        for p in paths:
            self.watched[Path(p)] = tree_digest(p)

    def verify(self) -> None:
        for p, before in self.watched.items():
            assert p.exists(), f"input {p} was deleted"
            after = tree_digest(p)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            assert not changed, f"input {p} changed: {changed[:5]}"


@pytest.fixture
def guard():
    """``guard.watch(model, photos, ...)``; at teardown every watched file must be byte-identical."""
    g = InputGuard()
    yield g
    g.verify()


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = [ln for ln in self.err.splitlines() if ln.strip()]
        assert lines, "nothing on stderr"
        return lines[-1]


def run_cli(*args) -> Run:
    """``llavaq <args>`` in-process through the real entry point (``llavaq.cli.main``), stdout and stderr captured."""
    from llavaq.cli import main

    o, e = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["llavaq", *map(str, args)]
    try:
        with redirect_stdout(o), redirect_stderr(e):
            main()
        code = 0
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    finally:
        sys.argv = argv
    return Run(code, o.getvalue(), e.getvalue())


def cli(capsys, *args) -> Run:
    """:func:`run_cli` inside a test that also captures (``capsys``): what was printed before is dropped."""
    capsys.readouterr()
    return run_cli(*args)


def one_error(res: Run, *needles: str) -> str:
    """Exit != 0, no traceback, exactly one ``error:`` line that contains every needle (case-insensitive)."""
    assert res.code != 0, res.err
    assert "Traceback" not in res.err + res.out, res.err
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.err
    for n in needles:
        assert str(n).lower() in errors[0].lower(), (n, errors[0])
    return errors[0]
