"""GPTQ speed on one LLaVA-1.5-7B language-model layer's shapes, against this machine's fp32 GEMM rate (issue 23).

    python benchmarks/gptq_speed.py [--threads N] [--old all|attn|none] [--markdown docs/BENCHMARKS.md]

(a) The fp32 GEMM rate: ``torch.matmul`` of 4096×4096 by 4096×4096, best of 3 (2·4096³ FLOP each).
(b) GPTQ (damp 0.01, block 128, act order: the recipe defaults) of one Llama-7B layer's quantized Linears, on a
random SPD Hessian per shared input — q/k/v (3 × 4096×4096) share one, o_proj (4096×4096) has its own, gate/up
(2 × 11008×4096) share one; down_proj stays float by default — with the implementation before issue 23 (one
Linear at a time, kept below as the reference) and with ``gptq_codes_shared`` (the Linears of one input stacked,
row chunks in cache, in-place BLAS-3 lazy updates). The codes of the two are compared bit for bit.

FLOP count: GPTQ's useful work is the error propagation. Column j's error goes to the in−1−j later columns of
every row (one multiply, one subtract), so a Linear costs Σ_j 2·out·(in−1−j) = out·in·(in−1) FLOP, whatever the
blocking (≈ 0.64 TFLOP for the layer). The issue's "1.3 TFLOP a layer" counted 2·out·in², twice this. The
Hessian factorisation (float64, once per input, the same in both implementations) is timed apart.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from report import machine_line, write_section  # noqa: E402

from llavaq.algorithms.gptq import GPTQOptions, PreparedHessian, gptq_codes_shared, prepare_hessian  # noqa: E402
from llavaq.quant.int8 import weight_qparams  # noqa: E402

TITLE = "## GPTQ speed"


def original_gptq_codes(weight: torch.Tensor, scale: torch.Tensor, prepared: PreparedHessian,
                        options: GPTQOptions) -> torch.Tensor:
    """llavaq's GPTQ before issue 23 (the same as tests/algorithms/test_gptq_speedpath.py's reference)."""
    dtype = prepared.hinv_chol.dtype
    w = weight.to(dtype).clone()
    ws = scale.to(dtype).reshape(-1)
    w[:, prepared.dead] = 0
    if prepared.perm is not None:
        w = w[:, prepared.perm]
    hinv = prepared.hinv_chol
    n_in = w.shape[1]
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


def gemm_rate(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def random_hessian(n: int, seed: int) -> torch.Tensor:
    """SPD, correlated, a few outlier channels and one dead channel (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 256, generator=g, dtype=torch.float64)
    h = a @ a.T + torch.diag(torch.rand(n, generator=g, dtype=torch.float64) * 4 + 1)
    h[:4] *= 30
    h[:, :4] *= 30
    h[7] = 0
    h[:, 7] = 0
    return h


def layer_groups(n_in: int, attn: int, mlp: int) -> list[tuple[str, list[tuple[str, int]]]]:
    return [("qkv", [("q_proj", attn), ("k_proj", attn), ("v_proj", attn)]), ("o", [("o_proj", attn)]),
            ("gate_up", [("gate_proj", mlp), ("up_proj", mlp)])]


def run(args: argparse.Namespace) -> dict:
    opts = GPTQOptions(damp=0.01, block_size=args.block_size, act_order=True)
    rate = gemm_rate()
    print(f"fp32 GEMM 4096^3, best of 3: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)", flush=True)
    res = {"gemm": rate, "prepare": 0.0, "new": 0.0, "old": 0.0, "old_flop": 0.0, "flop": 0.0, "equal": True}
    g = torch.Generator().manual_seed(0)
    for k, (key, linears) in enumerate(layer_groups(args.n_in, args.attn, args.mlp)):
        t = time.perf_counter()
        prep = prepare_hessian(random_hessian(args.n_in, k), opts)
        res["prepare"] += time.perf_counter() - t
        ws = [torch.randn(o, args.n_in, generator=g) / args.n_in**0.5 for _, o in linears]
        scales = [weight_qparams(w) for w in ws]
        flop = sum(o * args.n_in * (args.n_in - 1) for _, o in linears)
        t = time.perf_counter()
        new = gptq_codes_shared(ws, scales, prep, opts)
        dt = time.perf_counter() - t
        res["new"] += dt
        res["flop"] += flop
        print(f"{key}: new {dt:.1f} s ({flop / dt / 1e9:.1f} GFLOP/s)", flush=True)
        if args.old == "all" or (args.old == "attn" and key != "gate_up"):
            t = time.perf_counter()
            old = [original_gptq_codes(w, s, prep, opts) for w, s in zip(ws, scales, strict=True)]
            dt = time.perf_counter() - t
            res["old"] += dt
            res["old_flop"] += flop
            res["equal"] &= all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
            print(f"{key}: old {dt:.1f} s ({flop / dt / 1e9:.1f} GFLOP/s), codes equal: {res['equal']}", flush=True)
    return res


def markdown(res: dict, args: argparse.Namespace) -> str:
    gf = res["flop"] / res["new"] / 1e9
    lines = [TITLE, "", f"Run {time.strftime('%Y-%m-%d')} on {machine_line()}, {torch.get_num_threads()} torch "
             f"threads. Command: `python benchmarks/gptq_speed.py {' '.join(sys.argv[1:])}`.", ""]
    if args.note:
        lines += [f"**{args.note}**", ""]
    lines += ["| measure | value |", "|---|---|",
              f"| fp32 GEMM rate (4096³ matmul, best of 3) | {res['gemm'] / 1e9:.1f} GFLOP/s |",
              f"| GPTQ work of one layer (q,k,v,o {args.attn}×{args.n_in}, gate,up {args.mlp}×{args.n_in}; "
              f"out·in·(in−1) each) | {res['flop'] / 1e12:.3f} TFLOP |",
              f"| new GPTQ (stacked, cached chunks, BLAS-3), one layer | {res['new']:.1f} s = **{gf:.1f} GFLOP/s, "
              f"{100 * gf * 1e9 / res['gemm']:.0f} % of the GEMM rate** |",
              f"| Hessian factorisations (3 inputs, float64, same in both) | {res['prepare']:.1f} s |"]
    if res["old"]:
        old_new = res["old"] / res["new"] * res["flop"] / res["old_flop"]
        lines += [f"| old GPTQ (one Linear at a time) on {res['old_flop'] / 1e12:.3f} TFLOP of it | {res['old']:.1f} s "
                  f"= {res['old_flop'] / res['old'] / 1e9:.1f} GFLOP/s (new is {old_new:.1f}× faster) |",
                  f"| codes of old and new | {'bit-identical' if res['equal'] else '**DIFFER**'} |"]
    proj = 32 * (res["new"] + res["prepare"]) / 60
    lines += [f"| projected GPTQ of 32 such layers (7B's language model: new + factorisations) | {proj:.1f} min "
              "(+ the CLIP tower) |", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--old", choices=("all", "attn", "none"), default="all",
                    help="time the old implementation on every group, on q/k/v and o only, or not at all")
    ap.add_argument("--n_in", type=int, default=4096)
    ap.add_argument("--attn", type=int, default=4096)
    ap.add_argument("--mlp", type=int, default=11008)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--note", default="", help="a line printed above the table (e.g. the machine's load)")
    ap.add_argument("--markdown", type=Path, help="write the section into this file (e.g. docs/BENCHMARKS.md)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    md = markdown(run(args), args)
    print(md)
    if args.markdown:
        write_section(args.markdown, md)


if __name__ == "__main__":
    main()
