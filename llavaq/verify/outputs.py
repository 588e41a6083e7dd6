"""Reading a quantized output directory as the integer kernels see it: float tensors + per-Linear int8 params.

Both are read lazily, one tensor (one Linear) at a time when asked for, and not kept: ``verify`` streams a
7B output stage by stage and never holds all of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavaq.errors import OutputError
from llavaq.formats.reader import QuantizedModelView, read_quantized
from llavaq.quant.emulate import QuantLinearParams

QUANT_SUFFIXES = ("weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")


class _LazyByName(Mapping):
    """A read-only mapping over the names of one output's tensors or Linears, each read when asked for."""

    def __init__(self, view: QuantizedModelView, names: list[str]) -> None:
        self._view = view
        self._order = names
        self._names = set(names)

    def _read(self, name: str) -> Any:
        raise NotImplementedError

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class FloatTensors(_LazyByName):
    """The output's float tensors by name, read from the files when asked for (not cached)."""

    def __init__(self, view: QuantizedModelView) -> None:
        super().__init__(view, list(view.float_names))

    def _read(self, name: str) -> torch.Tensor:
        return self._view.tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._view.files.shape(name))


class QuantLinears(_LazyByName):
    """The output's quantized Linears by name, as :class:`QuantLinearParams` read when asked for."""

    def __init__(self, view: QuantizedModelView) -> None:
        super().__init__(view, list(view.quantized))

    def _read(self, name: str) -> QuantLinearParams:
        return linear_params(self._view, name)


def linear_params(view: QuantizedModelView, name: str) -> QuantLinearParams:
    lv = view.linear(name)
    if lv.quant_bias is not None:  # msModelSlim formats: bias folded into the int32 quant_bias
        qb, post = lv.quant_bias, None
    else:  # zero point subtracted in integers, float bias added after rescaling
        qb = (-lv.input_offset.double() * lv.weight.double().sum(1)).round().to(torch.int32)
        post = lv.bias
    return QuantLinearParams(lv.weight, lv.weight_scale.float(), lv.input_scale.float(), lv.input_offset.float(),
                             qb, lv.deq_scale.float(), lv.bias, post, lv.activation, lv.weight_offset)


@dataclass
class QuantizedCheckpoint:
    """A quantized output directory: float tensors + per-Linear integer-kernel tensors (both read lazily)."""

    path: Path
    format: str
    float_tensors: Mapping[str, torch.Tensor]
    linears: Mapping[str, QuantLinearParams]
    record: dict[str, Any] = field(default_factory=dict)


def read_quantized_output(path: str | Path) -> QuantizedCheckpoint:
    """Read any W8A8 output llavaq writes (msmodelslim, mindie, compressed-tensors, fakequant), msModelSlim's own
    and llm-compressor's int8 compressed-tensors outputs (either transformers key layout)."""
    path = Path(path)
    if not path.is_dir():
        raise OutputError(f"quantized model directory {path} does not exist")
    view = read_quantized(path)
    return QuantizedCheckpoint(path, view.format, FloatTensors(view), QuantLinears(view), view.record or {})
