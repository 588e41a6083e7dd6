"""The tuner's tables, as data: the calibrations it may run, the candidates it scores, the screening subset.

Adding a recipe to try is one line of :data:`CANDIDATES`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llavaq.errors import LlavaqError
from llavaq.recipe import QuantRecipe

DEFAULT_MAX_PPL_INCREASE = 1.0
DEFAULT_MIN_TOP1 = 0.95
#: Fallback cap: at most this fraction of the quantized Linears is kept in float.
MAX_FLOAT_FRACTION = 0.10
#: Fallback: at most this many doubling steps up to the cap (then halving back to the fewest that pass).
FALLBACK_STEPS = 4
#: Candidates scored on the whole evaluation set after screening.
FINALISTS = 2
#: A GPTQ candidate is scored only where its round-to-nearest twin is among the best this many (a GPTQ export
#: costs several round-to-nearest ones; the smoothing that is best with rtn weights is the one GPTQ refines).
GPTQ_TWINS = 1
#: Without a time budget, an extra calibration runs when it costs at most this many min-max calibrations: the
#: rotation (1.2) and min-max ones do, msModelSlim's m2 (4.5: its threshold search) needs --time_budget.
CHEAP_CALIBRATION = 2.0
SCORE_VERSION = 1


@dataclass(frozen=True)
class CalibrationSpec:
    """A session cache the tuner may calibrate: its recipe fields and its cost relative to the base."""

    name: str
    label: str
    fields: tuple[tuple[str, Any], ...]
    #: estimated calibration time / the base calibration's (for the time budget)
    cost: float
    #: QuantRecipe fields it needs (absent in this llavaq: the calibration and its candidates are left out)
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class CandidateSpec:
    """One recipe to try: the calibration it is exported from and its export-time recipe fields."""

    name: str
    calibration: str
    fields: tuple[tuple[str, Any], ...]
    requires: tuple[str, ...] = ()


def calibration_spec(name: str, label: str, cost: float, requires: tuple[str, ...] = (),
                     **fields: Any) -> CalibrationSpec:
    """A :class:`CalibrationSpec` with its recipe fields as keywords."""
    return CalibrationSpec(name, label, tuple(fields.items()), cost, requires)


def candidate_spec(name: str, calibration: str, requires: tuple[str, ...] = (), **fields: Any) -> CandidateSpec:
    """A :class:`CandidateSpec` with its recipe fields as keywords (one line of :data:`CANDIDATES`)."""
    return CandidateSpec(name, calibration, tuple(fields.items()), requires)


#: The first available entry is the base (calibrated first, its candidates always scored in full); the others
#: when cheap or within a time budget (package docstring, step 4). The rotation leads: it gave the best model on
#: every measure on the demo model, so the unrotated candidates are then screened against its finalists.
#: ``cost``: calibration time relative to the min-max one (demo model, measured). An entry whose fields this
#: QuantRecipe lacks or refuses (``--rotation`` with ``--modules with_down_proj``) is left out.
CALIBRATIONS: tuple[CalibrationSpec, ...] = (
    calibration_spec("hadamard", "Hadamard rotation, min-max ranges, input moments", 1.2, ("rotation",),
                     anti_outlier="none", act_method=1, weight_method="gptq", rotation="hadamard"),
    calibration_spec("minmax", "min-max ranges, float statistics, input moments", 1.0,
                     anti_outlier="none", act_method=1, weight_method="gptq"),
    calibration_spec("m2", "msModelSlim's m2 (OS+) search, histogram ranges, input moments", 4.5,
                     anti_outlier="m2", act_method=2, weight_method="gptq"),
)
#: In the order they are scored (the likely best first, so that a tight time budget cuts the others); a GPTQ
#: candidate after its round-to-nearest twin (step 3). Adding a recipe is one line. The ``range`` rows smooth with
#: ``--smooth_stat range`` (per-channel max − min, llm-compressor's statistic) from the same min-max cache: with
#: photos-only calibration (~97 % image rows) it was the better statistic on text (issue 27, docs/BENCHMARKS.md).
#: ``--smooth_vo`` is not in the table: on the demo model it made every recipe worse (docs/BENCHMARKS.md, "Fidelity").
CANDIDATES: tuple[CandidateSpec, ...] = (
    candidate_spec("m1 α=auto, rtn", "minmax", anti_outlier="m1", alpha="auto", weight_method="rtn"),
    candidate_spec("m1 α=0.8, rtn", "minmax", anti_outlier="m1", alpha=0.8, weight_method="rtn"),
    candidate_spec("m1 α=0.5, rtn", "minmax", anti_outlier="m1", alpha=0.5, weight_method="rtn"),
    candidate_spec("m1 α=0.8 range, rtn", "minmax", anti_outlier="m1", alpha=0.8, smooth_stat="range",
                   weight_method="rtn"),
    candidate_spec("m1 α=0.5 range, rtn", "minmax", anti_outlier="m1", alpha=0.5, smooth_stat="range",
                   weight_method="rtn"),
    candidate_spec("m1 α=auto range, rtn", "minmax", anti_outlier="m1", alpha="auto", smooth_stat="range",
                   weight_method="rtn"),
    candidate_spec("none, rtn", "minmax", anti_outlier="none", weight_method="rtn"),
    candidate_spec("m1 α=auto, gptq", "minmax", anti_outlier="m1", alpha="auto", weight_method="gptq"),
    candidate_spec("m1 α=0.8, gptq", "minmax", anti_outlier="m1", alpha=0.8, weight_method="gptq"),
    candidate_spec("m1 α=0.5, gptq", "minmax", anti_outlier="m1", alpha=0.5, weight_method="gptq"),
    candidate_spec("m1 α=0.8 range, gptq", "minmax", anti_outlier="m1", alpha=0.8, smooth_stat="range",
                   weight_method="gptq"),
    candidate_spec("m1 α=0.5 range, gptq", "minmax", anti_outlier="m1", alpha=0.5, smooth_stat="range",
                   weight_method="gptq"),
    candidate_spec("m1 α=auto range, gptq", "minmax", anti_outlier="m1", alpha="auto", smooth_stat="range",
                   weight_method="gptq"),
    candidate_spec("none, gptq", "minmax", anti_outlier="none", weight_method="gptq"),
    candidate_spec("m2, rtn (msModelSlim's recipe)", "m2", weight_method="rtn"),
    candidate_spec("m2, gptq", "m2", weight_method="gptq"),
    candidate_spec("hadamard, rtn", "hadamard", ("rotation",), weight_method="rtn"),
    candidate_spec("hadamard + m1 α=0.5, rtn", "hadamard", ("rotation",), anti_outlier="m1", alpha=0.5,
                   weight_method="rtn"),
    candidate_spec("hadamard + m1 α=0.5 range, rtn", "hadamard", ("rotation", "smooth_stat"), anti_outlier="m1",
                   alpha=0.5, smooth_stat="range", weight_method="rtn"),
    candidate_spec("hadamard, gptq", "hadamard", ("rotation",), weight_method="gptq"),
    candidate_spec("hadamard + m1 α=0.5, gptq", "hadamard", ("rotation",), anti_outlier="m1", alpha=0.5,
                   weight_method="gptq"),
    candidate_spec("hadamard + m1 α=0.5 range, gptq", "hadamard", ("rotation", "smooth_stat"), anti_outlier="m1",
                   alpha=0.5, smooth_stat="range", weight_method="gptq"),
)


#: ``--recipe auto --w_bit 4|8 --a_bit 16``: weight-only candidates (issue 28). The calibrations are the W8A8 tables'
#: min-max ones (the same session caches: a_bit is export-time); only their input moments serve here (GPTQ).
WEIGHT_ONLY_CALIBRATIONS: tuple[CalibrationSpec, ...] = (
    calibration_spec("hadamard", "Hadamard rotation, input moments", 1.2, ("rotation",),
                     anti_outlier="none", act_method=1, weight_method="gptq", rotation="hadamard"),
    calibration_spec("minmax", "float statistics, input moments", 1.0,
                     anti_outlier="none", act_method=1, weight_method="gptq"),
)
#: GPTQ (act order, static groups) before its round-to-nearest twin would be scored, finer groups first; a group
#: size that does not divide every quantized Linear of the model is left out (SmolLM2's 576 columns: 128 does not).
WEIGHT_ONLY_CANDIDATES: tuple[CandidateSpec, ...] = (
    candidate_spec("g128, rtn", "minmax", group_size=128, weight_method="rtn"),
    candidate_spec("g64, rtn", "minmax", group_size=64, weight_method="rtn"),
    candidate_spec("channel, rtn", "minmax", group_size=0, weight_method="rtn"),
    candidate_spec("g128, gptq act order", "minmax", group_size=128, weight_method="gptq", gptq_act_order=True),
    candidate_spec("g64, gptq act order", "minmax", group_size=64, weight_method="gptq", gptq_act_order=True),
    candidate_spec("g64, gptq", "minmax", group_size=64, weight_method="gptq", gptq_act_order=False),
    candidate_spec("channel, gptq act order", "minmax", group_size=0, weight_method="gptq", gptq_act_order=True),
    candidate_spec("hadamard g128, rtn", "hadamard", ("rotation",), group_size=128, weight_method="rtn"),
    candidate_spec("hadamard g64, rtn", "hadamard", ("rotation",), group_size=64, weight_method="rtn"),
    candidate_spec("hadamard g128, gptq act order", "hadamard", ("rotation",), group_size=128,
                   weight_method="gptq", gptq_act_order=True),
    candidate_spec("hadamard g64, gptq act order", "hadamard", ("rotation",), group_size=64, weight_method="gptq",
                   gptq_act_order=True),
    candidate_spec("hadamard channel, gptq act order", "hadamard", ("rotation",), group_size=0,
                   weight_method="gptq", gptq_act_order=True),
)


@dataclass(frozen=True)
class ScreenSpec:
    """The screening subset: a few image prompts (distinct photos first), text prompts, held-out tokens."""

    image_prompts: int = 2
    text_prompts: int = 1
    text_tokens: int = 510  # two 256-token windows: the float side is shared with the full evaluation


SCREEN = ScreenSpec()


def available(fields: tuple[tuple[str, Any], ...], requires: tuple[str, ...], base: QuantRecipe) -> bool:
    """Whether this llavaq's QuantRecipe has ``requires`` and accepts ``fields`` (capability probe)."""
    names = {f.name for f in dataclasses.fields(QuantRecipe)}
    if not set(requires) <= names or not {k for k, _ in fields} <= names:
        return False
    try:
        base.replace(**dict(fields))
    except (LlavaqError, TypeError, ValueError):
        return False
    return True
