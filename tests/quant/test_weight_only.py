"""Weight-only quantization (issue 28): msModelSlim's group-wise round-to-nearest and the int4 packings."""

from __future__ import annotations

import pytest
import torch

from llavaq.errors import LlavaqError
from llavaq.quant.weight_only import (
    code_range,
    dequantize_groups,
    group_qparams,
    pack_int4_msmodelslim,
    pack_int32,
    quantize_groups,
    unpack_int4_msmodelslim,
    unpack_int32,
)
from llavaq.recipe import QuantRecipe


def _w(out: int = 12, cols: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, cols, generator=g) * torch.linspace(0.01, 0.3, cols)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [0, 16, 32])
@pytest.mark.parametrize("sym", [True, False])
def test_group_round_to_nearest_is_within_half_a_step_and_uses_the_range(bits, group_size, sym):
    w = _w()
    s, o = group_qparams(w, bits, group_size, sym)
    groups = 1 if group_size == 0 else 64 // group_size
    assert s.shape == o.shape == (12, groups) and (s > 0).all()
    q = quantize_groups(w, s, o, bits)
    lo, hi = code_range(bits)
    assert q.dtype == torch.int8 and int(q.min()) >= lo and int(q.max()) <= hi
    err = (dequantize_groups(q, s, o) - w).abs()
    step = s.repeat_interleave(64 // groups, dim=1)
    assert (err <= step / 2 * (1 + 1e-5)).all()
    if sym:
        assert torch.equal(o, torch.zeros_like(o)) and int(q.abs().max()) == hi  # absmax hits ±(2^(b-1)-1)
    else:
        assert torch.equal(o, o.round()) and int(q.max()) == hi and int(q.min()) == lo


def test_finer_groups_and_more_bits_give_smaller_errors():
    w = _w(seed=1)

    def err(bits, gs):
        s, o = group_qparams(w, bits, gs, True)
        return float((dequantize_groups(quantize_groups(w, s, o, bits), s, o) - w).pow(2).mean())

    assert err(4, 16) < err(4, 32) < err(4, 0)
    assert err(8, 0) < err(4, 16) / 50


@pytest.mark.parametrize("grouped", [False, True])
def test_msmodelslim_int4_packing_round_trips_and_puts_the_even_code_low(grouped):
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    p = pack_int4_msmodelslim(q, grouped)
    assert p.dtype == torch.int8 and p.shape == ((3, 10) if grouped else (6, 5))
    assert torch.equal(unpack_int4_msmodelslim(p, grouped), q)
    first = (int(q[1, 0]) << 4 | int(q[0, 0]) & 0xF) if grouped else (int(q[0, 1]) << 4 | int(q[0, 0]) & 0xF)
    assert int(p[0, 0]) & 0xFF == first & 0xFF


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_round_trips_along_either_dimension(bits):
    lo, hi = code_range(bits)
    q = torch.randint(lo, hi + 1, (8, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    p = pack_int32(q, bits)
    assert p.dtype == torch.int32 and p.shape == (8, 32 * bits // 32)
    assert torch.equal(unpack_int32(p, bits), q)
    assert torch.equal(unpack_int32(pack_int32(q, bits, packed_dim=0), bits, packed_dim=0), q)
    # code i of a word in bits 4i.. as q + 8: word 0 of a row of codes 0..7 minus 8 is 0x76543210
    if bits == 4:
        row = (torch.arange(8, dtype=torch.int8) - 8).reshape(1, 8)
        assert int(pack_int32(row, 4)[0, 0]) == 0x76543210


def test_recipe_bits_group_size_and_symmetry():
    r = QuantRecipe(w_bit=4, a_bit=16, group_size=128, w_sym=False)
    assert r.weight_only and r.quant_type == "W4A16" and r.anti_outlier == "none"  # the default m2 is W8A8's
    assert QuantRecipe(w_bit=8, a_bit=16).quant_type == "W8A16"
    with pytest.raises(LlavaqError, match="W4A8|no output format"):
        QuantRecipe(w_bit=4, a_bit=8)
    with pytest.raises(LlavaqError, match="per-channel and symmetric"):
        QuantRecipe(group_size=128)
    with pytest.raises(LlavaqError, match="per-channel and symmetric"):
        QuantRecipe(w_sym=False)
    with pytest.raises(LlavaqError, match="nothing to smooth"):
        QuantRecipe(w_bit=4, a_bit=16, anti_outlier="m1")
    with pytest.raises(LlavaqError, match="--group_size"):
        QuantRecipe(w_bit=4, a_bit=16, group_size=-1)
    with pytest.raises(LlavaqError, match="does not divide the 48 input columns of x.fc1"):
        QuantRecipe(w_bit=4, a_bit=16, group_size=32).check_group_size("x.fc1", 48)
    # export-time fields: the calibration key is W8A8 none's, so one calibration serves both
    assert r.calibration_key() == QuantRecipe(anti_outlier="none").calibration_key()
    assert QuantRecipe.from_dict(r.to_dict()) == r
