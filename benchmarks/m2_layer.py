"""Cost of the m2 range search on one LLaVA-1.5-7B-shaped Llama layer (seeded random weights).

    python benchmarks/m2_layer.py [--tokens 600]

Prints, for the q/k/v + attention and gate/up blocks: the float forward of the layer's two blocks,
the integer screening cost of one candidate, the grid size, how many candidates lie within 0.1 %,
1 % and 10 % of the best screened loss, and the screening work (in whole-block equivalents) of
``--m2_search full`` (part-wise early stop) against two references: every candidate screened whole
(the grid size) and the early stop with the candidates visited in the order of their true losses
(an oracle: the least work any visiting order can reach with this bound). The numbers back the
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
from llavaq.algorithms.m2 import IntegerScreen, RangeSearch  # noqa: E402


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


if __name__ == "__main__":
    main()
