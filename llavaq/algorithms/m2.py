"""msModelSlim anti-outlier "m2" = Outlier Suppression+ 1-D range search (per-channel scaling).

Given the (possibly shifted) activation ``x`` ``[B, N, C]`` feeding a group of linears whose
concatenated weight is ``weight`` ``[sum_out, C]``, search a clipping threshold ``t`` and derive the
per-channel scale ``s = scale_for_threshold(cmax, cmin, t)``.  The loss of a candidate is the MSE
between the float block output ``block_fn(x, weight)`` and the output with fake-quantized
``x / s`` (per-tensor asymmetric uint8 over ``[-t, t]``) and ``weight * s`` (per-row symmetric).
Smoothing is then applied as ``x / s`` (into the preceding norm) and ``W * s`` (columns).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from llavaq.quant.int8 import EPS

__all__ = [
    "scale_for_threshold",
    "migration_fake_quant_act",
    "migration_fake_quant_weight",
    "os_plus_search",
    "threshold_grid",
    "threshold_loss",
]

BlockFn = Callable[[Tensor, Tensor], Tensor]


def scale_for_threshold(cmx: Tensor, cmn: Tensor, t: float) -> Tensor:
    """Per-channel scale (>= 1) that brings channel ranges ``[cmn, cmx]`` inside ``[-t, t]``.

    ``t`` is a python float (as in the kernel's search loop).
    """
    one = torch.ones_like(cmx)
    up = torch.where(cmx > t, cmx / t, one)
    down = torch.where(cmn < -t, cmn / (-t), one)
    return torch.max(up, down)


def migration_fake_quant_act(x: Tensor, t: float, bits: int = 8) -> Tensor:
    """Asymmetric per-tensor uint8 fake quant over ``[-t, t]`` (division-based, as in the kernel).

    ``t`` is first cast to ``x.dtype``; scale and zero point are computed in that dtype.
    """
    return _fake_quant_act_(x.clone(), t, bits)


def _fake_quant_act_(x: Tensor, t: float, bits: int = 8) -> Tensor:
    """:func:`migration_fake_quant_act` in place on ``x`` (same operations in the same order)."""
    qmax = 2**bits - 1
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    scale = torch.clamp((t + t) / qmax, min=EPS)
    zp = torch.clamp(0 - torch.round(-t / scale), 0, qmax)
    return x.div_(scale).round_().add_(zp).clamp_(0, qmax).sub_(zp).mul_(scale)


def migration_fake_quant_weight(w: Tensor, bits: int = 8) -> Tensor:
    """Symmetric per-output-row fake quant with ``scale = max(|min|, |max|) / 127`` (>= EPS)."""
    return _fake_quant_weight_(w.clone(), bits)


def _fake_quant_weight_(w: Tensor, bits: int = 8) -> Tensor:
    """:func:`migration_fake_quant_weight` in place on ``w`` (same operations in the same order)."""
    qmax = 2 ** (bits - 1) - 1
    zero = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    mn, mx = torch.aminmax(w, dim=1)
    mn, mx = torch.minimum(mn, zero), torch.maximum(mx, zero)
    scale = torch.clamp(torch.maximum(-mn, mx) / qmax, min=EPS).unsqueeze(1)
    return w.div_(scale).round_().clamp_(-qmax, qmax).mul_(scale)


def _candidate_loss(x: Tensor, weight: Tensor, block_fn: BlockFn, cmx: Tensor, cmn: Tensor, t: float,
                    y_ref: Tensor) -> Tensor:
    """``((block_fn(fq(x/s), fq(W·s)) − y_ref)²).sum(−1).mean()`` for threshold ``t`` (0-d tensor)."""
    s = scale_for_threshold(cmx, cmn, t)
    y = block_fn(_fake_quant_act_(x / s, t), _fake_quant_weight_(weight * s))
    y.sub_(y_ref)
    return y.mul_(y).sum(-1).mean()


def os_plus_search(
    x: Tensor,
    weight: Tensor,
    block_fn: BlockFn,
    *,
    steps_min: int = 100,
    mode: str = "full",
    info: dict | None = None,
) -> Tensor:
    """Return the per-channel migration scale ``[C]`` chosen by the OS+ 1-D range search.

    ``num = max(steps_min, int(amax / 0.5))`` candidate thresholds are visited from
    ``max(-amin, amax)`` down to 0.1 in equal steps; the first minimum of
    ``((block_fn(fq(x/s), fq(W*s)) - block_fn(x, W))**2).sum(-1).mean()`` wins.
    ``mode="full"`` is the faithful exhaustive search; ``mode="fast"`` (:func:`_fast_search`) visits
    the same grid coarse-to-fine (about a third of the block forwards); it is not guaranteed to find
    the full search's threshold (loss curves can have several dips).
    ``info`` (optional) receives ``threshold``, ``loss``, ``evals`` (block forwards) and ``grid`` (size).
    """
    if mode == "fast":
        return _fast_search(x, weight, block_fn, steps_min, info)
    if mode != "full":
        raise ValueError(f"unsupported mode {mode!r}")
    with torch.no_grad():
        cmx = x.amax(dim=(0, 1))
        cmn = x.amin(dim=(0, 1))
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        amx = torch.maximum(x.max(), zero)
        amn = torch.minimum(x.min(), zero)
        y_ref = block_fn(x, weight)
        num = max(steps_min, int(amx / 0.5))
        # The threshold walk is done in python floats (float64), like the kernel; an fp32 tensor
        # walk drifts by ~1e-6 relative and is not bit-exact.
        hi = float(torch.maximum(-amn, amx).item())
        lo = 0.1
        step = (hi - lo) / num
        t = hi
        best_loss = None
        best_t = hi
        evals = 0
        while t >= lo:
            loss = _candidate_loss(x, weight, block_fn, cmx, cmn, t, y_ref)
            evals += 1
            if best_loss is None or loss < best_loss:
                best_loss, best_t = loss, t
            t = t - step
        if info is not None:
            info.update(threshold=best_t, loss=float(best_loss) if best_loss is not None else float("nan"),
                        evals=evals, grid=evals)
        return scale_for_threshold(cmx, cmn, best_t)


def threshold_grid(x: Tensor, steps_min: int = 100) -> list[float]:
    """The candidate thresholds of the full search, in its visiting order (same float arithmetic)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    amx = torch.maximum(x.max(), zero)
    amn = torch.minimum(x.min(), zero)
    num = max(steps_min, int(amx / 0.5))
    hi = float(torch.maximum(-amn, amx).item())
    lo = 0.1
    step = (hi - lo) / num
    out, t = [], hi
    while t >= lo:
        out.append(t)
        t = t - step
    return out or [hi]


def threshold_loss(x: Tensor, weight: Tensor, block_fn: BlockFn, t: float, y_ref: Tensor | None = None) -> Tensor:
    """The search's loss for threshold ``t`` (the quantity both modes minimise)."""
    with torch.no_grad():
        cmx = x.amax(dim=(0, 1))
        cmn = x.amin(dim=(0, 1))
        y_ref = block_fn(x, weight) if y_ref is None else y_ref
        return _candidate_loss(x, weight, block_fn, cmx, cmn, t, y_ref)


def fast_search_index(x: Tensor, weight: Tensor, block_fn: BlockFn, steps_min: int = 100,
                      losses_out: dict[int, float] | None = None, windows: int = 2) -> tuple[list[float], int, int]:
    """Coarse-to-fine over the full grid: every k-th candidate (k = isqrt(n)), then every candidate
    within k of the best ``windows`` coarse points (two by default, so that a second dip next to the
    coarse winner is still refined). Ties go to the earlier candidate, as in the full search.

    Returns (grid, index of the chosen threshold, number of block forwards evaluated).
    """
    with torch.no_grad():
        cmx = x.amax(dim=(0, 1))
        cmn = x.amin(dim=(0, 1))
        grid = threshold_grid(x, steps_min)
        y_ref = block_fn(x, weight)
        losses: dict[int, float] = {}

        def loss(i: int) -> float:
            if i not in losses:
                losses[i] = float(_candidate_loss(x, weight, block_fn, cmx, cmn, grid[i], y_ref))
            return losses[i]

        n = len(grid)
        k = max(1, math.isqrt(n))
        coarse = sorted(set(range(0, n, k)) | {n - 1})
        ranked = sorted(coarse, key=lambda i: (loss(i), i))
        for c in ranked[:windows]:
            for i in range(max(0, c - k + 1), min(n, c + k)):
                loss(i)
        best = min(losses, key=lambda i: (losses[i], i))
        if losses_out is not None:
            losses_out.update(losses)
        return grid, best, len(losses)


def _fast_search(x: Tensor, weight: Tensor, block_fn: BlockFn, steps_min: int, info: dict | None = None) -> Tensor:
    losses: dict[int, float] = {}
    grid, best, evals = fast_search_index(x, weight, block_fn, steps_min, losses)
    if info is not None:
        info.update(threshold=grid[best], loss=losses[best], evals=evals, grid=len(grid))
    return scale_for_threshold(x.amax(dim=(0, 1)), x.amin(dim=(0, 1)), grid[best])
