"""compressed-tensors' ``pack-quantized`` weight-only Linears (W4A16 / W8A16), written and read.

Per quantized Linear ``L``: ``L.weight_packed`` (int32 ``[out, ⌈in·b/32⌉]``,
:func:`llavaq.quant.weight_only.pack_int32`: compressed-tensors' ``pack_to_int32``), ``L.weight_scale`` (float32
``[out, G]``, the scales every format shares), ``L.weight_shape`` (int64 ``[2]``) and, asymmetric,
``L.weight_zero_point`` (the offsets as int8 codes packed along the output rows, ``[⌈out·b/32⌉, G]``, as compressed-
tensors packs zero points); the bias stays float. The config group's weights are ``{num_bits, type int, symmetric,
strategy group|channel, group_size}`` with ``input_activations`` null; ``actorder`` is ``"weight"`` for GPTQ with
act order (the static groups need no ``g_idx``: every column keeps its own group's scale), else null.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llavaq.quant.weight_only import pack_int32, unpack_int32
from llavaq.recipe import QuantRecipe

FORMAT = "pack-quantized"
#: a pack-quantized Linear's own tensors (besides bias)
PACKED_PARAMS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def weight_args(recipe: QuantRecipe) -> dict[str, Any]:
    """The config group's ``weights`` (every field of compressed-tensors' QuantizationArgs dump, in its order)."""
    grouped = recipe.group_size > 0
    act_order = recipe.weight_method == "gptq" and recipe.gptq_act_order
    return {"num_bits": recipe.w_bit, "type": "int", "symmetric": recipe.w_sym,
            "group_size": recipe.group_size if grouped else None, "strategy": "group" if grouped else "channel",
            "block_structure": None, "dynamic": False, "actorder": "weight" if act_order else None,
            "observer": "minmax", "observer_kwargs": {}}


def packed_tensors(module: str, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, recipe: QuantRecipe
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """A weight-only Linear's compressed-tensors tensors from the stream's codes, scale and offset."""
    bits = recipe.w_bit
    yield module + ".weight_packed", pack_int32(codes, bits)
    yield module + ".weight_scale", scale.float().contiguous()
    yield module + ".weight_shape", torch.tensor(list(codes.shape), dtype=torch.int64)
    if not recipe.w_sym:
        yield module + ".weight_zero_point", pack_int32(offset.round().to(torch.int8), bits, packed_dim=0)


def unpacked(packed: torch.Tensor, shape: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(int8 codes [out, in], float zero points [out, G] or None) of a stored pack-quantized Linear."""
    out, cols = (int(v) for v in shape.reshape(-1).tolist())
    codes = unpack_int32(packed, bits, 1, cols)
    if zero_point is None:
        return codes, None
    if zero_point.dtype == torch.int32:  # packed along the output rows
        zero_point = unpack_int32(zero_point, bits, 0, out)
    return codes, zero_point.float().reshape(scale.shape)
