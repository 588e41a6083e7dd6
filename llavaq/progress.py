"""Progress reporting: a tiny protocol the library calls, with a rich implementation for the CLI."""

from __future__ import annotations

import resource
from typing import Protocol


def peak_rss_bytes() -> tuple[int, int]:
    """Peak resident set size of this process and of its (waited-for) children, in bytes (Linux: KiB units)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)


def summary_line(seconds: float, output_bytes: int, files: int) -> str:
    """The final one-line summary: wall time, peak memory (process and children), output size."""
    own, children = peak_rss_bytes()
    mins, secs = divmod(seconds, 60)
    t = f"{int(mins)}m{secs:04.1f}s" if mins else f"{secs:.1f}s"
    kids = f", children {children / 2**30:.2f} GiB" if children else ""
    return (f"done in {t}; peak memory {own / 2**30:.2f} GiB (process{kids}); "
            f"output {output_bytes / 2**30:.2f} GiB in {files} files")


class Progress(Protocol):
    def stage(self, description: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def sub(self, description: str, total: int) -> None: ...

    def sub_advance(self, n: int = 1) -> None: ...

    def log(self, message: str) -> None: ...


class NullProgress:
    def stage(self, description: str, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def sub(self, description: str, total: int) -> None:
        pass

    def sub_advance(self, n: int = 1) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class RichProgress:
    """Two bars: layers (with ETA) and samples within the current layer."""

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(stderr=True)
        self._p = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._task = None
        self._sub = None

    def __enter__(self) -> RichProgress:
        self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._p.__exit__(*exc)

    def stage(self, description: str, total: int) -> None:
        if self._task is not None:
            self._p.remove_task(self._task)
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._p.advance(self._task, n)

    def sub(self, description: str, total: int) -> None:
        if self._sub is not None:
            self._p.remove_task(self._sub)
        self._sub = self._p.add_task("  " + description, total=total)

    def sub_advance(self, n: int = 1) -> None:
        if self._sub is not None:
            self._p.advance(self._sub, n)

    def log(self, message: str) -> None:
        from rich.markup import escape

        self._p.console.print(escape(message), soft_wrap=True, highlight=False)
