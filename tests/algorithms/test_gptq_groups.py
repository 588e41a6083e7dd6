"""GPTQ on weight-only grids (issue 28): group scales, zero points, int4, act order with static groups."""

from __future__ import annotations

import pytest
import torch

from llavaq.algorithms.gptq import GPTQOptions, gptq_codes, gptq_codes_shared, prepare_hessian
from llavaq.quant.weight_only import code_range, dequantize_groups, expand_groups, group_qparams, quantize_groups


def reference(w, h, s, o, bits, damp, order):
    """Textbook OBQ in float64 on a fixed per-element grid (explicit inverse, rank-one downdates)."""
    n = w.shape[1]
    w, h = w.double().clone(), h.double().clone()
    se, oe = expand_groups(s.double(), n), expand_groups(o.double(), n)
    lo, hi = code_range(bits)
    h = h + damp * float(torch.diagonal(h).mean()) * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    for k, j in enumerate(order):
        q = torch.clamp(torch.round(w[:, j] / se[:, j] + oe[:, j]), lo, hi)
        codes[:, j] = q
        delta = (w[:, j] - (q - oe[:, j]) * se[:, j]) / hinv[j, j]
        rest = order[k + 1:]
        w[:, rest] -= delta.unsqueeze(1) * hinv[j, rest].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes.to(torch.int8)


def _layer(seed: int, n_in: int = 64, n_out: int = 16, tokens: int = 400):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, :3] *= 10
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    return x, w


@pytest.mark.parametrize("bits,group_size,sym", [(4, 16, True), (4, 32, False), (8, 0, False), (4, 0, True)])
@pytest.mark.parametrize("act_order", [False, True])
def test_grouped_gptq_equals_the_float64_reference(bits, group_size, sym, act_order):
    x, w = _layer(0)
    h = x.double().T @ x.double()
    s, o = group_qparams(w, bits, group_size, sym)  # static groups: from the float weight
    opts = GPTQOptions(damp=0.01, block_size=7, act_order=act_order)
    prep = prepare_hessian(h, opts, dtype=torch.float64)
    got = gptq_codes(w, s, prep, opts, None if sym else o, code_range(bits))
    order = prep.perm.tolist() if act_order else list(range(w.shape[1]))
    assert torch.equal(got, reference(w, h, s, o, bits, 0.01, order))


@pytest.mark.parametrize("act_order", [False, True])
def test_grouped_gptq_beats_round_to_nearest_and_stacks_bit_for_bit(act_order):
    for seed in range(3):
        x, w = _layer(seed)
        h = x.double().T @ x.double()
        s, o = group_qparams(w, 4, 16, False)
        opts = GPTQOptions(act_order=act_order)
        prep = prepare_hessian(h, opts)
        got = gptq_codes(w, s, prep, opts, o, code_range(4))
        rtn = quantize_groups(w, s, o, 4)

        def out_err(c, x=x, w=w, s=s, o=o):
            return float(((x @ (w - dequantize_groups(c, s, o)).T) ** 2).sum())

        assert out_err(got) < 0.8 * out_err(rtn), seed
        halves = gptq_codes_shared([w[:7], w[7:]], [s[:7], s[7:]], prep, opts, [o[:7], o[7:]], code_range(4))
        assert torch.equal(torch.cat(halves), got)
