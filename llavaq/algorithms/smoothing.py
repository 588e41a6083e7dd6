"""Folding smoothing (scale s, optional shift z) into a norm and the Linears it feeds.

The same two functions serve calibration (in place on live layer parameters) and export (on
tensors re-read from the checkpoint), in the same operation order msModelSlim uses, so the
exported float tensors are bit-identical to the ones the calibration ran with.

Equivalence: ``W·diag(s)·((γ⊙n + β − z)/s) + (b + W z) = W(γ⊙n + β) + b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llavaq.model.llava import SmoothGroup


@torch.no_grad()
def fold_shift(weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], shift: torch.Tensor) -> None:
    """``b += z @ Wᵀ`` for each Linear (weights not yet scaled). In place."""
    for w, b in zip(weights, biases, strict=True):
        if b is not None:
            b += shift @ w.T


@torch.no_grad()
def fold_scale(
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> None:
    """``W *= s`` (per input column), ``γ /= s``, ``β = (β − z)/s``. In place."""
    for w in weights:
        w *= scale
    if norm_bias is not None and shift is not None:
        norm_bias -= shift
    norm_weight /= scale
    if norm_bias is not None:
        norm_bias /= scale


def channel_shift(x: torch.Tensor) -> torch.Tensor:
    """z = (max_c + min_c)/2 per channel over batch and tokens (msModelSlim's order of reductions)."""
    cmax = x.max(0)[0].max(0)[0]
    cmin = x.min(0)[0].min(0)[0]
    return (cmax + cmin) / 2


def smoothquant_scale(
    act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant: s_c = max|X_c|^α / max|W_c|^(1−α), over all Linears of the group, clamped to ≥ eps."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    a = act_absmax.float().clamp(min=eps)
    w = w_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return s.clamp(min=eps)


def smoothquant_group(
    group: SmoothGroup,
    ch_min: torch.Tensor,
    ch_max: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: float | str,
    rows: torch.Tensor | None = None,
    info: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SmoothQuant (m1) scale, and shift z for LayerNorm groups, from float per-channel statistics.

    ``alpha="auto"`` picks alpha per group by minimising the quantized block-output error on the
    cached activation rows (:mod:`llavaq.algorithms.alpha_search`). The alpha used is stored in
    ``info["alpha"]`` when ``info`` is given.
    """
    shift = (ch_max + ch_min) / 2 if group.shift else None
    absmax = (ch_max - ch_min) / 2 if group.shift else torch.maximum(ch_max.abs(), ch_min.abs())
    if isinstance(alpha, str):
        from llavaq.algorithms.alpha_search import search_group_alpha

        alpha = search_group_alpha(group, rows, weights, absmax, shift)
    if info is not None:
        info["alpha"] = float(alpha)
    return smoothquant_scale(absmax, weights, float(alpha)), shift
