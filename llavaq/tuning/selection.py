"""Pure selection: the rows of the tuning table, the target rule's messages, ranking and the choice."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from llavaq.tuning.tables import CandidateSpec
from llavaq.verify import FidelityReport, target_misses


@dataclass
class TuningRow:
    """One scored (or skipped) candidate: a row of the tuning table."""

    candidate: str
    calibration: str
    stage: str  # "screen" | "full" | "fallback"
    recipe: dict[str, Any]
    status: str = "scored"  # "scored" | "resumed" | "skipped: <why>"
    score: dict[str, Any] | None = None
    #: Linears kept in float beyond the module preset, most sensitive first, with their W8A8 error (None: unmeasured)
    float_errors: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    meets: bool | None = None
    failed: list[str] = field(default_factory=list)

    @property
    def kl(self) -> float:
        return self.score["kl"] if self.score else math.inf

    @property
    def scored(self) -> bool:
        return self.score is not None

    @property
    def float_linears(self) -> list[str]:
        return list(self.float_errors)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["float_linears"] = self.float_linears
        return d


SCORE_KEYS = ("ppl_fp", "ppl_q", "ppl_increase", "text_tokens", "text_top1", "text_kl", "image_top1", "image_kl",
              "image_positions", "text_prompt_top1", "text_prompt_kl", "text_prompt_positions", "top1", "kl")
RECIPE_KEYS = ("anti_outlier", "alpha", "act_method", "modules", "m2_search", "weight_method", "keep_float",
               "rotation", "smooth_vo", "smooth_stat")


def score_of(report: FidelityReport) -> dict[str, Any]:
    """What the tuner keeps of a verify report (:data:`SCORE_KEYS`)."""
    d = report.to_dict()
    d["ppl_increase"] = report.ppl_increase
    return {k: d.get(k) for k in SCORE_KEYS}


def target_gaps(score: dict[str, Any], max_ppl_increase: float, min_top1: float) -> list[str]:
    """The missed checks of :func:`llavaq.verify.target_misses` (``verify``'s rule), each with by how much."""
    gaps = []
    for m in target_misses(score, max_ppl_increase, min_top1):
        if m.check == "perplexity":
            gaps.append("no perplexity (held-out text needed)" if m.value is None else
                        f"perplexity {m.value:+.2f} % > {m.limit:+g} % (by {m.value - m.limit:.2f} points)")
        else:
            gaps.append(f"top-1 on {m.what} {m.value:.4f} < {m.limit:g} (by {m.limit - m.value:.4f})")
    return gaps


def choose(rows: list[TuningRow]) -> tuple[TuningRow, bool]:
    """The lowest KL among the rows scored in full meeting the target (fewest float Linears first), else the
    lowest KL; and whether it meets the target."""
    rows = [r for r in rows if r.stage in ("full", "fallback") and r.scored]
    passing = [r for r in rows if r.meets]
    if passing:
        return min(passing, key=lambda r: (len(r.float_errors), r.kl)), True
    return min(rows, key=lambda r: (r.kl, len(r.float_errors))), False


def rank(row: TuningRow) -> tuple[bool, float]:
    """Screening order: meeting the target (on the subset) first, then the lowest KL."""
    return bool(row.failed), row.kl


def twin(c: CandidateSpec, table: list[CandidateSpec]) -> str | None:
    """The round-to-nearest candidate a GPTQ candidate differs from only by its weights, if the table has it."""
    fields = dict(c.fields)
    if fields.get("weight_method") != "gptq":
        return None
    want = {**fields, "weight_method": "rtn"}
    return next((d.name for d in table if d.calibration == c.calibration and dict(d.fields) == want), None)


def fmt_value(x: Any, spec: str = ".4f") -> str:
    """A number for a table: ``–`` for None."""
    return "–" if x is None else format(x, spec)
