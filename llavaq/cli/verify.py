"""``llavaq verify``: W8A8 fidelity against the float model, with integer-exact kernel emulation."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llavaq.cli import render
from llavaq.cli.app import out
from llavaq.errors import LlavaqError, VerificationFailed

Quantized = typer.Option(..., "--quantized", help="A quantized output directory (any format).")
Images = typer.Option(None, "--images", help="Evaluation photos (default: the shipped held-out set).")
Prompts = typer.Option(None, "--prompts", help="JSON list of {image, question} / text prompts.")
Text = typer.Option(None, "--text", help="Held-out plain text for perplexity.")
MaxPplIncrease = typer.Option(None, "--max_ppl_increase", help="Exit 1 if the held-out perplexity rises by more "
                              "than this many percent.")
MinTop1 = typer.Option(None, "--min_top1", help="Exit 1 if top-1 agreement (0..1) on the held-out text or on the "
                       "answers to image prompts is below this (each must hold).")
Mode = typer.Option("static", "--mode", help="static (as the kernels run the output); dynamic (per-token "
                    "activations) or weight_only (float activations): references that separate what the static "
                    "ranges and the int8 weights cost.")


def verify(
    model_path: Path = typer.Option(..., "--model_path", help="The float model."),
    quantized: Path = Quantized,
    images: Path = Images,
    prompts: Path = Prompts,
    text: Path = Text,
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    max_ppl_increase: float = MaxPplIncrease,
    min_top1: float = MinTop1,
    max_ppl_increase_alias: float = typer.Option(None, "--max-ppl-increase", hidden=True),
    min_top1_alias: float = typer.Option(None, "--min-top1", hidden=True),
    mode: str = Mode,
    report: Path = typer.Option(None, "--report", help="Also write an HTML page (charts; needs llavaq[report])."),
    engine: str = typer.Option("emulation", "--engine", help="emulation, or vllm: the held-out text's perplexity "
                               "and top-1 measured by vLLM running the compressed-tensors output (`make vllm-env`)."),
    vllm_python: Path = typer.Option(None, "--vllm_python", help="--engine vllm: the vLLM venv's python "
                                     "(default: $LLAVAQ_VLLM_PYTHON, else .venv-vllm/bin/python)."),
    force: bool = typer.Option(False, "--force", help="Compare even an output made from another model."),
) -> None:
    """Measure W8A8 fidelity against the float model with integer-exact kernel emulation."""
    from llavaq.quant.emulate import EMULATION_MODES  # torch
    from llavaq.verify import check_thresholds
    from llavaq.verify import verify as run
    from llavaq.verify.engine import ENGINES, verify_vllm

    max_ppl_increase = max_ppl_increase if max_ppl_increase is not None else max_ppl_increase_alias
    min_top1 = min_top1 if min_top1 is not None else min_top1_alias
    if engine not in ENGINES:
        raise LlavaqError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if mode not in EMULATION_MODES:
        raise LlavaqError(f"--mode must be one of {', '.join(EMULATION_MODES)}, not {mode!r}")
    html = report
    if html is not None:  # every Linear's error on the page, the worst 10 printed
        from llavaq.report import check_report_target

        check_report_target(html)
    if engine == "emulation":
        report = run(model_path, quantized, images=images, prompts=prompts, text=text, mode=mode, force=force,
                     worst=1 << 30 if html is not None else 10)
    else:
        report = verify_vllm(model_path, quantized, text=text, vllm_python=vllm_python)
    if html is not None:
        from llavaq.report import write_report

        write_report(html, report.to_dict())
        report.worst_layers = report.worst_layers[:10]
    if json_out:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render.verify_report(report, out)
    failed = check_thresholds(report, max_ppl_increase, min_top1)
    if failed:
        raise VerificationFailed(f"{quantized}: " + "; ".join(failed))
