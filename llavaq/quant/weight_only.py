"""Weight-only quantization (W8A16 / W4A16): group-wise round-to-nearest and the int4 packings, as pure functions.

msModelSlim 26.1.0's weight quantizer, reproduced bit for bit (tests/parity), in float32:

* symmetric: ``scale = max(absmax_g / (2^(b−1) − 1), eps)``, ``offset = 0``;
* asymmetric: ``lo = min(min_g, 0)``, ``hi = max(max_g, 0)``, ``scale = max((hi − lo) / (2^b − 1), eps)``,
  ``offset = round(−lo / scale) − 2^(b−1)``;
* codes ``q = clamp(round(w / scale + offset), −2^(b−1), 2^(b−1) − 1)``, dequantized ``(q − offset) · scale``;

one (scale, offset) per output row and group of ``group_size`` input columns (``group_size`` 0: the whole row).
``offset`` is compressed-tensors' ``zero_point`` too (same expression).

Packings of int4 codes:

* msModelSlim (:func:`pack_int4_msmodelslim`): two codes per int8, the even one in the low nibble; per-channel
  weights pair neighbouring input columns (``[out, in/2]``), group-wise weights pair neighbouring output rows
  and are stored ``[out/2, in]`` (its ``_w4a16_pack_int4``);
* compressed-tensors (:func:`pack_int32`): ``32/b`` codes per int32 along the input columns, code ``i`` of a word
  in bits ``b·i …``, each stored as ``q + 2^(b−1)`` (its ``pack_to_int32``).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps

__all__ = ["code_range", "group_qparams", "quantize_groups", "dequantize_groups", "expand_groups",
           "pack_int4_msmodelslim", "unpack_int4_msmodelslim", "pack_int32", "unpack_int32", "weight_only_grid",
           "stored_weight", "stored_weight_shape", "stored_codes", "shape_problem", "weight_only_specs"]


def code_range(bits: int) -> tuple[int, int]:
    """The signed code range ``[−2^(b−1), 2^(b−1) − 1]``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(w: Tensor, group_size: int) -> Tensor:
    out, cols = w.shape
    g = group_size or cols
    return w.reshape(out, cols // g, g)


def group_qparams(w: Tensor, bits: int, group_size: int = 0, sym: bool = True) -> tuple[Tensor, Tensor]:
    """(scale, offset), each ``[out, in/group_size]`` (``[out, 1]`` per channel), in ``w``'s dtype."""
    wg = _grouped(w, group_size)
    if sym:
        scale = torch.clamp(wg.abs().amax(-1) / (2 ** (bits - 1) - 1), min=EPS)
        return scale, torch.zeros_like(scale)
    lo = torch.clamp(wg.amin(-1), max=0)
    hi = torch.clamp(wg.amax(-1), min=0)
    scale = torch.clamp((hi - lo) / (2 ** bits - 1), min=EPS)
    return scale, torch.round(-lo / scale) - 2 ** (bits - 1)


def expand_groups(t: Tensor, in_features: int) -> Tensor:
    """A per-group ``[out, G]`` tensor repeated to one value per weight element ``[out, in]``."""
    return t.repeat_interleave(in_features // t.shape[1], dim=1)


def quantize_groups(w: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Tensor:
    """int8 codes ``clamp(round(w / scale + offset))`` of ``w`` [out, in] on a group grid, computed in ``w``'s dtype."""
    lo, hi = code_range(bits)
    cols = w.shape[1]
    s, o = expand_groups(scale.to(w.dtype), cols), expand_groups(offset.to(w.dtype), cols)
    return torch.clamp(torch.round(w / s + o), lo, hi).to(torch.int8)


def dequantize_groups(codes: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """``(q − offset) · scale`` in float32 ([out, in])."""
    cols = codes.shape[1]
    q = codes.float()
    if offset is not None:
        q = q - expand_groups(offset.float(), cols)
    return q * expand_groups(scale.float(), cols)


def pack_int4_msmodelslim(codes: Tensor, grouped: bool) -> Tensor:
    """msModelSlim's W4A16 int8 storage of int4 ``codes`` [out, in]: ``[out, in/2]`` per channel, ``[out/2, in]``
    group-wise (pairs of output rows)."""
    q = codes.to(torch.int8)
    pairs = q.T.contiguous() if grouped else q  # pack along the last dimension of this
    lo, hi = pairs[:, 0::2], pairs[:, 1::2]
    packed = torch.bitwise_or(torch.bitwise_left_shift(hi, 4), lo & 0x0F)
    return packed.T.contiguous() if grouped else packed.contiguous()


def unpack_int4_msmodelslim(packed: Tensor, grouped: bool) -> Tensor:
    """The int8 codes [out, in] of :func:`pack_int4_msmodelslim`'s output."""
    p = packed.to(torch.int8)
    p = p.T if grouped else p
    lo = torch.bitwise_right_shift(torch.bitwise_left_shift(p, 4), 4)
    hi = torch.bitwise_right_shift(p, 4)
    q = torch.stack([lo, hi], dim=-1).reshape(p.shape[0], -1)
    return q.T.contiguous() if grouped else q.contiguous()


def pack_int32(codes: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    """compressed-tensors' ``pack_to_int32``: ``32/bits`` codes per int32 along ``packed_dim``, each as
    ``q + 2^(b−1)``, code ``i`` of a word in its bits ``b·i`` upwards; a last partial word padded with zero bits."""
    per = 32 // bits
    v = codes.to(torch.int64) + 2 ** (bits - 1)
    if packed_dim == 0:
        v = v.T
    rows, cols = v.shape
    if cols % per:
        v = torch.nn.functional.pad(v, (0, per - cols % per))
        cols = v.shape[1]
    v = v.reshape(rows, cols // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.T.contiguous() if packed_dim == 0 else words.contiguous()


def unpack_int32(packed: Tensor, bits: int, packed_dim: int = 1, size: int | None = None) -> Tensor:
    """int8 codes of :func:`pack_int32`'s output (the first ``size`` along ``packed_dim``; default all)."""
    per = 32 // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if packed_dim == 0:
        w = w.T
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (w.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    q = (v - 2 ** (bits - 1)).reshape(w.shape[0], -1).to(torch.int8)[:, :size]
    return q.T.contiguous() if packed_dim == 0 else q.contiguous()


def weight_only_grid(w: Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor]:
    """(scale, offset) of a weight-only Linear as stored: formed in float32 (msModelSlim's CPU run), the scale cast
    to ``scale_dtype`` (the grid every format shares), the integer offsets alike; both ``[out, G]``."""
    s, o = group_qparams(w.float(), bits, group_size, sym)
    return s.to(scale_dtype), o.to(scale_dtype)


def stored_weight(codes: Tensor, bits: int, grouped: bool) -> Tensor:
    """msModelSlim's ``L.weight`` of a weight-only Linear: the int8 codes, int4 packed in pairs."""
    return pack_int4_msmodelslim(codes, grouped) if bits == 4 else codes.to(torch.int8).contiguous()


def stored_weight_shape(shape: tuple[int, ...], bits: int, grouped: bool) -> tuple[int, int]:
    out, cols = shape
    if bits == 8:
        return out, cols
    return (out // 2, cols) if grouped else (out, cols // 2)


def weight_only_specs(module: str, shape: tuple[int, ...], bias: bool, group_size: int,
                      float_dtype: torch.dtype, grid: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of a weight-only Linear's tensors, in msModelSlim's order (weight, bias, scale, offset);
    the weight as int8 codes [out, in] (:func:`stored_weight_shape`: as msModelSlim's ascendV1 file packs int4)."""
    out, cols = shape
    groups = (out, cols // group_size if group_size else 1)
    return ([(module + ".weight", torch.int8, (out, cols))]
            + ([(module + ".bias", float_dtype, (out,))] if bias else [])
            + [(module + ".weight_scale", grid, groups), (module + ".weight_offset", grid, groups)])


def stored_codes(weight: Tensor, bits: int, grouped: bool) -> Tensor:
    """The int8 codes [out, in] of msModelSlim's stored ``L.weight`` (int4 unpacked)."""
    return unpack_int4_msmodelslim(weight, grouped) if bits == 4 else weight


def shape_problem(bits: int, group_size: int, out: int, cols: int) -> str | None:
    """Why a Linear of this shape cannot be stored weight-only (None: it can): groups must divide the input
    columns; msModelSlim pairs int4 codes (of input columns, or output rows when group-wise)."""
    if group_size and cols % group_size:
        return f"--group_size {group_size} does not divide its {cols} input columns"
    if bits == 4 and (cols % 2 or out % 2):
        return f"int4 storage pairs codes and needs even numbers of output rows and input columns ({out}×{cols})"
    return None
