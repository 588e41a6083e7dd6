"""Generate bit-exact reference outputs from msModelSlim's compiled kernels.

Run ONCE with the msModelSlim virtualenv (never imported by llavaq or the tests):

    /work/venv-msms/bin/python tests/data/make_kernel_refs.py

Writes ``kernel_refs.safetensors`` (inputs + kernel outputs) and ``kernel_refs.json`` (case
metadata) next to this file.  ``tests/quant/test_kernels.py`` replays the cases with llavaq.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from msmodelslim.pytorch.llm_ptq.anti_outlier.anti_block import get_config
from msmodelslim.pytorch.llm_ptq.anti_outlier.anti_utils import migration
from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.quant_funcs import (
    HistogramObserver,
    StatMinMaxObserver,
    fake_quantize,
    init_weight_quant_normal,
    linear_quantization_params,
)
from safetensors.torch import save_file

OUT = Path(__file__).parent
CPU = torch.device("cpu")
T: dict[str, torch.Tensor] = {}
META: dict = {}


def qparams_cases(g: torch.Generator) -> None:
    n = 120
    a = torch.randn(n, generator=g) * torch.rand(n, generator=g) * 10
    b = a + torch.rand(n, generator=g) * 20 * torch.rand(n, generator=g)
    edge_a = torch.tensor([-126.5, 0.0, 0.0, -1.0, 3.0, -5.0, -1e-9])
    edge_b = torch.tensor([128.5, 0.0, 1.0, 0.0, 3.0, -5.0, 1e-9])
    a, b = torch.cat([a, edge_a]), torch.cat([b, edge_b])
    sc, of = [], []
    for i in range(len(a)):
        s, o = linear_quantization_params(8, a[i].clone(), b[i].clone(), q_signed=True, sym=False)
        assert s.shape == (1,) and o.shape == (1,)
        a1, b1 = a[i : i + 1].clone(), b[i : i + 1].clone()
        s1, o1 = linear_quantization_params(8, a1, b1, q_signed=True, sym=False)
        assert torch.equal(s, s1) and torch.equal(o, o1)
        sc.append(s)
        of.append(o)
    T["qp.x_min"], T["qp.x_max"] = a, b
    T["qp.scale"], T["qp.offset"] = torch.cat(sc), torch.cat(of)
    # fake quant on the first 40 ranges
    xs, qs, fqs = [], [], []
    for i in range(40):
        x = (torch.randn(64, generator=g) * (b[i] - a[i] + 1) + (a[i] + b[i]) / 2).float()
        q, fq = fake_quantize(x.clone(), sc[i], of[i], 8, is_signed=True)
        xs.append(x)
        qs.append(q)
        fqs.append(fq)
    T["fq.x"], T["fq.q"], T["fq.fq"] = torch.stack(xs), torch.stack(qs), torch.stack(fqs)


def weight_cases(g: torch.Generator) -> None:
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dt).split(".")[-1]
        w = (torch.randn(16, 32, generator=g) * torch.rand(16, 1, generator=g) * 3).to(dt)
        w[3] = 0
        _, _, scale, offset = init_weight_quant_normal(
            w.clone(), 8, True, True, True, admm=[False, 1000], mm_tensor=False
        )
        q, _ = fake_quantize(w.clone(), scale, offset, 8, is_signed=True, dequant=False)
        _, fq = fake_quantize(w.clone(), scale, offset, 8, is_signed=True, dequant=True)
        T[f"w.{name}.w"], T[f"w.{name}.scale"] = w, scale
        T[f"w.{name}.q"], T[f"w.{name}.fq"] = q, fq


def observer_sequences(g: torch.Generator) -> list[list[torch.Tensor]]:
    seqs = []
    for k in range(24):
        n = 3 + k % 3
        base = float(torch.rand((), generator=g) * 10) + 0.01
        s = []
        for i in range(n):
            kind = k % 8
            if kind == 0:
                x = torch.randn(2, 8, 16, generator=g) * base
            elif kind == 1:
                x = torch.randn(2, 8, 16, generator=g) * base + base * 3
            elif kind == 2:  # heavy tails (Student-t, 2 dof)
                z = torch.randn(2, 8, 16, generator=g)
                c = torch.randn(2, 8, 16, 2, generator=g).pow(2).sum(-1) / 2
                x = z / c.sqrt() * base
            elif kind == 3:  # growing
                x = torch.randn(1, 8, 16, generator=g) * base * (i + 1)
            elif kind == 4:  # shrinking
                x = torch.randn(1, 8, 16, generator=g) * base / (i + 1)
            elif kind == 5:  # constant then random
                x = torch.full((2, 4, 8), 0.3 * base) if i % 2 == 0 else torch.randn(2, 4, 8, generator=g)
            elif kind == 6:  # zeros then random
                x = torch.zeros(2, 4, 8) if i < 2 else torch.randn(2, 4, 8, generator=g) * 0.5
            else:  # outlier channel
                x = torch.randn(2, 8, 16, generator=g) * 0.3
                x[..., 3] *= 50 * base
            s.append(x)
        seqs.append(s)
    seqs.append([torch.zeros(3, 5)] * 3)
    seqs.append([torch.full((3, 5), 2.5)] * 3)
    seqs.append([torch.full((3, 5), -7.25)] * 2 + [torch.randn(3, 5, generator=g)])
    return seqs


def observer_cases(g: torch.Generator) -> None:
    seqs = observer_sequences(g)
    META["observer_seq_lens"] = [len(s) for s in seqs]
    for si, s in enumerate(seqs):
        kh = HistogramObserver(qscheme=torch.per_tensor_affine)
        km = StatMinMaxObserver(8, True, False, "mean")
        hmn, hmx, mmn, mmx = [], [], [], []
        for j, x in enumerate(s):
            T[f"obs.{si}.x{j}"] = x
            kh.update(x.clone())
            km.update(x.clone())
            a, b = kh.get_min_max(CPU)
            hmn.append(a.reshape(1))
            hmx.append(b.reshape(1))
            a, b = km.get_min_max(CPU)
            mmn.append(a.reshape(1))
            mmx.append(b.reshape(1))
        T[f"obs.{si}.hist_min"], T[f"obs.{si}.hist_max"] = torch.cat(hmn), torch.cat(hmx)
        T[f"obs.{si}.mean_min"], T[f"obs.{si}.mean_max"] = torch.cat(mmn), torch.cat(mmx)


def rope(max_pos: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(max_pos).float(), inv)
    e = torch.cat((f, f), -1)
    return e.cos(), e.sin()


def outlier_x(g: torch.Generator, b: int, n: int, c: int) -> torch.Tensor:
    x = torch.randn(b, n, c, generator=g)
    x[..., 1] *= 30
    x[..., 5] += 8
    x[..., 7] *= -12
    return x


def migration_cases(g: torch.Generator) -> None:
    aq, wq = get_config()
    cases = []
    c = 32
    for b, n, h, kv, mask in [
        (1, 8, 4, 4, "causal"),
        (1, 8, 4, 4, "none"),
        (1, 8, 4, 2, "causal"),
        (1, 8, 4, 2, "none"),
        (1, 8, 4, 1, "none"),
        (2, 6, 4, 2, "padded"),
    ]:
        d = c // h
        name = f"mig.llama.b{b}h{h}kv{kv}.{mask}"
        x = outlier_x(g, b, n, c)
        w = torch.randn((h + 2 * kv) * d, c, generator=g) * 0.1
        cos, sin = rope(64, d)
        pos = torch.arange(n).unsqueeze(0).expand(b, n).contiguous()
        m = None
        if mask != "none":
            neg = torch.finfo(torch.float32).min
            m = torch.full((n, n), neg).triu(1)[None, None].expand(b, 1, n, n).clone()
            if mask == "padded":  # left padding of 2 tokens in sample 0
                m[0, :, :, :2] = neg
                m[0, :, :2, :] = 0.0
                pos = pos.clone()
        extra = dict(
            num_heads=h, num_key_value_heads=kv, num_key_value_groups=h // kv, cos_cached=cos,
            sin_cached=sin, head_dim=d, position_ids=pos, attention_mask=m, observation_mask=None,
        )
        s = migration(x.clone(), w.clone(), aq, wq, "llama_qkv", extra)
        T[f"{name}.x"], T[f"{name}.w"], T[f"{name}.cos"], T[f"{name}.sin"] = x, w, cos, sin
        T[f"{name}.pos"], T[f"{name}.scale"] = pos, s
        if m is not None:
            T[f"{name}.mask"] = m
        cases.append(dict(name=name, type="llama_qkv", num_heads=h, num_kv_heads=kv, head_dim=d,
                          has_mask=m is not None))
    for i in range(2):
        name = f"mig.gate_up.{i}"
        x = outlier_x(g, 1, 8, c) * (1 + i)
        w = torch.randn(96, c, generator=g) * 0.1
        extra = dict(observation_mask=None, act_fn=torch.nn.SiLU())
        s = migration(x.clone(), w.clone(), aq, wq, "up_and_gate", extra)
        T[f"{name}.x"], T[f"{name}.w"], T[f"{name}.scale"] = x, w, s
        cases.append(dict(name=name, type="up_and_gate"))
    for i in range(2):
        name = f"mig.vit_qkv.{i}"
        h = 4
        x = outlier_x(g, 1, 10, c)
        x = x - (x.amax((0, 1)) + x.amin((0, 1))) / 2
        w = torch.randn(3 * c, c, generator=g) * 0.1
        bias = torch.randn(3 * c, generator=g) * 0.1
        extra = dict(split_size=c, num_heads=h, head_dim=c // h, causal_attention_mask=None,
                     observation_mask=None, attention_mask=None, bias=bias)
        s = migration(x.clone(), w.clone(), aq, wq, "llava_vit_qkv", extra)
        T[f"{name}.x"], T[f"{name}.w"], T[f"{name}.bias"], T[f"{name}.scale"] = x, w, bias, s
        cases.append(dict(name=name, type="llava_vit_qkv", embed_dim=c, num_heads=h, head_dim=c // h))
    for i in range(2):
        name = f"mig.c_fc.{i}"
        x = outlier_x(g, 1, 10, c) * (1 + i)
        x = x - (x.amax((0, 1)) + x.amin((0, 1))) / 2
        w = torch.randn(4 * c, c, generator=g) * 0.3
        bias = torch.randn(4 * c, generator=g)

        class QuickGELU(torch.nn.Module):
            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return t * torch.sigmoid(1.702 * t)

        extra = dict(bias=bias, act_fn=QuickGELU(), observation_mask=None)
        s = migration(x.clone(), w.clone(), aq, wq, "c_fc", extra)
        T[f"{name}.x"], T[f"{name}.w"], T[f"{name}.bias"], T[f"{name}.scale"] = x, w, bias, s
        cases.append(dict(name=name, type="c_fc"))
    META["migration_cases"] = cases


def main() -> None:
    g = torch.Generator().manual_seed(20240601)
    qparams_cases(g)
    weight_cases(g)
    observer_cases(g)
    migration_cases(g)
    save_file({k: v.contiguous().clone() for k, v in T.items()}, str(OUT / "kernel_refs.safetensors"))
    (OUT / "kernel_refs.json").write_text(json.dumps(META, indent=1) + "\n")
    print("wrote", len(T), "tensors")


if __name__ == "__main__":
    main()
