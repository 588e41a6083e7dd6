"""``tune``: the entry point of ``quantize --recipe auto`` (the steps are in the package docstring)."""

from __future__ import annotations

import math
from pathlib import Path

from llavaq.calib.cache import default_cache_dir
from llavaq.errors import LlavaqError
from llavaq.files import TUNING_FILE
from llavaq.formats import get_format
from llavaq.formats.base import AtomicOutputDir
from llavaq.model.llava import LlavaArch
from llavaq.model.loading import open_model
from llavaq.pipeline import ExportResult
from llavaq.pipeline.exporting import check_weight_only_shapes
from llavaq.progress import NullProgress, Progress
from llavaq.recipe import QuantRecipe, check_part_file_size
from llavaq.tuning import tables
from llavaq.tuning.evaldata import check_disjoint, load_eval_data, shipped_text_prompts
from llavaq.tuning.results import TuningResult, tuning_document
from llavaq.tuning.selection import TuningRow
from llavaq.tuning.steps import extra_calibrations, fallback, run_candidates
from llavaq.tuning.tables import (
    DEFAULT_MAX_PPL_INCREASE,
    DEFAULT_MIN_TOP1,
    FINALISTS,
    MAX_FLOAT_FRACTION,
    SCREEN,
    CalibrationSpec,
    CandidateSpec,
    ScreenSpec,
    available,
)
from llavaq.tuning.tuner import Tuner


def tune(
    model_path: str | Path,
    calib_images: str | Path,
    save_directory: str | Path,
    *,
    format: str = "msmodelslim",
    max_ppl_increase: float | None = None,
    min_top1: float | None = None,
    eval_prompts: str | Path | None = None,
    eval_images: str | Path | None = None,
    eval_text: str | Path | None = None,
    time_budget: float | None = None,
    text_prompts: tuple[str, ...] | None = None,
    modules: str = "msmodelslim",
    float_dtype: str = "auto",
    part_file_size: float | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    device_type: str = "cpu",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    stream_memory_gb: float | None = None,
    answer_tokens: int = 16,
    screen: ScreenSpec | None = SCREEN,
    finalists: int = FINALISTS,
    max_float_fraction: float = MAX_FLOAT_FRACTION,
    candidates: tuple[CandidateSpec, ...] | None = None,
    calibrations: tuple[CalibrationSpec, ...] | None = None,
    w_bit: int = 8, a_bit: int = 8,
) -> TuningResult:
    """The best W8A8 model that meets ``Δppl ≤ max_ppl_increase`` % and top-1 ≥ ``min_top1`` (package docstring).

    ``time_budget``: minutes for the whole run (None: no limit; of the extra calibrations only the cheap ones).
    ``text_prompts``: text-only calibration prompts (default: the shipped ones). ``screen=None`` scores every
    candidate on the whole evaluation set; ``candidates`` / ``calibrations`` replace the :mod:`~llavaq.tuning.tables`
    (the base calibration among them; ``a_bit=16``: the weight-only tables). The best model is written either way.
    """
    P, T = _target(max_ppl_increase, min_top1)
    inputs = _inputs(model_path, calib_images, eval_prompts, eval_images, eval_text, cache_dir)
    _check_options(time_budget, part_file_size, max_float_fraction, format, Path(save_directory), overwrite, inputs)
    tp = tuple(text_prompts) if text_prompts is not None else shipped_text_prompts()
    base = QuantRecipe(w_bit=w_bit, a_bit=a_bit, modules=modules, float_dtype=float_dtype, text_prompts=tp)
    arch = open_model(model_path, trust_remote_code=trust_remote_code)
    candidates, calibrations = _tables(arch, base, candidates, calibrations)
    data = load_eval_data(eval_prompts, eval_images, eval_text, answer_tokens)
    check_disjoint(calib_images, tp, data)
    usable = _usable(calibrations, candidates, base)
    tuner = Tuner(model_path=Path(model_path), calib_images=Path(calib_images), base=base, fmt=format,
                  part_file_size=part_file_size, device_type=device_type, trust_remote_code=trust_remote_code,
                  cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress or NullProgress(),
                  stream_memory_gb=stream_memory_gb, data=data, max_ppl_increase=P, min_top1=T,
                  time_budget_s=None if time_budget is None else time_budget * 60, screen=screen,
                  finalists=finalists, candidates=candidates, calibrations=calibrations)
    try:
        _run_steps(tuner, usable[0], len(arch.quantized_linears(modules)), max_float_fraction)
        chosen, met, missed, res = _write_choice(tuner, Path(save_directory), overwrite)
    finally:
        tuner.cleanup()
    return TuningResult(Path(save_directory), chosen, met, missed, tuner.rows, tuner.calibrations, res,
                        tuner.elapsed(), tuner.verify_calls, _target_dict(tuner), tuner.notes)


def _tables(arch: LlavaArch, base: QuantRecipe, candidates: tuple[CandidateSpec, ...] | None,
            calibrations: tuple[CalibrationSpec, ...] | None
            ) -> tuple[tuple[CandidateSpec, ...], tuple[CalibrationSpec, ...]]:
    """The candidate and calibration tables (given, or W8A8's / weight-only's), candidates fitting the model."""
    wo = base.weight_only
    candidates = (tables.WEIGHT_ONLY_CANDIDATES if wo else tables.CANDIDATES) if candidates is None else tuple(
        candidates)
    calibrations = (tables.WEIGHT_ONLY_CALIBRATIONS if wo else tables.CALIBRATIONS) if calibrations is None else \
        tuple(calibrations)
    return _fitting(arch, base, candidates), calibrations


def _fitting(arch: LlavaArch, base: QuantRecipe, candidates: tuple[CandidateSpec, ...]
             ) -> tuple[CandidateSpec, ...]:
    """The candidates whose weight-only group size fits every quantized Linear of the model."""
    if not base.weight_only:
        return candidates
    out = []
    for c in candidates:
        try:
            check_weight_only_shapes(arch, base.replace(group_size=int(dict(c.fields).get("group_size", 0))))
        except LlavaqError:
            continue
        out.append(c)
    return tuple(out)


def _usable(calibrations: tuple[CalibrationSpec, ...], candidates: tuple[CandidateSpec, ...],
            base: QuantRecipe) -> list[CalibrationSpec]:
    """The calibrations of the table this recipe can use that have candidates; refuses none."""
    usable = [c for c in calibrations if available(c.fields, c.requires, base)
              and any(d.calibration == c.name for d in candidates)]
    if not usable:
        raise LlavaqError("no calibration of the table has candidates usable with this recipe (--modules)")
    return usable


def _target(max_ppl_increase: float | None, min_top1: float | None) -> tuple[float, float]:
    """The target (defaults filled in), checked."""
    P = DEFAULT_MAX_PPL_INCREASE if max_ppl_increase is None else float(max_ppl_increase)
    T = DEFAULT_MIN_TOP1 if min_top1 is None else float(min_top1)
    if not math.isfinite(P):
        raise LlavaqError(f"--max_ppl_increase must be a number of percent, not {max_ppl_increase}")
    if not 0.0 <= T <= 1.0:
        raise LlavaqError(f"--min_top1 must be in [0, 1], not {min_top1}")
    return P, T


def _inputs(model_path: str | Path, calib_images: str | Path, eval_prompts: str | Path | None,
            eval_images: str | Path | None, eval_text: str | Path | None,
            cache_dir: str | Path | None) -> list[tuple[str, str | Path | None]]:
    """What ``tune`` reads: the save directory may be none of them, nor lie inside one."""
    return [("model directory", model_path), ("calibration photo directory", calib_images),
            ("evaluation prompts", eval_prompts), ("evaluation photos", eval_images), ("evaluation text", eval_text),
            ("session cache directory", cache_dir if cache_dir is not None else default_cache_dir())]


def _check_options(time_budget: float | None, part_file_size: float | None, max_float_fraction: float,
                   format: str, save_directory: Path, overwrite: bool,
                   inputs: list[tuple[str, str | Path | None]]) -> None:
    if time_budget is not None and not time_budget > 0:
        raise LlavaqError(f"--time_budget must be a positive number of minutes, not {time_budget}")
    check_part_file_size(part_file_size)
    if not 0.0 < max_float_fraction <= 1.0:
        raise LlavaqError(f"max_float_fraction must be in (0, 1], not {max_float_fraction}")
    get_format(format)
    AtomicOutputDir.check(save_directory, overwrite, inputs)  # inputs are never the output


def _run_steps(tuner: Tuner, base: CalibrationSpec, n_quantized: int, max_float_fraction: float) -> None:
    """Steps 2 to 5 of the package docstring: the base calibration, the others, the fallback."""
    tuner.base_name = base.name
    tuner.calibrate(base)
    run_candidates(tuner, base.name)
    extra_calibrations(tuner)
    if not tuner.met():
        fallback(tuner, n_quantized, max_float_fraction)


def _target_dict(tuner: Tuner) -> dict[str, float]:
    return {"max_ppl_increase": tuner.P, "min_top1": tuner.T}


def _write_choice(tuner: Tuner, save_directory: Path,
                  overwrite: bool) -> tuple[TuningRow, bool, list[str], ExportResult]:
    """Step 6: the choice, written with the tuning table and its record."""
    target = _target_dict(tuner)
    chosen, met = tuner.choose()
    missed = [] if met else chosen.failed
    if not met and tuner.budget is None and any("--time_budget" in n for n in tuner.notes):
        tuner.notes.append("the target was missed: --time_budget lets the tuner try the calibrations above too")
    doc = tuning_document(tuner.rows, tuner.calibrations, chosen, met, missed, target, tuner.elapsed(),
                          tuner.notes)
    record = {"tuning": {"chosen": chosen.candidate, "met": met, "missed": missed, "target": target,
                         "score": chosen.score, "float_linears": chosen.float_errors, "table": TUNING_FILE}}
    res = tuner.write(save_directory, overwrite, chosen, record, doc)
    return chosen, met, missed, res
