"""SmoothQuant (m1) for one smoothing group from float statistics: the scale, and the shift where the group
takes one, with α given or searched (``--alpha auto``, :mod:`llavaq.algorithms.alpha_search`)."""

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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SmoothQuant (m1) scale, and shift z for groups that take one, from float per-channel statistics.

    ``ch_min``/``ch_max`` are per input channel of the group's Linears (for a GQA attention output, per
    query-head channel: scale and shift come out per KV channel). ``alpha="auto"`` picks alpha per group
    by minimising the quantized output error on the cached activation rows. The alpha used is stored in
    ``info["alpha"]`` when ``info`` is given.
    """
    heads = group.heads
    if heads is not None:
        ch_min, ch_max = reduce_heads(ch_min, heads, "min"), reduce_heads(ch_max, heads, "max")
    shift = (ch_max + ch_min) / 2 if group.shift else None
    absmax = (ch_max - ch_min) / 2 if group.shift else torch.maximum(ch_max.abs(), ch_min.abs())
    if isinstance(alpha, str):
        alpha = search_group_alpha(group, rows, weights, absmax, shift)
    if info is not None:
        info["alpha"] = float(alpha)
    return smoothquant_scale(absmax, weights, float(alpha), heads=heads), shift
