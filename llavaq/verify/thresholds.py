"""The one pass/fail rule: ``verify --max_ppl_increase P --min_top1 T`` and ``quantize --recipe auto``'s target."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llavaq.verify.metrics import FidelityReport

#: The score fields the rule reads (a :class:`FidelityReport`'s, or a stored score's).
RULE_FIELDS = ("ppl_increase", "text_top1", "image_top1", "top1")


@dataclass(frozen=True)
class Miss:
    """One failed check: ``perplexity`` (``value`` None: no held-out text was scored) or ``top1`` on ``what``."""

    check: str
    what: str
    value: float | None
    limit: float


def target_misses(score: Mapping[str, float | None], max_ppl_increase: float | None,
                  min_top1: float | None) -> list[Miss]:
    """The failed checks of ``score`` (keys :data:`RULE_FIELDS`); a limit of None is not checked.

    Δppl (percent) ≤ ``max_ppl_increase``, and no perplexity fails it. ``min_top1`` must hold for the held-out
    text *and* for the answers to image prompts, each (a recipe that buys text fidelity with image fidelity is
    not a pass); with neither scored, for the pooled top-1.
    """
    misses = []
    if max_ppl_increase is not None:
        inc = score.get("ppl_increase")
        if inc is None or inc > max_ppl_increase:
            misses.append(Miss("perplexity", "held-out text", inc, max_ppl_increase))
    if min_top1 is not None:
        parts = [(what, score.get(k)) for what, k in (("held-out text", "text_top1"),
                                                      ("image-prompt answers", "image_top1"))
                 if score.get(k) is not None]
        for what, t1 in parts or [("all scored positions", score.get("top1"))]:
            if t1 is not None and t1 < min_top1:
                misses.append(Miss("top1", what, t1, min_top1))
    return misses


def report_score(report: FidelityReport) -> dict[str, float | None]:
    """The fields of ``report`` the rule reads."""
    return {"ppl_increase": report.ppl_increase, "text_top1": report.text_top1, "image_top1": report.image_top1,
            "top1": report.top1}


def check_thresholds(report: FidelityReport, max_ppl_increase: float | None, min_top1: float | None) -> list[str]:
    """The failed checks of :func:`target_misses`, as ``verify``'s one-line messages."""
    failed = []
    for m in target_misses(report_score(report), max_ppl_increase, min_top1):
        if m.check == "perplexity":
            failed.append("--max_ppl_increase needs held-out text (--text)" if m.value is None
                          else f"perplexity +{m.value:.2f}% > {m.limit:g}%")
        else:
            failed.append(f"top-1 agreement on {m.what} {m.value:.4f} < {m.limit:g}")
    return failed
