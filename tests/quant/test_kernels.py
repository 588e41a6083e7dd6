"""Bit-exactness of llavaq's int8 / observer / m2 primitives against msModelSlim kernel outputs.

Reference data comes from ``tests/data/make_kernel_refs.py`` (run once in the msModelSlim venv);
this file needs no msModelSlim.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llavaq.algorithms import blocks
from llavaq.algorithms.m2 import os_plus_search
from llavaq.calib.observers import OBSERVERS, make_observer
from llavaq.quant import int8

DATA = Path(__file__).resolve().parents[1] / "data"
REFS = load_file(str(DATA / "kernel_refs.safetensors"))
META = json.loads((DATA / "kernel_refs.json").read_text())


def test_activation_qparams_exact() -> None:
    a, b = REFS["qp.x_min"], REFS["qp.x_max"]
    for i in range(len(a)):
        for shape in ((), (1,)):
            s, o = int8.activation_qparams(a[i].reshape(shape), b[i].reshape(shape))
            assert s.shape == (1,) and s.dtype == torch.float32
            assert torch.equal(s, REFS["qp.scale"][i : i + 1]), i
            assert torch.equal(o, REFS["qp.offset"][i : i + 1]), i


def test_activation_qparams_edge_cases() -> None:
    s, o = int8.activation_qparams(torch.tensor(-126.5), torch.tensor(128.5))
    assert s.item() == 1.0 and o.item() == -2.0
    s, o = int8.activation_qparams(torch.tensor(0.0), torch.tensor(0.0))
    assert s.item() == int8.EPS and o.item() == -128.0


def test_fake_quant_activation_exact() -> None:
    for i in range(REFS["fq.x"].shape[0]):
        s, o = REFS["qp.scale"][i : i + 1], REFS["qp.offset"][i : i + 1]
        x = REFS["fq.x"][i]
        assert torch.equal(int8.quantize_activation(x, s, o), REFS["fq.q"][i])
        assert torch.equal(int8.fake_quant_activation(x, s, o), REFS["fq.fq"][i])


@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16"])
def test_weight_quant_exact(dt: str) -> None:
    w = REFS[f"w.{dt}.w"]
    scale = int8.weight_qparams(w)
    assert scale.shape == (w.shape[0], 1) and scale.dtype == w.dtype
    assert torch.equal(scale, REFS[f"w.{dt}.scale"])
    assert scale[3].item() == pytest.approx(int8.EPS, rel=1e-2)  # all-zero row -> eps (in w.dtype)
    q = int8.quantize_weight(w, scale)
    assert q.dtype == torch.int8
    assert torch.equal(q.to(w.dtype), REFS[f"w.{dt}.q"])
    assert torch.equal(int8.fake_quant_weight(w, scale), REFS[f"w.{dt}.fq"])


def test_weight_zero_row_fp32_scale_is_eps() -> None:
    w = torch.zeros(2, 4)
    w[1, 0] = 1.0
    s = int8.weight_qparams(w)
    assert s[0, 0].item() == int8.EPS and s[1, 0].item() == pytest.approx(1 / 127)


def _seq(si: int) -> list[torch.Tensor]:
    return [REFS[f"obs.{si}.x{j}"] for j in range(META["observer_seq_lens"][si])]


@pytest.mark.parametrize("name,key", [("histogram", "hist"), ("minmax", "mean")])
def test_observers_exact(name: str, key: str) -> None:
    for si in range(len(META["observer_seq_lens"])):
        obs = make_observer(name)
        for j, x in enumerate(_seq(si)):
            obs.update(x)
            mn, mx = obs.min_max()
            assert mn.shape == () and mn.dtype == torch.float32
            assert torch.equal(mn.reshape(1), REFS[f"obs.{si}.{key}_min"][j : j + 1]), (si, j)
            assert torch.equal(mx.reshape(1), REFS[f"obs.{si}.{key}_max"][j : j + 1]), (si, j)
        assert obs.num_updates == len(_seq(si))


def test_running_minmax() -> None:
    obs = make_observer("absmax_minmax")
    xs = _seq(0)
    for x in xs:
        obs.update(x)
    mn, mx = obs.min_max()
    assert mn == min(x.min() for x in xs) and mx == max(x.max() for x in xs)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observer_state_roundtrip(name: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    for si in (0, 2, 5, 7, len(META["observer_seq_lens"]) - 1):
        xs = _seq(si)
        ref = make_observer(name)
        for x in xs:
            ref.update(x)
        resumed = make_observer(name)
        resumed.update(xs[0])
        path = tmp_path / f"{name}_{si}.safetensors"
        save_file(resumed.state_dict(), str(path))
        fresh = make_observer(name)
        fresh.load_state_dict(load_file(str(path)))
        for x in xs[1:]:
            fresh.update(x)
        assert fresh.num_updates == ref.num_updates
        for a, b in zip(fresh.min_max(), ref.min_max(), strict=True):
            assert torch.equal(a, b)


def _block(case: dict, p: str):
    t = case["type"]
    if t == "llama_qkv":
        mask = REFS.get(f"{p}.mask")
        return blocks.llama_qkv_block(
            case["num_heads"], case["num_kv_heads"], case["head_dim"], REFS[f"{p}.cos"], REFS[f"{p}.sin"],
            REFS[f"{p}.pos"], mask,
        )
    if t == "up_and_gate":
        return blocks.gate_up_block(torch.nn.functional.silu)
    if t == "llava_vit_qkv":
        bias = REFS[f"{p}.bias"]
        return blocks.clip_qkv_block(case["embed_dim"], case["num_heads"], case["head_dim"], bias)
    if t == "c_fc":
        return blocks.clip_fc1_block(REFS[f"{p}.bias"])
    raise AssertionError(t)


@pytest.mark.parametrize("case", META["migration_cases"], ids=lambda c: c["name"])
def test_os_plus_search_exact(case: dict) -> None:
    p = case["name"]
    s = os_plus_search(REFS[f"{p}.x"], REFS[f"{p}.w"], _block(case, p))
    assert s.shape == REFS[f"{p}.scale"].shape
    assert torch.equal(s, REFS[f"{p}.scale"])


def test_llama_block_none_mask_is_causal() -> None:
    case = next(c for c in META["migration_cases"] if c["type"] == "llama_qkv" and c["has_mask"])
    p = case["name"]
    args = (case["num_heads"], case["num_kv_heads"], case["head_dim"], REFS[f"{p}.cos"], REFS[f"{p}.sin"])
    x, w = REFS[f"{p}.x"], REFS[f"{p}.w"]
    y_none = blocks.llama_qkv_block(*args, REFS[f"{p}.pos"], None)(x, w)
    y_mask = blocks.llama_qkv_block(*args, REFS[f"{p}.pos"], REFS[f"{p}.mask"])(x, w)
    assert torch.equal(y_none, y_mask)
