"""Issue #23: the fast GPTQ path (stacked Linears, cached row chunks, in-place BLAS-3 lazy updates) gives the
int8 codes of the original implementation, bit for bit. The original is kept here as the reference."""

from __future__ import annotations

import pytest
import torch

from llavaq.algorithms import gptq
from llavaq.algorithms.gptq import GPTQOptions, PreparedHessian, gptq_codes, gptq_codes_shared, prepare_hessian
from llavaq.quant.int8 import weight_qparams


def original_gptq_codes(weight: torch.Tensor, scale: torch.Tensor, prepared: PreparedHessian,
                        options: GPTQOptions) -> torch.Tensor:
    """llavaq's GPTQ before issue #23, verbatim: full-row rank-one updates per column, ``w −= err @ H⁻¹``."""
    dtype = prepared.hinv_chol.dtype
    w = weight.to(dtype).clone()
    ws = scale.to(dtype).reshape(-1)
    w[:, prepared.dead] = 0
    if prepared.perm is not None:
        w = w[:, prepared.perm]
    hinv = prepared.hinv_chol
    n_out, n_in = w.shape
    codes = torch.zeros_like(w)
    bs = max(1, options.block_size)
    for i1 in range(0, n_in, bs):
        i2 = min(i1 + bs, n_in)
        block = w[:, i1:i2].clone()
        err = torch.zeros_like(block)
        hblock = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = block[:, i]
            q = torch.clamp(torch.round(col / ws), -127, 127)
            codes[:, i1 + i] = q
            e = (col - q * ws) / hblock[i, i]
            block[:, i:] -= e.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    if prepared.perm is not None:
        codes = codes[:, torch.argsort(prepared.perm)]
    return codes.to(torch.int8)


def _hessian(n_in: int, seed: int, dead: tuple[int, ...] = (5,)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(2 * n_in + 7, n_in, generator=g) @ mix
    x[:, :3] *= 12  # outlier channels
    x[:, list(dead)] = 0  # dead channels: their weights are zeroed, H gets a unit diagonal there
    return x.double().T @ x.double()


def _weights(outs: tuple[int, ...], n_in: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    return [torch.randn(o, n_in, generator=g) / n_in**0.5 for o in outs]


@pytest.mark.parametrize(("outs", "n_in", "block_size", "act_order"), [
    ((20,), 48, 128, False),
    ((20,), 48, 7, True),
    ((64, 16, 16), 96, 32, False),  # q/k/v-like: one stack, unequal heights
    ((64, 16, 16), 96, 32, True),
    ((300, 300), 200, 128, True),  # gate/up-like, a partial last block
    ((33,), 130, 1, False),
    ((700, 50), 96, 96, False),  # more rows than one cached chunk of a 96-column block
])
def test_fast_gptq_equals_the_original_implementation_bit_for_bit(outs, n_in, block_size, act_order, monkeypatch):
    monkeypatch.setattr(gptq, "CACHE_BYTES", 96 * 4 * 256)  # chunks of 256 rows: several per block here
    opts = GPTQOptions(damp=0.01, block_size=block_size, act_order=act_order)
    h = _hessian(n_in, seed=len(outs) + n_in, dead=(5, n_in - 1))
    prep = prepare_hessian(h, opts)
    assert int(prep.dead.sum()) == 2
    ws = _weights(outs, n_in, seed=n_in)
    scales = [weight_qparams(w) for w in ws]
    want = [original_gptq_codes(w, s, prep, opts) for w, s in zip(ws, scales, strict=True)]
    got = gptq_codes_shared(ws, scales, prep, opts)
    for g_, w_ in zip(got, want, strict=True):
        assert g_.dtype == torch.int8 and g_.shape == w_.shape and g_.is_contiguous()
        assert torch.equal(g_, w_)
    alone = [gptq_codes(w, s, prep, opts) for w, s in zip(ws, scales, strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(alone, want, strict=True))
    assert any((c != torch.clamp(torch.round(w / s), -127, 127)).any() for c, w, s in zip(got, ws, scales, strict=True))


def test_float64_prepared_hessian_runs_in_float64():
    opts = GPTQOptions(block_size=16, act_order=True)
    h = _hessian(40, seed=3)
    prep = prepare_hessian(h, opts, dtype=torch.float64)
    (w,) = _weights((12,), 40, seed=3)
    s = weight_qparams(w)
    assert torch.equal(gptq_codes(w, s, prep, opts), original_gptq_codes(w, s, prep, opts))


def test_device_is_a_parameter_and_inputs_are_left_alone():
    opts = GPTQOptions(block_size=8)
    h = _hessian(24, seed=1)
    prep = prepare_hessian(h, opts, device="cpu")
    assert prep.hinv_chol.device.type == "cpu" and prep.hinv_chol.dtype == torch.float32
    w = _weights((10,), 24, seed=1)[0].double()  # another dtype: converted, never modified
    before = w.clone()
    codes = gptq_codes(w, weight_qparams(w), prep, opts)
    assert torch.equal(w, before) and codes.device == w.device
    assert torch.equal(codes, original_gptq_codes(w, weight_qparams(w), prep, opts))
