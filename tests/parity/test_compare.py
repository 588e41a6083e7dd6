"""compare_outputs on synthetic msModelSlim-format dirs (no msModelSlim needed)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from compare import compare_outputs, decode_deq_scale  # noqa: E402

L = "language_model.model.layers.0.self_attn.q_proj"


def _write(out: Path, sharded: bool = False) -> Path:
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    ws = torch.rand(4, 1, generator=g) / 100
    ins = torch.tensor([0.05])
    deq = (ins * ws[:, 0]).float()
    t = {
        "language_model.model.norm.weight": torch.randn(8, generator=g),
        f"{L}.weight": torch.randint(-127, 128, (4, 8), generator=g).to(torch.int8),
        f"{L}.weight_scale": ws, f"{L}.weight_offset": torch.zeros(4, 1),
        f"{L}.input_scale": ins, f"{L}.input_offset": torch.tensor([3.0]),
        f"{L}.quant_bias": torch.randint(-50, 50, (4,), generator=g).to(torch.int32),
        f"{L}.deq_scale": deq.view(torch.int32).to(torch.int64),
    }
    desc = {"version": "1.0.0", "model_quant_type": "W8A8"}
    desc.update({k: ("FLOAT" if k.endswith("norm.weight") else "W8A8") for k in t})
    (out / "quant_model_description.json").write_text(json.dumps(desc, indent=2))
    if sharded:
        keys = list(t)
        parts = [keys[:3], keys[3:]]
        wm = {}
        for i, ks in enumerate(parts, 1):
            name = f"quant_model_weight_w8a8-{i:05d}-of-00002.safetensors"
            save_file({k: t[k] for k in ks}, out / name)
            wm.update({k: name for k in ks})
        index = {"metadata": {"total_size": 0}, "weight_map": wm}
        (out / "quant_model_weight_w8a8.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(t, out / "quant_model_weight_w8a8.safetensors")
    return out


def test_identical_and_sharded(tmp_path):
    a = _write(tmp_path / "a")
    b = _write(tmp_path / "b", sharded=True)
    rep = compare_outputs(a, b)
    assert rep["identical"], rep
    assert rep["kinds"]["weight_int8"]["min_equal_frac"] == 1.0


def test_perturbed(tmp_path):
    ref = _write(tmp_path / "ref")
    ours = tmp_path / "ours"
    shutil.copytree(ref, ours)
    p = ours / "quant_model_weight_w8a8.safetensors"
    t = load_file(p)
    w = t[f"{L}.weight"].clone()
    w[0, 0] = 0 if w[0, 0] != 0 else 1
    t[f"{L}.weight"] = w
    t[f"{L}.deq_scale"] = (decode_deq_scale(t[f"{L}.deq_scale"]) * 1.01).view(torch.int32).to(torch.int64)
    t["language_model.model.norm.weight"] = t["language_model.model.norm.weight"].half()
    save_file(t, p)
    rep = compare_outputs(ours, ref)
    assert not rep["identical"]
    assert rep["kinds"]["weight_int8"]["min_equal_frac"] == 1 - 1 / 32
    assert abs(rep["kinds"]["deq_scale"]["max_rel"] - 0.01) < 1e-5
    assert rep["dtype_mismatch"] == {"language_model.model.norm.weight": ["torch.float16", "torch.float32"]}
    assert rep["kinds"]["input_scale"]["max_abs"] == 0.0
