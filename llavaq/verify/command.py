"""``llavaq verify``: verify an output, print its report (or JSON), fail below the thresholds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llavaq.errors import LlavaqError, VerificationFailed
from llavaq.quant.emulate import EMULATION_MODES
from llavaq.verify.fidelity import verify
from llavaq.verify.render import print_report
from llavaq.verify.thresholds import check_thresholds


def run_verify(
    model_path: str | Path,
    quantized: str | Path,
    *,
    images: str | Path | None = None,
    prompts: str | Path | None = None,
    text: str | Path | None = None,
    json_out: bool = False,
    max_ppl_increase: float | None = None,
    min_top1: float | None = None,
    mode: str = "static",
    console: Any = None,
) -> int:
    from rich.console import Console

    console = console or Console()
    if mode not in EMULATION_MODES:
        raise LlavaqError(f"--mode must be one of {', '.join(EMULATION_MODES)}, not {mode!r}")
    report = verify(model_path, quantized, images=images, prompts=prompts, text=text, mode=mode)
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, console)
    failed = check_thresholds(report, max_ppl_increase, min_top1)
    if failed:
        raise VerificationFailed(f"{quantized}: " + "; ".join(failed))
    return 0
