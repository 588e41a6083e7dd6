"""``llavaq quantize``: calibrate (reusing a matching session cache) and write; ``--recipe auto`` tunes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from llavaq.cli import render
from llavaq.cli.app import err, out
from llavaq.cli.common import device_line, progress, show_calibration, show_export, show_summary
from llavaq.cli.options import (
    AUTO_CHOSEN,
    CacheDir,
    CalibImages,
    DeviceType,
    ModelPath,
    Overwrite,
    PartFileSize,
    RecipeArgs,
    SaveDirectory,
    StreamMemory,
    TrustRemote,
    parse_bool,
    recipe_options,
)
from llavaq.errors import LlavaqError, VerificationFailed
from llavaq.recipe import QuantRecipe

MindieFormat = typer.Option(False, "--mindie_format", help="MindIE-compatible output (safe_tensor).")
QuantizeFormat = typer.Option(None, "--format", help="msmodelslim | mindie | compressed-tensors | fakequant.")
RecipeName = typer.Option("msmodelslim", "--recipe", help="msmodelslim: the recipe the flags above describe "
                          "(default: msModelSlim's, byte for byte); auto: calibrate once, score candidate recipes "
                          "with verify and write the best that meets the target.")
MaxPplIncrease = typer.Option(None, "--max_ppl_increase", help="--recipe auto: largest held-out perplexity "
                              "increase in percent (default 1.0).")
MinTop1 = typer.Option(None, "--min_top1", help="--recipe auto: smallest top-1 agreement (0..1) on the held-out "
                       "text and on the answers to image prompts, each (default 0.95).")
EvalPrompts = typer.Option(None, "--eval_prompts", help="--recipe auto: evaluation prompts (JSON, as verify "
                           "--prompts; default: the shipped held-out set).")
EvalImages = typer.Option(None, "--eval_images", help="--recipe auto: evaluation photos (as verify --images).")
EvalText = typer.Option(None, "--eval_text", help="--recipe auto: held-out plain text for perplexity (as verify "
                        "--text).")
Report = typer.Option(None, "--report", help="--recipe auto: also verify the chosen model and write an HTML page "
                      "with every candidate (needs llavaq[report]).")
TimeBudget = typer.Option(None, "--time_budget", help="--recipe auto: minutes for the whole run; dear "
                          "calibrations (msModelSlim's m2) run when they fit, candidates and fallback steps that "
                          "would not fit are skipped (default: no limit; the base and the rotation calibration "
                          "only).")


@dataclass(frozen=True)
class Run:
    """The options of a quantize run that are not the recipe."""

    model_path: Path
    save_directory: Path
    calib_images: Path
    fmt: str
    part_file_size: float | None
    device_type: str
    trust_remote_code: bool
    cache_dir: Path | None
    stream_memory_gb: float | None
    overwrite: bool


@recipe_options("quantize")
def quantize(
    model_path: Path = ModelPath,
    save_directory: Path = SaveDirectory,
    calib_images: Path = CalibImages,
    part_file_size: float = PartFileSize,
    device_type: str = DeviceType,
    trust_remote_code: str = TrustRemote,
    mindie_format: bool = MindieFormat,
    format: str = QuantizeFormat,
    recipe: RecipeArgs = ...,  # the recipe options, where --help lists them (options.recipe_options)
    cache_dir: Path = CacheDir,
    stream_memory_gb: float = StreamMemory,
    overwrite: bool = Overwrite,
    recipe_name: str = RecipeName,
    max_ppl_increase: float = MaxPplIncrease,
    min_top1: float = MinTop1,
    eval_prompts: Path = EvalPrompts,
    eval_images: Path = EvalImages,
    eval_text: Path = EvalText,
    time_budget: float = TimeBudget,
    report: Path = Report,
) -> None:
    """Calibrate (reusing a matching session cache) and write the W8A8 model."""
    auto = {"max_ppl_increase": max_ppl_increase, "min_top1": min_top1, "eval_prompts": eval_prompts,
            "eval_images": eval_images, "eval_text": eval_text, "time_budget": time_budget, "report": report}
    if recipe_name not in ("msmodelslim", "auto"):
        raise LlavaqError(f"--recipe must be msmodelslim or auto, not {recipe_name!r}")
    if recipe_name == "msmodelslim":
        given = [key for key, v in auto.items() if v is not None]
        if given:
            raise LlavaqError(f"--{given[0]} applies to --recipe auto only")
    else:
        given = recipe.changed(AUTO_CHOSEN)
        if given:
            raise LlavaqError(f"{given[0]} is chosen by --recipe auto; leave it out (or use --recipe msmodelslim)")
    q = recipe.recipe() if recipe_name == "msmodelslim" else None
    run = Run(model_path, save_directory, calib_images, format or ("mindie" if mindie_format else "msmodelslim"),
              part_file_size, device_type, parse_bool(trust_remote_code, "--trust_remote_code"), cache_dir,
              stream_memory_gb, overwrite)
    if q is None:
        _quantize_auto(run, recipe, auto)
    else:
        _quantize(run, q)


def _quantize(run: Run, recipe: QuantRecipe) -> None:
    from llavaq import api  # torch

    device_line(run.device_type)
    with progress() as bars:
        cal, res = api.quantize(run.model_path, run.calib_images, run.save_directory, recipe, format=run.fmt,
                                part_file_size=run.part_file_size, overwrite=run.overwrite, cache_dir=run.cache_dir,
                                device_type=run.device_type, trust_remote_code=run.trust_remote_code, progress=bars,
                                stream_memory_gb=run.stream_memory_gb)
    show_calibration(cal)
    show_export(res)
    show_summary(0.0 if cal.reused else cal.seconds, res)


def _quantize_auto(run: Run, recipe: RecipeArgs, auto: dict[str, Any]) -> None:
    """``quantize --recipe auto``: print the tuning table; exit 1 (best model written) when the target is missed."""
    from llavaq import api  # torch

    QuantRecipe(w_bit=recipe.raw["w_bit"], a_bit=recipe.raw["a_bit"])  # one-line error for what no format carries
    html = auto.pop("report")
    if html is not None:
        from llavaq.report import check_report_target

        check_report_target(html)
    values = recipe.values()
    # no --text_prompts: the tuner's shipped prompts (not none)
    prompts = values["text_prompts"] if recipe.raw["text_prompts"] is not None else None
    device_line(run.device_type)
    with progress() as bars:
        res = api.tune(run.model_path, run.calib_images, run.save_directory, format=run.fmt, **auto,
                       w_bit=values["w_bit"], a_bit=values["a_bit"],
                       text_prompts=prompts, modules=values["modules"], float_dtype=values["float_dtype"],
                       part_file_size=run.part_file_size, overwrite=run.overwrite, cache_dir=run.cache_dir,
                       device_type=run.device_type, trust_remote_code=run.trust_remote_code, progress=bars,
                       stream_memory_gb=run.stream_memory_gb)
    render.tuning_run(err, out, res, str(res.save_directory / "llavaq_tuning.json"))
    show_export(res.export)
    show_summary(res.seconds - res.export.seconds, res.export)
    if html is not None:
        from llavaq.report import write_auto_report

        err.print(f"report: {escape(str(write_auto_report(html, run.model_path, res.save_directory, auto)))}")
    if not res.met:
        raise VerificationFailed(f"target missed; the best candidate ({res.chosen.candidate}) was written to "
                                 f"{res.save_directory}: " + "; ".join(res.missed))
    err.print(f"[green]✓[/] {escape(res.chosen.candidate)} meets the target", soft_wrap=True)
