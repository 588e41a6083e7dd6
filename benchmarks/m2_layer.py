"""Cost of the m2 range search on one LLaVA-1.5-7B-shaped Llama layer (seeded random weights).

    python benchmarks/m2_layer.py [--tokens 600]

Prints, for the q/k/v + attention and gate/up blocks: the float forward of the layer's two blocks,
the integer screening cost of one candidate, the grid size, how many candidates lie within 0.1 %,
1 % and 10 % of the best screened loss, and the screening work (in whole-block equivalents) of
``--m2_search full`` (part-wise early stop) against two references: every candidate screened whole
(the grid size) and the early stop with the candidates visited in the order of their true losses
(an oracle: the least work any visiting order can reach with this bound). It also measures what
reusing the integer product from one threshold to the next could save: the share of a whole
candidate's screening time spent in the int8 GEMM, and the fraction of the quantized operands'
integers (activations, weights) that differ between neighbouring thresholds. The numbers back the
"Why the m2 search is still ~14x one forward" paragraph of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llavaq.algorithms.blocks import gate_up_block, llama_qkv_block  # noqa: E402
from llavaq.algorithms.m2 import IntegerScreen, RangeSearch, quantize_weight_int8  # noqa: E402


def layer(tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, heads, hd, inter = 4096, 32, 128, 11008
    x = torch.randn(1, tokens, c, generator=g)
    idx = torch.randperm(c, generator=g)[:6]
    x[..., idx] *= torch.tensor([6.0, 10.0, 15.0, 20.0, 30.0, 45.0])  # outlier channels after the norm
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    emb = torch.cat([torch.outer(torch.arange(tokens).float(), inv)] * 2, -1)
    qkv = llama_qkv_block(heads, heads, hd, emb.cos(), emb.sin(), torch.arange(tokens)[None], None)
    return x, [("q/k/v + attention", torch.randn(3 * c, c, generator=g) * 0.02, qkv),
               ("gate/up", torch.randn(2 * inter, c, generator=g) * 0.02, gate_up_block(F.silu))]


def oracle_work(sse: list[list[float]], margin: float) -> float:
    """Block equivalents of the early stop when candidates are visited best first."""
    losses = [sum(r) for r in sse]
    best = min(losses)
    order = sorted(range(len(sse[0])), key=lambda p: -sse[losses.index(best)][p])
    parts = 0
    for r in sse:
        total = 0.0
        for p in order:
            total += r[p]
            parts += 1
            if total > best * (1 + margin):
                break
    return parts / len(order)


def operand_changes(screen: IntegerScreen, search: RangeSearch) -> tuple[list[float], list[float]]:
    """Fraction of the activation and weight integers that differ from the previous threshold's."""
    wq = torch.empty_like(screen.weight, dtype=torch.int8)
    prev_q = prev_w = None
    act, wgt = [], []
    for th in search.grid:
        s, q, _, _ = screen.quantize_act(search.cmx, search.cmn, th)
        quantize_weight_int8(screen.weight, s, wq)
        if prev_q is not None:
            act.append((q != prev_q).float().mean().item())
            wgt.append((wq != prev_w).float().mean().item())
        prev_q, prev_w = q, wq.clone()
    return act, wgt


def gemm_share(screen: IntegerScreen, search: RangeSearch, th: float, repeat: int = 3) -> float:
    """Share of one whole candidate's screening time spent in the int8 x int8 -> int32 products."""
    act = screen.quantize_act(search.cmx, search.cmn, th)
    wq = torch.empty_like(screen.weight, dtype=torch.int8)
    quantize_weight_int8(screen.weight, act[0], wq)
    part_w = [wq[rows].contiguous() for rows in screen._rows]
    gemm = whole = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        for w in part_w:
            torch._int_mm(act[1], w.t())
        gemm = min(gemm, time.perf_counter() - t)
        t = time.perf_counter()
        act = screen.quantize_act(search.cmx, search.cmn, th)
        for k in range(len(screen.parts)):
            screen.part_sse(act, k)
        whole = min(whole, time.perf_counter() - t)
    return gemm / whole


def _spread(v: list[float]) -> str:
    v = sorted(v)
    return " / ".join(f"{100 * v[int(f * (len(v) - 1))]:.2g} %" for f in (0.0, 0.5, 1.0)) + \
        f" (mean {100 * sum(v) / len(v):.2g} %)"


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=600)
    a = ap.parse_args()
    x, blocks = layer(a.tokens)
    t = time.perf_counter()
    for _, w, fn in blocks:
        fn(x, w)
    print(f"float forward of both blocks: {time.perf_counter() - t:.2f} s")
    for name, w, fn in blocks:
        search = RangeSearch(x, w, fn)
        t = time.perf_counter()
        best = search.settle(range(len(search.grid)))
        took = time.perf_counter() - t
        screen = IntegerScreen(x, w, fn, search.y_ref)
        t = time.perf_counter()
        sse = []
        for th in search.grid:
            act = screen.quantize_act(search.cmx, search.cmn, th)
            sse.append([screen.part_sse(act, k) for k in range(len(screen.parts))])
        per = (time.perf_counter() - t) / len(search.grid)
        losses = [sum(r) for r in sse]
        lo = min(losses)
        within = {f: sum(v <= lo * (1 + f) for v in losses) for f in (1e-3, 1e-2, 1e-1)}
        print(f"{name}: grid {len(search.grid)}, {len(screen.parts)} parts, screening {per:.3f} s per candidate; "
              f"within 0.1 % / 1 % / 10 % of the best: {within[1e-3]} / {within[1e-2]} / {within[1e-1]}; "
              f"full search {took:.1f} s: {search.screened:.1f} block equivalents screened "
              f"(oracle order {oracle_work(sse, RangeSearch.MARGIN):.1f}, whole grid {len(search.grid)}), "
              f"{len(search.float_losses)} float forwards, threshold {search.grid[best]:.4g}")
        assert math.isclose(min(losses) / screen.tokens, min(search.int_losses.values()), rel_tol=1e-6)
        share = gemm_share(screen, search, search.grid[best])
        act, wgt = operand_changes(screen, search)
        near = [i - 1 for i in range(1, len(losses)) if losses[i] <= lo * 1.1]  # changes into candidate i
        print(f"  int8 GEMM {100 * share:.0f} % of a whole candidate's screening time "
              f"(were it free: at most {1 / (1 - share):.1f}x faster); integers changed from one threshold "
              f"to the next, min / median / max: activations {_spread(act)}, weights {_spread(wgt)}; "
              f"into the {len(near)} candidates within 10 % of the best: activations "
              f"{_spread([act[i] for i in near])}, weights {_spread([wgt[i] for i in near])}")


if __name__ == "__main__":
    main()
