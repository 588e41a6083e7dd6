"""SmoothQuant (m1) for one smoothing group from float statistics: the scale, and the shift where the group
takes one, with α given or searched (``--alpha auto``, :mod:`llavaq.algorithms.alpha_search`).

The activation statistic per channel (``stat``):

* ``"absmax"`` (default, the SmoothQuant paper's): ``max|X_c|`` — for groups that are centred by a shift
  (LayerNorm with a bias) the half-range ``(max_c − min_c)/2`` of the centred input;
* ``"range"``: ``max_c − min_c`` for every group (llm-compressor's statistic). For centred groups it is the
  same scale up to a constant factor (which changes no integer), for RMSNorm groups it is not: a channel
  whose values span both signs counts its whole span, as the per-tensor asymmetric int8 range sees it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llavaq.algorithms.alpha_search import search_group_alpha
from llavaq.algorithms.smoothing import reduce_heads, smoothquant_scale

if TYPE_CHECKING:
    from llavaq.model.llava import SmoothGroup


def smoothquant_group(
    group: SmoothGroup,
    ch_min: torch.Tensor,
    ch_max: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: float | str,
    rows: torch.Tensor | None = None,
    info: dict | None = None,
    stat: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SmoothQuant (m1) scale, and shift z for groups that take one, from float per-channel statistics.

    ``ch_min``/``ch_max`` are per input channel of the group's Linears (for a GQA attention output, per
    query-head channel: scale and shift come out per KV channel). ``alpha="auto"`` picks alpha per group
    by minimising the quantized output error on the cached activation rows. The alpha used is stored in
    ``info["alpha"]`` when ``info`` is given. ``stat`` is the activation statistic (module docstring).
    """
    heads = group.heads
    if heads is not None:
        ch_min, ch_max = reduce_heads(ch_min, heads, "min"), reduce_heads(ch_max, heads, "max")
    shift = (ch_max + ch_min) / 2 if group.shift else None
    absmax = act_statistic(ch_min, ch_max, group.shift, stat)
    if isinstance(alpha, str):
        alpha = search_group_alpha(group, rows, weights, absmax, shift)
    if info is not None:
        info["alpha"] = float(alpha)
    return smoothquant_scale(absmax, weights, float(alpha), heads=heads), shift



def act_statistic(ch_min: torch.Tensor, ch_max: torch.Tensor, centred: bool, stat: str = "absmax") -> torch.Tensor:
    """The per-channel activation statistic SmoothQuant balances against the weights (module docstring)."""
    if stat not in ("absmax", "range"):
        raise ValueError(f"unknown SmoothQuant statistic {stat!r}")
    if centred:
        return (ch_max - ch_min) / 2
    if stat == "range":
        return ch_max - ch_min
    return torch.maximum(ch_max.abs(), ch_min.abs())
