"""Per-group SmoothQuant alpha search (``--anti_outlier m1 --alpha auto``).

For each smoothing group (norm → Linears, or Linear → Linear with ``--smooth_vo``) we try alpha on a
grid and keep the one whose W8A8 fake-quantized output is closest to the float output, on the cached
float activation rows of the group's input (``float.<first linear>.rows``, unsmoothed float model):

* smoothing ``x' = (x − z)/s``, ``W' = W·diag(s)`` with the SmoothQuant scale for that alpha;
* activations: per-tensor asymmetric int8, min-max of the smoothed rows (the static range);
* weights: per-channel symmetric int8;
* error: per Linear, ``‖Q(x')Q(W')ᵀ − x'W'ᵀ‖²`` normalised by ``‖x'W'ᵀ‖²`` (so q/k/v or gate/up weigh
  equally), summed over the group; for Llama gate/up the SwiGLU block output ``silu(g)·u`` is compared
  instead (it is token-wise, so the sampled rows suffice).

α = 0.5 is on the grid, so the chosen alpha never does worse than SmoothQuant's default on this error.
Without rows (cache made with ``activation_sample_tokens=0``) alpha falls back to 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llavaq.algorithms.smoothing import expand_heads, smoothquant_scale
from llavaq.quant.int8 import activation_qparams, fake_quant_activation, fake_quant_weight, weight_qparams

if TYPE_CHECKING:
    from llavaq.model.llava import SmoothGroup

ALPHA_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
FALLBACK_ALPHA = 0.5


def group_error(
    group: SmoothGroup,
    rows: torch.Tensor,
    weights: Sequence[torch.Tensor],
    act_absmax: torch.Tensor,
    shift: torch.Tensor | None,
    alpha: float,
) -> float:
    """The quantized-vs-float output error of a smoothing group at one alpha (see module docstring)."""
    x = rows.float()
    heads = group.heads
    if shift is not None:
        x = x - (expand_heads(shift, heads) if heads is not None else shift).float()
    ws = [w.float() for w in weights]
    s = smoothquant_scale(act_absmax, ws, alpha, heads=heads)
    if heads is not None:
        s = expand_heads(s, heads)
    xs = x / s
    lo, hi = xs.min().reshape(1), xs.max().reshape(1)
    a_scale, a_off = activation_qparams(lo, hi)
    xq = fake_quant_activation(xs, a_scale, a_off)
    outs_f, outs_q = [], []
    for w in ws:
        w_s = w * s
        wq = fake_quant_weight(w_s, weight_qparams(w_s))
        outs_f.append(xs @ w_s.T)
        outs_q.append(xq @ wq.T)
    if group.kind == "llama_gate_up" and len(ws) == 2:
        outs_f = [F.silu(outs_f[0]) * outs_f[1]]
        outs_q = [F.silu(outs_q[0]) * outs_q[1]]
    err = 0.0
    for yf, yq in zip(outs_f, outs_q, strict=True):
        err += float(((yq - yf) ** 2).sum() / (yf**2).sum().clamp(min=1e-30))
    return err


def search_group_alpha(
    group: SmoothGroup,
    rows: torch.Tensor | None,
    weights: list[torch.Tensor],
    act_absmax: torch.Tensor,
    shift: torch.Tensor | None,
    grid: Sequence[float] = ALPHA_GRID,
) -> float:
    """The alpha on ``grid`` minimising :func:`group_error` (first minimum; 0.5 without rows)."""
    if rows is None or rows.numel() == 0:
        return FALLBACK_ALPHA
    best, best_err = FALLBACK_ALPHA, group_error(group, rows, weights, act_absmax, shift, FALLBACK_ALPHA)
    for a in grid:
        e = group_error(group, rows, weights, act_absmax, shift, a)
        if e < best_err:
            best, best_err = float(a), e
    return best
