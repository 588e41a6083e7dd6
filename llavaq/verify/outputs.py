"""Reading a quantized output directory as the integer kernels see it: float tensors + per-Linear int8 params."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavaq.errors import OutputError
from llavaq.formats.reader import read_quantized
from llavaq.quant.emulate import QuantLinearParams

QUANT_SUFFIXES = ("weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")


@dataclass
class QuantizedCheckpoint:
    """A quantized output directory: float tensors + per-Linear integer-kernel tensors."""

    path: Path
    format: str
    float_tensors: dict[str, torch.Tensor]
    linears: dict[str, QuantLinearParams]
    record: dict[str, Any] = field(default_factory=dict)


def read_quantized_output(path: str | Path) -> QuantizedCheckpoint:
    """Read any W8A8 output llavaq writes (msmodelslim, mindie, compressed-tensors, fakequant), msModelSlim's own
    and llm-compressor's int8 compressed-tensors outputs (either transformers key layout)."""
    path = Path(path)
    if not path.is_dir():
        raise OutputError(f"quantized model directory {path} does not exist")
    view = read_quantized(path)
    floats = {n: view.tensor(n) for n in view.float_names}
    linears: dict[str, QuantLinearParams] = {}
    for lv in view.linears():
        if lv.quant_bias is not None:  # msModelSlim formats: bias folded into the int32 quant_bias
            qb, post = lv.quant_bias, None
        else:  # zero point subtracted in integers, float bias added after rescaling
            qb = (-lv.input_offset.double() * lv.weight.double().sum(1)).round().to(torch.int32)
            post = lv.bias
        linears[lv.name] = QuantLinearParams(lv.weight, lv.weight_scale.float(), lv.input_scale.float(),
                                             lv.input_offset.float(), qb, lv.deq_scale.float(), lv.bias, post,
                                             lv.activation, lv.weight_offset)
    return QuantizedCheckpoint(path, view.format, floats, linears, view.record or {})
