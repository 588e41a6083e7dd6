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
           "pack_int4_msmodelslim", "unpack_int4_msmodelslim", "pack_int32", "unpack_int32"]


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
    """compressed-tensors' ``pack_to_int32``: ``32/bits`` codes per int32 along ``packed_dim`` (a multiple of them
    required there), each as ``q + 2^(b−1)``, code ``i`` of a word in its bits ``b·i`` upwards."""
    per = 32 // bits
    v = codes.to(torch.int64) + 2 ** (bits - 1)
    if packed_dim == 0:
        v = v.T
    rows, cols = v.shape
    if cols % per:
        raise ValueError(f"{cols} codes per row do not fill int32 words of {per}")
    v = v.reshape(rows, cols // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.T.contiguous() if packed_dim == 0 else words.contiguous()


def unpack_int32(packed: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    """int8 codes of :func:`pack_int32`'s output (all of its words used)."""
    per = 32 // bits
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if packed_dim == 0:
        w = w.T
    shifts = torch.arange(per, dtype=torch.int64) * bits
    v = (w.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    q = (v - 2 ** (bits - 1)).reshape(w.shape[0], -1).to(torch.int8)
    return q.T.contiguous() if packed_dim == 0 else q
