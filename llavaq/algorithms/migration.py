"""The fake quantization of msModelSlim's m2 migration kernel: the per-channel scale a clipping threshold
implies, and the uint8 activation / int8 per-row weight fake quant its search loss uses."""

from __future__ import annotations

import torch
from torch import Tensor

from llavaq.quant.int8 import EPS


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
    return fake_quant_act_(x.clone(), t, bits)


def act_qparams(t: float, x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the uint8 grid over ``[-t, t]``, computed in ``x``'s dtype as the kernel does."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    scale = torch.clamp((t + t) / qmax, min=EPS)
    return scale, torch.clamp(0 - torch.round(-t / scale), 0, qmax)


def fake_quant_act_(x: Tensor, t: float, bits: int = 8) -> Tensor:
    """:func:`migration_fake_quant_act` in place on ``x`` (same operations in the same order)."""
    qmax = 2**bits - 1
    scale, zp = act_qparams(t, x, qmax)
    return x.div_(scale).round_().add_(zp).clamp_(0, qmax).sub_(zp).mul_(scale)


def migration_fake_quant_weight(w: Tensor, bits: int = 8) -> Tensor:
    """Symmetric per-output-row fake quant with ``scale = max(|min|, |max|) / 127`` (>= EPS)."""
    return fake_quant_weight_(w.clone(), bits)


def fake_quant_weight_(w: Tensor, bits: int = 8) -> Tensor:
    """:func:`migration_fake_quant_weight` in place on ``w`` (same operations in the same order)."""
    qmax = 2 ** (bits - 1) - 1
    zero = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    mn, mx = torch.aminmax(w, dim=1)
    mn, mx = torch.minimum(mn, zero), torch.maximum(mx, zero)
    scale = torch.clamp(torch.maximum(-mn, mx) / qmax, min=EPS).unsqueeze(1)
    return w.div_(scale).round_().clamp_(-qmax, qmax).mul_(scale)
