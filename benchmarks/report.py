"""Benchmark reporting: what a benchmark ran on, and its section in docs/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """CPU model, core count (this process's affinity), RAM, Python, torch, date."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"nproc": len(os.sched_getaffinity(0)), "ram_gib": mem / 2**30, "cpu": cpu,
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}


def machine_line() -> str:
    m = machine_info()
    return f"{m['nproc']} CPU cores ({m['cpu']}), {m['ram_gib']:.0f} GiB RAM, Python {m['python']}, torch {m['torch']}"


def write_section(path: Path, md: str) -> None:
    """Replace (or append) the ``## <title>`` section that ``md`` starts with; atomic write."""
    title = md.splitlines()[0]
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(title + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + md.rstrip() + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + md
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
