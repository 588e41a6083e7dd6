"""W8A8 integer-kernel emulation: what MindIE / vLLM int8 kernels compute, exactly.

Static (what the exported model runs)::

    x_q = clamp(round(x / input_scale + input_offset), -128, 127)          # int8, per tensor
    y   = deq_scale · (x_q · W_qᵀ + quant_bias)                              # int32 accumulate

``deq_scale = input_scale · weight_scale`` and ``quant_bias = round(b/deq_scale − input_offset·ΣW_q)``
are read from the saved tensors, never recomputed. The integer product is exact: it is computed in
float32 over chunks of at most ``EXACT_FP32_K`` = 1024 input features (every partial sum is an integer
of magnitude ≤ 128·127·1024 < 2²⁴, so float32 represents it exactly whatever order the BLAS sums in),
and the chunks are added in float64 (exact below 2⁵³). Same result as an int32 accumulator, 2–4× faster
than a float64 GEMM.

Dynamic per-token (a reference for what static activations cost)::

    s_t = max|x_t| / 127;  x_q = clamp(round(x_t / s_t), -128, 127);  y = s_t·weight_scale·(x_q·W_qᵀ) + b

Weight-only (W8A16 / W4A16 kernels, and a reference for what the int8 weights of a W8A8 file alone cost)::

    W = (W_q − weight_offset)·weight_scale    # per group of in/G input columns, in float32
    y = x·Wᵀ + b

The weight-only kernels dequantize the stored codes with the stored group scales and zero points; the float
product is the float model's (float32 here), so the emulation is exact up to the order of float sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llavaq.quant.weight_only import dequantize_groups

EPS32 = torch.finfo(torch.float32).eps
#: Largest K for which a float32 dot product of int8 codes is exact: 128·127·K < 2**24.
EXACT_FP32_K = 1024


def exact_int_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """``xq @ wqᵀ`` of integer-valued float tensors (|x| ≤ 128, |w| ≤ 127), exact, as float64."""
    k = xq.shape[-1]
    x32, w32 = xq.float(), wq.float()
    if k <= EXACT_FP32_K:
        return (x32 @ w32.T).double()
    acc = None
    for start in range(0, k, EXACT_FP32_K):
        part = (x32[..., start:start + EXACT_FP32_K] @ w32[:, start:start + EXACT_FP32_K].T).double()
        acc = part if acc is None else acc + part
    return acc


@dataclass
class QuantLinearParams:
    """The saved tensors of one W8A8 Linear (deq_scale already unpacked to float32)."""

    weight: torch.Tensor  # int8 [out, in]
    weight_scale: torch.Tensor  # [out, 1]
    input_scale: torch.Tensor  # fp32 [1]
    input_offset: torch.Tensor  # fp32 [1], integer-valued
    quant_bias: torch.Tensor  # int32 [out]
    deq_scale: torch.Tensor  # fp32 [out]
    bias: torch.Tensor | None = None  # float [out] (the dynamic reference adds it in float)
    #: formats without quant_bias (compressed-tensors, fakequant): the kernel subtracts the zero point in
    #: integers (quant_bias = −input_offset·ΣW_q) and adds the float bias after rescaling
    post_bias: torch.Tensor | None = None
    #: what the exported kernel does with the input: "static" (the saved input_scale/offset), "dynamic"
    #: (per-token scales, e.g. llm-compressor's W8A8 preset) or "none" (weight-only); see :func:`kernel_mode`
    activation: str = "static"
    #: weight-only: zero points per group ([out, G], None = symmetric); weight_scale is [out, G] then
    weight_offset: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def quantize_input(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """int8 codes (as float) of a static per-tensor asymmetric activation quantizer."""
    return torch.clamp(torch.round(x.float() / input_scale.float() + input_offset.float()), -128, 127)


def int8_linear(x: torch.Tensor, p: QuantLinearParams) -> torch.Tensor:
    """``deq_scale·(x_q·W_qᵀ + quant_bias)`` with an exact integer accumulation (float64)."""
    xq = quantize_input(x, p.input_scale, p.input_offset)
    acc = exact_int_matmul(xq, p.weight) + p.quant_bias.double()
    y = (acc * p.deq_scale.double()).float()
    return y if p.post_bias is None else y + p.post_bias.float()


def int8_linear_dynamic(x: torch.Tensor, p: QuantLinearParams) -> torch.Tensor:
    """Per-token symmetric dynamic activation quantization with the same int8 weights."""
    x = x.float()
    s = torch.clamp(x.abs().amax(-1, keepdim=True) / 127, min=EPS32)
    xq = torch.clamp(torch.round(x / s), -128, 127)
    acc = exact_int_matmul(xq, p.weight)
    y = (acc * s.double() * p.weight_scale.double().reshape(1, -1)).float()
    if p.bias is not None:
        y = y + p.bias.float()
    return y


def weight_only_weight(p: QuantLinearParams) -> torch.Tensor:
    """``(W_q − weight_offset)·weight_scale`` per group, float32 [out, in]."""
    ws = p.weight_scale.float().reshape(p.out_features, -1)
    return dequantize_groups(p.weight, ws, p.weight_offset)


def int8_weight_only_linear(x: torch.Tensor, p: QuantLinearParams, w: torch.Tensor | None = None) -> torch.Tensor:
    """Float activations times the dequantized weight (group scales and zero points): what a W8A16 / W4A16 kernel
    computes, and, for a W8A8 file, what its int8 weights alone cost (a diagnostic)."""
    w = weight_only_weight(p) if w is None else w
    y = x.float() @ w.T
    return y + p.bias.float() if p.bias is not None else y


#: static = what the exported model runs; dynamic / weight_only = references that isolate the error sources
EMULATION_MODES = ("static", "dynamic", "weight_only")


def kernel_mode(mode: str, params: QuantLinearParams) -> str:
    """The emulation of one Linear: ``static`` ("as exported") follows the file's activation scheme."""
    if mode != "static":
        return mode
    return {"static": "static", "dynamic": "dynamic", "none": "weight_only"}[params.activation]


class EmulatedW8A8Linear(nn.Module):
    """Drop-in replacement of an ``nn.Linear`` that computes like the int8 kernel."""

    def __init__(self, params: QuantLinearParams, mode: str = "static") -> None:
        super().__init__()
        if mode not in EMULATION_MODES:
            raise ValueError(f"unknown emulation mode {mode!r}")
        self.params = params
        self.mode = mode
        self.in_features = params.in_features
        self.out_features = params.out_features
        self._w32 = params.weight.float()  # integer codes as float32 (see exact_int_matmul), once
        self._qb64 = params.quant_bias.double()
        self._deq64 = params.deq_scale.double()
        self._w_deq = weight_only_weight(params) if mode == "weight_only" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.mode == "dynamic":
            return int8_linear_dynamic(x, p)
        if self.mode == "weight_only":
            return int8_weight_only_linear(x, p, self._w_deq)
        xq = quantize_input(x, p.input_scale, p.input_offset)
        acc = exact_int_matmul(xq, self._w32) + self._qb64
        y = (acc * self._deq64).float()
        return y if p.post_bias is None else y + p.post_bias.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"
