"""What a session cache holds, per Linear and per smoothing group: activation parameters, clipping ratios,
outlier channels, smoothing scales and m2 search results (``llavaq inspect CACHE`` and the outputs' tables)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llavaq.calib.cache import SessionCache
from llavaq.errors import LlavaqError
from llavaq.model.checkpoint import Checkpoint
from llavaq.model.llava import LlavaArch

OUTLIER_FACTOR = 6.0  # a channel is an outlier when its float |x|max exceeds 6× the median channel's
#: the m2 search results a cache records per group (caches since llavaq 0.1.0)
M2_KEYS = ("threshold", "loss", "evals", "screened", "grid")

Smoothing = tuple[torch.Tensor, torch.Tensor | None]


def outlier_channels(mn: torch.Tensor, mx: torch.Tensor, factor: float = OUTLIER_FACTOR) -> list[int]:
    """Channels whose float absmax exceeds ``factor`` × the median channel absmax."""
    amax = torch.maximum(mn.abs(), mx.abs()).float()
    med = amax.median()
    return [int(i) for i in (amax > factor * med).nonzero().flatten()] if med > 0 else []


def cache_statistics(cache_path: Path) -> dict[str, Any]:
    """Per-Linear activation params, clipping ratios and outliers, and per-group smoothing stats.

    Clipping ratio = calibrated range ``x_max − x_min`` / the float model's full range of the same
    (smoothed) input over all samples; < 1 means the observer clipped outliers.
    """

    cache = SessionCache.load(cache_path)
    man = cache.manifest
    records = {st: cache.read_stage(st) for st in man.get("stages_done", [])}
    try:
        arch = LlavaArch(Checkpoint(man.get("model_path", "")))
    except (LlavaqError, OSError):
        arch = None  # model moved: smoothing can't be mapped to its Linears, report raw stats
    group_of, first_of = _smoothing_map(arch, records)
    linears: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    for stage, rec in records.items():
        for key in rec:
            if key.startswith("act.") and key.endswith(".input_scale"):
                lin = key[len("act."): -len(".input_scale")]
                linears[lin] = _linear_stats(stage, rec, lin, group_of.get(lin), arch is not None)
            elif key.startswith("smooth.") and key.endswith(".scale"):
                groups.append(_group_stats(stage, rec, key[len("smooth."): -len(".scale")], first_of))
    moments = {k[len("hess."): -len(".cov")]: rec[k].numel() * rec[k].element_size()
               for rec in records.values() for k in rec if k.startswith("hess.") and k.endswith(".cov")}
    return {"manifest": man, "linears": linears, "groups": groups, "problems": _problems(cache, records, linears),
            "model_found": arch is not None, "input_moments": {"inputs": len(moments), "bytes": sum(moments.values())}}


def _smoothing_map(arch: Any, records: dict[str, dict]) -> tuple[dict[str, Smoothing], dict[str, str]]:
    """Each smoothed Linear -> its group's (scale, shift); each group -> its first Linear (needs the model)."""
    group_of: dict[str, Smoothing] = {}
    first_of: dict[str, str] = {}
    if arch is None:
        return group_of, first_of
    for st in arch.stages():
        rec = records.get(st.name, {})
        for g in arch.smooth_groups(st):
            if f"smooth.{g.name}.scale" in rec:
                for lin in g.linears:
                    group_of[lin] = (rec[f"smooth.{g.name}.scale"], rec.get(f"smooth.{g.name}.shift"))
            first_of[g.name] = g.linears[0]
    return group_of, first_of


def _linear_stats(stage: str, rec: dict, lin: str, sm: Smoothing | None, have_model: bool) -> dict[str, Any]:
    """A Linear's activation parameters, outlier channels and clipping ratio (against the smoothed float range)."""
    d: dict[str, Any] = {"stage": stage}
    for k in ("input_scale", "input_offset", "x_min", "x_max"):
        d[k] = float(rec[f"act.{lin}.{k}"].item())
    mn, mx = rec.get(f"float.{lin}.min"), rec.get(f"float.{lin}.max")
    if mn is None or mx is None:
        return d
    d["outlier_channels"] = outlier_channels(mn, mx)
    if sm is None and not have_model:
        return d
    if sm is not None:
        z = sm[1] if sm[1] is not None else torch.zeros_like(sm[0])
        lo, hi = float(((mn - z) / sm[0]).min()), float(((mx - z) / sm[0]).max())
    else:
        lo, hi = float(mn.min()), float(mx.max())
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    d["float_range"] = [lo, hi]
    rng = max(d["x_max"], 0.0) - min(d["x_min"], 0.0)
    d["clip_ratio"] = rng / (hi - lo) if hi > lo else None
    return d


def _group_stats(stage: str, rec: dict, gname: str, first_of: dict[str, str]) -> dict[str, Any]:
    """A smoothing group's scale range, shift, m2 search result and input outlier channels."""
    s = rec[f"smooth.{gname}.scale"].float()
    g = {"group": gname, "stage": stage, "channels": s.numel(), "scale_min": float(s.min()),
         "scale_max": float(s.max()), "scale_mean": float(s.mean()), "shift": f"smooth.{gname}.shift" in rec}
    if f"m2.{gname}.threshold" in rec:  # what the m2 search found (caches since llavaq 0.1.0)
        g.update({f"m2_{k}": float(rec[f"m2.{gname}.{k}"]) for k in M2_KEYS if f"m2.{gname}.{k}" in rec})
    first = first_of.get(gname)
    if first and f"float.{first}.min" in rec:
        g["outlier_channels"] = outlier_channels(rec[f"float.{first}.min"], rec[f"float.{first}.max"])
    return g


def _problems(cache: Any, records: dict[str, dict], linears: dict[str, dict[str, Any]]) -> list[str]:
    problems = []
    if not cache.complete:
        problems.append(f"{cache.path / 'manifest.json'}: calibration is incomplete "
                        f"({len(records)} stage(s) done); run calibrate to resume")
    for lin, d in linears.items():
        if not all(math.isfinite(d[k]) for k in ("input_scale", "input_offset", "x_min", "x_max")):
            problems.append(f"{cache.stage_file(d['stage']).name}: act.{lin} has NaN/Inf")
        elif d["input_offset"] != round(d["input_offset"]) or not -128 <= d["input_offset"] <= 127:
            problems.append(f"{cache.stage_file(d['stage']).name}: act.{lin}.input_offset is not an int8 value")
    return problems
