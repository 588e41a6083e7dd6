"""Issue #4: ``llavaq inspect`` on every format and on a cache; broken outputs exit 1 naming the tensor."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llavaq import api
from llavaq.cli import app

FORMATS = ("msmodelslim", "mindie", "compressed-tensors", "fakequant")
Q = "language_model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def outputs(quantized, tiny_model, tmp_path_factory):
    cal, _ = quantized
    root = tmp_path_factory.mktemp("insp")
    return {(f, s): api.export(tiny_model, cal.cache.path, root / f"{f}-{s}", format=f,
                               part_file_size=60_000 / 2**30 if s else None).save_directory
            for f in FORMATS for s in (False, True)}


def _run(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)], catch_exceptions=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_table_and_json(outputs, fmt):
    for sharded in (False, True):
        r = _run(outputs[fmt, sharded])
        assert r.exit_code == 0, r.output
        assert "quantized Linears" in r.output and fmt in r.output and "text.0.self_attn.q_proj" in r.output
        assert "consistent" in r.output
        j = _run(outputs[fmt, sharded], "--json")
        assert j.exit_code == 0
        rep = json.loads(j.stdout)
        assert rep["format"] == fmt and rep["ok"] and rep["problems"] == []
        assert len(rep["quantized"]) == len(rep["layers"]) == 26
        assert any(m.endswith("mlp.down_proj") for m in rep["float_modules"])
        row = next(x for x in rep["layers"] if x["name"] == Q)
        assert 0 < row["weight_scale_min"] <= row["weight_scale_max"] and row["input_scale"] > 0
        assert 0.5 < row["clip_ratio"] < 1.5  # from the cache the record points to


def test_inspect_cache(quantized):
    cal, _ = quantized
    r = _run(cal.cache.path)
    assert r.exit_code == 0, r.output
    assert "smoothing" in r.output and "session cache" in r.output
    rep = json.loads(_run(cal.cache.path, "--json").stdout)
    assert rep["kind"] == "cache" and rep["complete"] and rep["ok"]
    assert len(rep["layers"]) == 26
    groups = {g["group"]: g for g in rep["smoothing"]}
    assert set(groups) == {f"{m}.{i}.{k}" for m in ("vision", "text") for i in (0, 1) for k in ("attn", "mlp")}
    st = cal.cache.read_stage("text_layer.0")
    s = st["smooth.text.0.attn.scale"]
    g = groups["text.0.attn"]
    assert g["scale_min"] == pytest.approx(s.min().item()) and g["scale_mean"] == pytest.approx(s.mean().item())
    amax = torch.maximum(st[f"float.{Q}.min"].abs(), st[f"float.{Q}.max"].abs())
    assert g["outlier_channels"] == [int(i) for i in (amax > 6 * amax.median()).nonzero().flatten()]
    assert g["m2_threshold"] == pytest.approx(st["m2.text.0.attn.threshold"].item())
    assert g["m2_screened"] == g["m2_grid"] >= 100 and 1 <= g["m2_evals"] <= 10 and "m2 range search" in r.output


def _rewrite(path, fn):
    os.chmod(path, 0o600)
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def _broken(outputs, tmp_path, key):
    d = tmp_path / "broken"
    shutil.copytree(outputs[key], d)
    for p in d.iterdir():
        os.chmod(p, 0o600)
    return d


def _fails_naming(d, *words):
    r = _run(d)
    assert r.exit_code == 1, r.output
    last = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(last) == 1 and all(w in last[0] for w in words), r.output
    j = _run(d, "--json")
    assert j.exit_code == 1 and not json.loads(j.stdout)["ok"]


def test_missing_tensor_is_named(outputs, tmp_path):
    d = _broken(outputs, tmp_path, ("msmodelslim", False))
    _rewrite(d / "quant_model_weight_w8a8.safetensors", lambda t: t.pop(Q + ".input_scale"))
    _fails_naming(d, Q + ".input_scale", "quant_model_description.json")


def test_nan_input_scale_is_named(outputs, tmp_path):
    d = _broken(outputs, tmp_path, ("compressed-tensors", False))
    _rewrite(d / "model.safetensors", lambda t: t[Q + ".input_scale"].fill_(float("nan")))
    _fails_naming(d, Q + ".input_scale", "NaN", "model.safetensors")


def test_bad_deq_scale_and_shard_index_are_named(outputs, tmp_path):
    d = _broken(outputs, tmp_path, ("mindie", False))

    def bump(t):
        t[Q + ".deq_scale"][3] += 1  # int64 bit pattern: one ulp off
    _rewrite(d / "quant_model_weight_w8a8.safetensors", bump)
    _fails_naming(d, Q + ".deq_scale[3]", "input_scale·weight_scale")

    d2 = tmp_path / "sh"
    shutil.copytree(outputs["compressed-tensors", True], d2)
    idx = json.loads((d2 / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    shard = d2 / idx["weight_map"][name]
    _rewrite(shard, lambda t: t.pop(name))
    _fails_naming(d2, name, "model.safetensors.index.json")


def test_int8_weight_out_of_range_is_named(outputs, tmp_path):
    d = _broken(outputs, tmp_path, ("msmodelslim", False))
    _rewrite(d / "quant_model_weight_w8a8.safetensors", lambda t: t[Q + ".weight"].view(-1)[0:1].fill_(-128))
    _fails_naming(d, Q + ".weight", "-128")
