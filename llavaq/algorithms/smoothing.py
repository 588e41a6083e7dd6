"""Folding smoothing (scale s, optional shift z) into the float weights, and the SmoothQuant scale formula.

The fold functions serve calibration (in place on live layer parameters) and export (on tensors re-read
from the checkpoint), in the same operation order msModelSlim uses, so the exported float tensors are
bit-identical to the ones the calibration ran with.

Norm → Linears: ``W·diag(s)·((γ⊙n + β − z)/s) + (b + W z) = W(γ⊙n + β) + b``.
Linear → Linear (``--smooth_vo``): the source's output rows and bias are divided by s (after subtracting z),
the destination's input columns multiplied by s (its bias gains ``W z``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    act_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float, eps: float = 1e-5,
    heads: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """SmoothQuant: s_c = max|X_c|^α / max|W_c|^(1−α), over all Linears of the group, clamped to ≥ eps.

    ``act_absmax`` is per smoothing channel. With ``heads = (query heads, KV heads, head dim)`` the Linears
    read an attention output whose query heads share KV heads (GQA): a smoothing channel is a KV channel
    (``act_absmax`` already reduced with :func:`reduce_heads`), the weights' columns are reduced the same way,
    and one scale per KV channel is returned (:func:`expand_heads` maps it to the Linears' columns).
    """
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    if heads is not None:
        w_absmax = reduce_heads(w_absmax, heads, "max")
    a = act_absmax.float().clamp(min=eps)
    w = w_absmax.float().clamp(min=eps)
    s = a.pow(alpha) / w.pow(1 - alpha)
    return s.clamp(min=eps)


def reduce_heads(x: torch.Tensor, heads: tuple[int, int, int], how: str) -> torch.Tensor:
    """Per-channel values of an attention output (query heads × head dim) reduced over the query heads that
    read the same KV head (``how`` = "max" or "min"): KV heads × head dim."""
    n_heads, n_kv, head_dim = heads
    v = x.reshape(n_kv, n_heads // n_kv, head_dim)
    return (v.amax(1) if how == "max" else v.amin(1)).reshape(n_kv * head_dim)


def expand_heads(x: torch.Tensor, heads: tuple[int, int, int]) -> torch.Tensor:
    """Per-KV-channel values repeated for every query head that reads that KV head (transformers' repeat_kv)."""
    n_heads, n_kv, head_dim = heads
    return x.reshape(n_kv, 1, head_dim).expand(n_kv, n_heads // n_kv, head_dim).reshape(n_heads * head_dim)


@torch.no_grad()
def fold_pair(
    src_weight: torch.Tensor, src_bias: torch.Tensor | None, dst_weight: torch.Tensor, dst_bias: torch.Tensor | None,
    scale: torch.Tensor, shift: torch.Tensor | None = None, heads: tuple[int, int, int] | None = None,
) -> None:
    """Smoothing between two Linears whose connection is linear per channel (v_proj → attention → o_proj,
    up_proj → ·silu(gate) → down_proj): the source's output rows become ``(y − z)/s``, the destination's input
    columns absorb ``s`` and its bias ``W z``. In place; exact in float (attention rows sum to 1, so a shift of
    V shifts the attention output by the same amount).
    """
    s_in = expand_heads(scale, heads) if heads is not None else scale
    if shift is not None:
        z_in = expand_heads(shift, heads) if heads is not None else shift
        if dst_bias is not None:
            dst_bias += z_in @ dst_weight.T
        if src_bias is not None:
            src_bias -= shift
    dst_weight *= s_in
    src_weight /= scale.unsqueeze(1)
    if src_bias is not None:
        src_bias /= scale
