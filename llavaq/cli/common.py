"""What calibrate, quantize and export share: the device line, the progress bars, the result lines."""

from __future__ import annotations

import resource
from typing import Any

from llavaq.cli import render
from llavaq.cli.app import err, out
from llavaq.progress import RichProgress, summary_line


def device_line(device_type: str) -> None:
    from llavaq.device import resolve_device  # torch

    dev = resolve_device(device_type)
    err.print(f"device: [bold]{dev.type}[/] (--device_type {device_type})")


def progress() -> RichProgress:
    return RichProgress(err)


def show_calibration(cal: Any) -> None:
    render.calibration_lines(err, cal)


def show_export(res: Any) -> None:
    """The export table (with this process's peak RSS) on stdout."""
    gptq_line = None
    if res.gptq_error:
        from llavaq.inspect import gptq_summary  # torch (already loaded by the export)

        gptq_line = gptq_summary(res.gptq_error)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out.print(render.export_table(res, gptq_line, peak_rss_mib))


def show_summary(calib_seconds: float, res: Any) -> None:
    """The final line: wall time, peak memory, output size."""
    err.print(summary_line(calib_seconds + res.seconds, res.bytes_written, len(res.files)), highlight=False,
              soft_wrap=True)
