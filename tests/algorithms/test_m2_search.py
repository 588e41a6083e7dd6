"""m2 range search: the screened default and the fast mode against the exhaustive float grid
(msModelSlim's loop), on all four block types with outlier channels."""

from __future__ import annotations

import pytest
import torch

import llavaq.algorithms.blocks as blocks
from llavaq.algorithms.blocks import Block, clip_fc1_block, clip_qkv_block, gate_up_block, llama_qkv_block
from llavaq.algorithms.m2 import (
    IntegerScreen,
    RangeSearch,
    int_candidate_loss,
    migration_fake_quant_weight,
    os_plus_search,
    quantize_weight_int8,
    scale_for_threshold,
    threshold_grid,
    threshold_loss,
)

KINDS = ["llama_qkv", "gate_up", "clip_qkv", "clip_fc1"]


def make_case(kind: str, seed: int, n: int = 96):
    g = torch.Generator().manual_seed(seed)
    c = 32
    x = torch.randn(1, n, c, generator=g)
    idx = torch.randperm(c, generator=g)[:3]
    x[..., idx] *= torch.tensor([8.0, 20.0, 45.0])  # outlier channels, as after a real norm
    if kind == "llama_qkv":
        heads, kv, hd = 4, 2, 8
        w = torch.randn(heads * hd + 2 * kv * hd, c, generator=g) / c**0.5
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        freqs = torch.outer(torch.arange(n).float(), inv)
        emb = torch.cat((freqs, freqs), -1)
        fn = llama_qkv_block(heads, kv, hd, emb.cos(), emb.sin(), torch.arange(n)[None], None)
    elif kind == "gate_up":
        w = torch.randn(2 * 48, c, generator=g) / c**0.5
        fn = gate_up_block(torch.nn.functional.silu)
    elif kind == "clip_qkv":
        w = torch.randn(3 * c, c, generator=g) / c**0.5
        fn = clip_qkv_block(c, 4, c // 4, 0.05 * torch.randn(3 * c, generator=g))
    else:
        w = torch.randn(64, c, generator=g) / c**0.5
        fn = clip_fc1_block(0.05 * torch.randn(64, generator=g))
    return x, w, fn


def _scale(x, t):
    return scale_for_threshold(x.amax((0, 1)), x.amin((0, 1)), t)


@pytest.mark.parametrize("kind", KINDS)
def test_integer_path_equals_the_float_loss_to_rounding(kind):
    x, w, fn = make_case(kind, 0)
    y_ref = fn(x, w)
    cmx, cmn = x.amax((0, 1)), x.amin((0, 1))
    worst = 0.0
    for t in threshold_grid(x)[::7]:
        f = float(threshold_loss(x, w, fn, t, y_ref))
        i = int_candidate_loss(x, w, fn, cmx, cmn, t, y_ref)
        worst = max(worst, abs(f - i) / f)
    assert worst < 1e-4, worst


def test_integer_weights_are_the_fake_quant_integers():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(700, 96, generator=g)
    w[5] = 0.0  # an all-zero row: scale clamps to EPS
    s = 1 + 4 * torch.rand(96, generator=g)
    q = torch.empty(w.shape, dtype=torch.int8)
    r = quantize_weight_int8(w, s, q)
    assert r.shape == (700, 1) and q.abs().max() <= 127
    assert torch.equal(q.float() * r, migration_fake_quant_weight(w * s))


@pytest.fixture(params=[128, 1], ids=["default-parts", "many-parts"])
def part_rows(request, monkeypatch):
    """The tiny cases are one part each at the default part size; with 1 they split into 2-8 parts."""
    monkeypatch.setattr(blocks, "MIN_PART_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
def test_parts_partition_the_block(kind, part_rows):
    """Parts cover every weight row and every output column once, and their squared errors add up to
    the whole block's screened loss."""
    x, w, fn = make_case(kind, 0)
    parts = fn.parts(w.shape[0])
    assert (len(parts) > 1) == (part_rows == 1)
    rows = torch.cat([p.rows for p in parts])
    assert torch.equal(rows.sort().values, torch.arange(w.shape[0]))
    y_ref = fn(x, w)
    cols = torch.cat([torch.arange(y_ref.shape[-1])[p.cols] for p in parts])
    assert torch.equal(cols.sort().values, torch.arange(y_ref.shape[-1]))
    screen = IntegerScreen(x, w, fn, y_ref)
    whole = IntegerScreen(x, w, Block(fn.post, fn.bias, fn.screen), y_ref)
    for t in threshold_grid(x)[::11]:
        act = screen.quantize_act(x.amax((0, 1)), x.amin((0, 1)), t)
        split = sum(screen.part_sse(act, k) for k in range(len(parts)))
        assert split == pytest.approx(whole.part_sse(act, 0), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_full_search_equals_the_exhaustive_grid(kind, part_rows):
    """Default mode: the exhaustive search's threshold every time, with a handful of float forwards;
    with several parts per block, candidates are dropped part-way (less than the grid is screened)."""
    for seed in range(6):
        x, w, fn = make_case(kind, seed)
        info_f: dict = {}
        info_e: dict = {}
        full = os_plus_search(x, w, fn, info=info_f)
        exh = os_plus_search(x, w, fn, mode="exhaustive", info=info_e)
        assert torch.equal(full, exh), (seed, info_f, info_e)
        assert info_f["threshold"] == info_e["threshold"] and info_f["loss"] == info_e["loss"]
        assert info_e["evals"] == info_e["grid"]
        if part_rows == 1:
            assert info_f["screened"] < 0.85 * info_f["grid"], info_f
        else:
            assert info_f["screened"] == info_f["grid"]
        assert info_f["evals"] <= 10, info_f


def test_dropped_candidates_are_above_the_bound(part_rows):
    """Branch and bound: every candidate not screened to the end has a partial loss above the best
    screened loss x (1 + MARGIN), hence a full loss above it; completed ones equal the whole-block loss."""
    x, w, fn = make_case("gate_up", 4)
    search = RangeSearch(x, w, fn)
    search.settle(range(len(search.grid)))
    best = min(search.int_losses.values())
    dropped = [i for i in range(len(search.grid)) if i not in search.int_losses]
    assert bool(dropped) == (part_rows == 1)
    cmx, cmn = x.amax((0, 1)), x.amin((0, 1))
    for i in dropped:
        lb = search.lower_bound(i)
        assert best * (1 + search.MARGIN) < lb <= int_candidate_loss(x, w, fn, cmx, cmn, search.grid[i], search.y_ref)
    for i in list(search.int_losses)[::5]:
        full = int_candidate_loss(x, w, fn, cmx, cmn, search.grid[i], search.y_ref)
        assert search.int_losses[i] == pytest.approx(full, rel=1e-6)


def test_settle_widens_the_margin_when_screening_is_inaccurate():
    """A screening path 30 % off (noise on its output) still lands on the exhaustive answer: the
    measured screening error widens the re-evaluated set, up to the whole grid."""
    x, w, fn = make_case("gate_up", 1)
    g = torch.Generator().manual_seed(0)

    def noisy(y):
        out = fn.post(y)
        return out * (1 + 0.3 * torch.rand(out.shape, generator=g))

    bad = Block(fn.post, None, noisy)
    search = RangeSearch(x, w, bad)
    best = search.settle(range(len(search.grid)))
    assert best == RangeSearch(x, w, fn).exhaustive()
    assert len(search.float_losses) > 10


@pytest.mark.parametrize("kind", KINDS)
def test_fast_search_against_the_full_grid(kind):
    """Smooth loss curves (gate_up, fc1): always the full grid's threshold. Attention blocks have jagged
    curves (quantization noise through softmax): mostly the same threshold or within 0.1 %, never far."""
    close, worst = 0, 1.0
    for seed in range(5):
        x, w, fn = make_case(kind, seed)
        grid = threshold_grid(x)
        y_ref = fn(x, w)
        losses = [float(threshold_loss(x, w, fn, t, y_ref)) for t in grid]
        full_i = min(range(len(grid)), key=lambda i: (losses[i], i))
        info: dict = {}
        fast = os_plus_search(x, w, fn, mode="fast", info=info)
        assert info["screened"] <= 0.45 * len(grid)
        fast_i = grid.index(info["threshold"])
        assert torch.equal(fast, _scale(x, grid[fast_i]))
        ratio = losses[fast_i] / losses[full_i]
        close += ratio <= 1.001
        worst = max(worst, ratio)
    if kind in ("gate_up", "clip_fc1"):
        assert close == 5 and worst == 1.0, (close, worst)
    else:
        assert close >= 3 and worst < 1.15, (close, worst)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_search_is_unchanged_by_dropping_candidates(kind, monkeypatch):
    """The early stop changes the work, not the answer: the fast search over many parts (candidates
    dropped part-way) picks the threshold of the one-part search (every visited candidate screened)."""
    for seed in range(3):
        x, w, fn = make_case(kind, seed)
        monkeypatch.setattr(blocks, "MIN_PART_ROWS", 1)
        info_parts: dict = {}
        os_plus_search(x, w, fn, mode="fast", info=info_parts)
        monkeypatch.setattr(blocks, "MIN_PART_ROWS", 10**9)
        info_whole: dict = {}
        os_plus_search(x, w, fn, mode="fast", info=info_whole)
        assert info_parts["threshold"] == info_whole["threshold"] and info_parts["loss"] == info_whole["loss"]
        assert info_parts["screened"] < info_whole["screened"]


@pytest.mark.parametrize("mode", ["full", "fast", "exhaustive"])
def test_search_reports_threshold_loss_and_evaluations(mode):
    x, w, fn = make_case("gate_up", 0)
    grid = threshold_grid(x)
    info: dict = {}
    scale = os_plus_search(x, w, fn, mode=mode, info=info)
    assert info["threshold"] in grid and info["grid"] == len(grid)
    assert torch.equal(scale, _scale(x, info["threshold"]))
    assert info["loss"] == float(threshold_loss(x, w, fn, info["threshold"]))
    if mode == "exhaustive":
        assert info["evals"] == len(grid) and info["screened"] == 0
    elif mode == "full":
        assert info["screened"] == len(grid) and 1 <= info["evals"] <= 10
    else:
        assert info["screened"] <= 0.45 * len(grid) and 1 <= info["evals"] <= 10


def test_unknown_mode_is_refused():
    x, w, fn = make_case("gate_up", 0)
    with pytest.raises(ValueError):
        os_plus_search(x, w, fn, mode="nope")


def test_cache_records_the_m2_search(quantized):
    cal, _ = quantized
    rec = cal.cache.read_stage("text_layer.0")
    for group in ("text.0.attn", "text.0.mlp"):
        # full search: every candidate screened (some dropped part-way where a block has several parts)
        grid = rec[f"m2.{group}.grid"].item()
        assert 0.2 * grid < rec[f"m2.{group}.screened"].item() <= grid
        assert rec[f"m2.{group}.grid"].item() >= 100
        assert 1 <= rec[f"m2.{group}.evals"].item() <= 10
        assert rec[f"m2.{group}.loss"].item() >= 0 and rec[f"m2.{group}.threshold"].item() > 0


def test_without_an_integer_path_full_is_the_exhaustive_search():
    """A plain callable block (as on accelerators, where there is no integer screening): every
    candidate in float, the exhaustive threshold."""
    x, w, fn = make_case("gate_up", 2)
    info: dict = {}
    scale = os_plus_search(x, w, lambda a, b: fn(a, b), info=info)
    assert torch.equal(scale, os_plus_search(x, w, fn, mode="exhaustive"))
    assert info["evals"] == info["screened"] == info["grid"]
