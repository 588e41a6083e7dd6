"""INT8 quantization primitives matching msModelSlim's ``quant_funcs`` kernels bit-exactly.

Activations: per-tensor asymmetric signed int8 (``q_signed=True, sym=False``).
Weights: per-output-channel symmetric int8, range [-127, 127] (``mm_tensor=False``).
All rounding is ``torch.round`` (half-to-even).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps

__all__ = [
    "EPS",
    "activation_qparams",
    "quantize_activation",
    "fake_quant_activation",
    "weight_qparams",
    "quantize_weight",
    "fake_quant_weight",
]


def _act_bounds(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def activation_qparams(x_min: Tensor, x_max: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Per-tensor asymmetric activation scale and offset from an observed range.

    Same as msModelSlim ``linear_quantization_params(bits, x_min, x_max, q_signed=True, sym=False)``:
    the range is widened to include 0, ``scale = max((x_max - x_min) / (2**bits - 1), EPS)`` and
    ``offset = round(-x_min / scale) - 2**(bits-1)`` (a float tensor holding an integer value).
    Like the kernel, 0-dim inputs give shape ``[1]`` outputs (other shapes are kept); dtype follows
    the inputs.
    """
    if x_min.dim() == 0:
        x_min = x_min.reshape(1)
    if x_max.dim() == 0:
        x_max = x_max.reshape(1)
    zero = torch.zeros_like(x_min)
    x_min = torch.minimum(x_min, zero)
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    qmin, qmax = _act_bounds(bits)
    scale = torch.clamp((x_max - x_min) / float(qmax - qmin), min=EPS)
    offset = torch.round(-x_min / scale) + float(qmin)
    return scale, offset


def quantize_activation(x: Tensor, scale: Tensor, offset: Tensor, bits: int = 8) -> Tensor:
    """Integer activation codes ``clamp(round(x / scale + offset), -128, 127)``.

    Returned as a float tensor of ``x``'s (promoted) dtype holding integer values; call
    ``.to(torch.int8)`` for storage.
    """
    qmin, qmax = _act_bounds(bits)
    return torch.clamp(torch.round(x / scale + offset), qmin, qmax)


def fake_quant_activation(x: Tensor, scale: Tensor, offset: Tensor, bits: int = 8) -> Tensor:
    """Quantize-dequantize: ``(quantize_activation(x) - offset) * scale``."""
    return (quantize_activation(x, scale, offset, bits) - offset) * scale


def weight_qparams(w: Tensor, bits: int = 8) -> Tensor:
    """Per-output-channel symmetric scale ``[out, 1]`` = ``max(absmax_row / 127, EPS)`` in ``w.dtype``."""
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1, keepdim=True)
    return torch.clamp(absmax / qmax, min=EPS)


def quantize_weight(w: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """``clamp(round(w / scale), -128, 127)`` as ``torch.int8`` (computed in ``w.dtype``).

    With ``scale = absmax / 127`` the codes lie in [-127, 127] in exact arithmetic, but the kernel
    clamps to the full signed range [-128, 127]; in low precision (bf16) ``w / scale`` can round to
    -128, which is kept (bit-exact with msModelSlim's ``fake_quantize(..., is_signed=True)``).
    """
    qmin, qmax = _act_bounds(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax).to(torch.int8)


def fake_quant_weight(w: Tensor, scale: Tensor, bits: int = 8) -> Tensor:
    """Quantize-dequantize the weight: ``quantize_weight(w, scale) * scale`` in ``w.dtype``."""
    qmin, qmax = _act_bounds(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax) * scale
