"""The tuner's steps (package docstring of :mod:`llavaq.tuning`, steps 3 to 5), each a function over its state."""

from __future__ import annotations

import math

from llavaq.recipe import QuantRecipe
from llavaq.tuning.selection import TuningRow, rank, twin
from llavaq.tuning.tables import CHEAP_CALIBRATION, GPTQ_TWINS, CandidateSpec, available
from llavaq.tuning.tuner import Tuner


def run_candidates(t: Tuner, calibration: str) -> None:
    """Score a calibration's round-to-nearest candidates — on the screening subset first, then the best
    :data:`FINALISTS` in full (of an extra calibration: only those that beat the finalists so far) — and
    then, in full, the GPTQ twins of the best :data:`GPTQ_TWINS` of them (GPTQ refines a smoothing that
    already won; its export costs several round-to-nearest ones)."""
    cands = t.candidates_of(calibration)
    twins = {c.name: twin(c, [d for d, _ in cands]) for c, _ in cands}
    first = [(c, r) for c, r in cands if twins[c.name] is None]
    stage = "screen" if t.screen_data is not None else "full"
    mandatory = calibration == t.base_name
    t.progress.stage(f"tuning: {'screening' if stage == 'screen' else 'scoring'} {calibration} candidates",
                     len(first))
    rows = _score_all(t, first, calibration, stage, mandatory)
    full = rows if stage == "full" else _finalists(t, rows, calibration, mandatory)
    best = {r.candidate for r in sorted((r for r in full if r.scored), key=rank)[:GPTQ_TWINS]}
    second = [(c, r) for c, r in cands if twins[c.name] is not None and twins[c.name] in best]
    for c, _ in cands:
        if twins[c.name] is not None and twins[c.name] not in best:
            t.notes.append(f"{c.name} not scored: its round-to-nearest twin ({twins[c.name]}) is not among the "
                           f"best {GPTQ_TWINS} of this calibration scored in full")
    _score_all(t, second, calibration, "full", False)


def _finalists(t: Tuner, rows: list[TuningRow], calibration: str, mandatory: bool) -> list[TuningRow]:
    """The best few screened rows — meeting the target on the subset first, then by KL — scored in full
    from the same exports; returns their full rows."""
    ranked = sorted((r for r in rows if r.scored), key=rank)[: t.finalists]
    others = sorted(rank(r) for r in t.rows if r.stage == "screen" and r.scored
                     and r.calibration != calibration)
    bar = others[t.finalists - 1] if len(others) >= t.finalists and not mandatory else (True, math.inf)
    picked = [r for r in ranked if rank(r) < bar]
    t.pending = {t.row_export[id(r)] for r in picked if id(r) in t.row_export}
    t.prune()
    t.progress.stage(f"tuning: scoring the best {calibration} candidates on the whole evaluation set",
                     len(picked))
    full = []
    for i, r in enumerate(picked):
        recipe = t.recipes[id(r)]
        if (i or not mandatory) and not t.fits(t.estimate("full")):
            t.skip(r.candidate, calibration, recipe, "full", "time budget")
            continue
        full.append(t.score(r.candidate, calibration, recipe, "full"))
        t.pending.discard(t.row_export.get(id(r), ""))
        t.prune()
        t.progress.advance()
    t.pending = set()
    t.prune()
    return full


def _score_all(t: Tuner, cands: list[tuple[CandidateSpec, QuantRecipe]], calibration: str, stage: str,
               mandatory: bool) -> list[TuningRow]:
    rows = []
    for i, (c, recipe) in enumerate(cands):
        if (i or not mandatory) and not t.fits(t.estimate(stage)):
            t.skip(c.name, calibration, recipe, stage, "time budget")
            continue
        rows.append(t.score(c.name, calibration, recipe, stage))
        if stage == "screen":  # keep the exports of the best few: they are scored in full next
            ranked = sorted((r for r in t.rows if r.stage == "screen" and r.scored
                             and r.calibration == calibration), key=rank)[: t.finalists]
            t.prune({t.row_export[id(r)] for r in ranked if id(r) in t.row_export})
        else:
            t.prune()
        t.progress.advance()
    return rows


def extra_calibrations(t: Tuner) -> None:
    """The other calibrations of the table: the cheap ones, the others only within a time budget."""
    for spec in t.calibration_table:
        if spec.name == t.base_name or not available(spec.fields, spec.requires, t.base):
            continue
        n = len(t.candidates_of(spec.name))
        if not n:
            continue
        per = t.estimate("screen" if t.screen_data is not None else "full")
        unit = t.cal_seconds.get(t.base_name, 0.0) / t.spec(t.base_name).cost
        est = unit * spec.cost + n * per + t.estimate("full")
        if t.budget is None and t.met():
            t.notes.append(f"{spec.name} ({spec.label}) not calibrated: the target is met; pass --time_budget "
                           f"to try it too (about {est:.0f}s)")
            continue
        if t.budget is None and spec.cost > CHEAP_CALIBRATION:
            t.notes.append(f"{spec.name} ({spec.label}) not calibrated: about {est:.0f}s more; pass "
                           f"--time_budget to try it")
            continue
        if not t.fits(est):
            t.notes.append(f"{spec.name} ({spec.label}) not calibrated: needs about {est:.0f}s, more than "
                           "the time budget leaves")
            continue
        t.calibrate(spec)
        run_candidates(t, spec.name)


def fallback(t: Tuner, n_quantized: int, max_float_fraction: float) -> None:
    """Keep the most sensitive Linears of the lowest-KL candidate in float: the cap first; if that meets the
    target, the fewest that still do (bisection; every N keeps a prefix of the same sensitivity ranking)."""
    full = [r for r in t.full_rows() if r.stage == "full"]
    if not full:
        return
    best = min(full, key=lambda r: r.kl)
    recipe, calibration = t.recipes[id(best)], best.calibration
    cap = max(1, int(n_quantized * max_float_fraction))
    t.progress.stage(f"tuning: keeping the most sensitive Linears of {best.candidate} in float",
                     1 + max(0, math.ceil(math.log2(cap))))
    if not t.fits(t.estimate("fallback")):
        t.skip(f"{best.candidate}, keep_float {cap}", calibration, recipe.replace(keep_float=cap), "fallback",
               "time budget")
        t.notes.append("no fallback: the time budget is spent")
        return
    top = t.score(f"{best.candidate}, keep_float {cap}", calibration, recipe.replace(keep_float=cap),
                  "fallback")
    t.progress.advance()
    if not top.meets:
        t.notes.append(f"keeping the {cap} most sensitive Linears ({max_float_fraction:.0%} of {n_quantized} "
                       f"quantized, the cap) in float does not meet the target either")
        return
    ranking, errors = top.float_linears, top.float_errors
    lo, hi = 0, cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        name = f"{best.candidate}, keep_float {mid}"
        step = recipe.replace(float_linears=tuple(sorted(ranking[:mid])))
        if not t.fits(t.estimate("fallback")):
            t.skip(name, calibration, step, "fallback", "time budget")
            t.notes.append(f"fallback stopped at keep_float {hi}: the time budget is spent")
            return
        row = t.score(name, calibration, step, "fallback", {n: errors.get(n) for n in ranking[:mid]})
        t.progress.advance()
        lo, hi = (lo, mid) if row.meets else (mid, hi)
        t.prune()
