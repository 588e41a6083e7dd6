"""One Linear's integer-kernel parameters (msModelSlim's W8A8 layout): int8 weight, scales, ``deq_scale`` and
``quant_bias``, so that ``y = deq_scale·(x_q·W_qᵀ + quant_bias)``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llavaq.quant.int8 import quantize_weight, weight_qparams


def pack_deq_scale(deq: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
    """msModelSlim's deq_scale: float32 for bf16 models, else the float32 bits widened to int64."""
    deq = deq.float().contiguous()
    if model_dtype == torch.bfloat16:
        return deq
    return torch.from_numpy(np.frombuffer(deq.numpy().tobytes(), np.int32).astype(np.int64))


def unpack_deq_scale(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.int64:
        return torch.from_numpy(t.numpy().astype(np.int32).view(np.float32).copy())
    return t.float()


@dataclass
class LinearQuant:
    """Everything an integer kernel needs for one Linear."""

    weight: torch.Tensor  # int8 [out, in]
    weight_scale: torch.Tensor  # [out, 1]
    input_scale: torch.Tensor  # fp32 [1]
    input_offset: torch.Tensor  # fp32 [1]
    bias: torch.Tensor | None  # float [out]
    deq_scale: torch.Tensor  # fp32 [out]
    quant_bias: torch.Tensor  # int32 [out]


def quantize_linear(
    w: torch.Tensor, b: torch.Tensor | None, input_scale: torch.Tensor, input_offset: torch.Tensor,
    scale_dtype: torch.dtype, codes: torch.Tensor | None = None,
) -> LinearQuant:
    """The kernel tensors of one Linear; ``codes`` (int8, e.g. from GPTQ on the same grid) replace rounding."""
    ws = weight_qparams(w).to(scale_dtype)
    wq = quantize_weight(w, ws.float()) if codes is None else codes
    input_scale = input_scale.reshape(1).float()
    input_offset = input_offset.reshape(1).float()
    deq = (input_scale * ws.float()).squeeze(1).float()
    bias32 = b.float() if b is not None else torch.zeros(w.shape[0])
    qb = torch.round(bias32 / deq - input_offset * wq.float().sum(1)).to(torch.int32)
    return LinearQuant(wq, ws, input_scale, input_offset, b, deq, qb)
