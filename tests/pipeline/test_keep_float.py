"""--keep_float / --float_linears: sensitive Linears kept in float at export time, from the session cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llavaq import api
from llavaq.algorithms.sensitivity import most_sensitive, w8a8_relative_error
from llavaq.api import open_model
from llavaq.calib.engine import ForwardCounter
from llavaq.errors import LlavaqError
from llavaq.formats.names import matching_layouts, module_pattern
from llavaq.formats.reader import read_quantized
from llavaq.quant.float_linears import fused_groups, linear_errors, resolve_float_linears, whole_fused_groups
from llavaq.recipe import QuantRecipe


def _numpy_error(rows, w, b, s_in, o_in, scale, shift):
    """Independent reference of w8a8_relative_error in float64 numpy."""
    x = (rows.double().numpy() - shift.double().numpy()) / scale.double().numpy()
    w = w.double().numpy()
    ws = np.maximum(np.abs(w).max(1, keepdims=True) / 127, np.finfo(np.float32).eps)
    wq = np.clip(np.round(w / ws), -128, 127) * ws
    s, o = float(s_in), float(o_in)
    xq = (np.clip(np.round(x / s) + o, -128, 127) - o) * s
    y = x @ w.T + b.double().numpy()
    yq = xq @ wq.T + b.double().numpy()
    return ((yq - y) ** 2).sum() / (y**2).sum()


def test_relative_error_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 32, generator=g) * 3
    rows[:, 5] *= 20  # an outlier channel
    w, b = torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    scale, shift = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g) * 0.1
    xs = (rows - shift) / scale
    s_in = (xs.max() - xs.min()) / 255
    o_in = torch.round(-128 - xs.min() / s_in)
    ours = w8a8_relative_error(rows, w, b, s_in.reshape(1), o_in.reshape(1), scale, shift)
    ref = _numpy_error(rows, w, b, s_in, o_in, scale, shift)
    assert ours == pytest.approx(ref, rel=1e-3)
    assert 0 < ours < 1e-2


def test_relative_error_is_zero_when_quantization_is_exact():
    rows = torch.randint(-100, 100, (20, 8)).float()
    w = torch.randint(-127, 128, (4, 8)).float()
    w[:, 0] = 127  # every row's absmax is 127: weight scale 1, exact
    assert w8a8_relative_error(rows, w, None, torch.tensor([1.0]), torch.tensor([0.0])) == 0.0


def test_most_sensitive_is_deterministic():
    assert most_sensitive({"a": 1.0, "b": 3.0, "c": 3.0, "d": 0.5}, 2) == ["b", "c"]
    assert most_sensitive({"a": 1.0}, 0) == []


@pytest.fixture(scope="module")
def kept(quantized, tiny_model, tmp_path_factory):
    cal, _ = quantized
    root = tmp_path_factory.mktemp("keep_float")
    before = ForwardCounter.count
    base = QuantRecipe.from_dict(cal.cache.manifest["recipe"])
    res = {fmt: api.export(tiny_model, cal.cache, root / fmt, format=fmt, recipe=base.replace(keep_float=3))
           for fmt in ("msmodelslim", "compressed-tensors")}
    res["forward_passes"] = ForwardCounter.count - before
    res["errors"] = linear_errors(open_model(tiny_model), cal.cache, base)
    return res


def test_keep_float_keeps_the_most_sensitive_linears_in_float(kept, quantized, tiny_model):
    assert kept["forward_passes"] == 0
    errors = kept["errors"]
    arch = open_model(tiny_model)
    assert set(errors) == set(arch.quantized_linears())  # every quantized Linear has cached rows
    top3 = most_sensitive(errors, 3)
    res = kept["msmodelslim"]
    # each chosen Linear with its whole fused group (q/k/v, gate/up): vLLM runs a group as one Linear
    kept_set = set(top3) | set(whole_fused_groups(arch, set(top3)))
    assert set(res.kept_float) == kept_set and res.fused_float == sorted(kept_set - set(top3),
                                                                         key=arch.linear_names.index)
    for group in fused_groups(arch):
        assert len({n in kept_set for n in group}) == 1, group  # whole or not at all
    n = len(kept_set)
    assert res.quantized == quantized[1].quantized - n and res.float_modules == quantized[1].float_modules + n
    desc = json.loads((res.save_directory / "quant_model_description.json").read_text())
    tensors = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    for name in kept_set:
        assert desc[name + ".weight"] == "FLOAT" and tensors[name + ".weight"].is_floating_point()
        assert name + ".input_scale" not in tensors and name + ".deq_scale" not in tensors
    record = json.loads((res.save_directory / "llavaq_record.json").read_text())
    assert record["recipe"]["keep_float"] == 3 and set(record["recipe"]["float_linears"]) == kept_set
    assert record.get("keep_float_fused", []) == res.fused_float
    assert read_quantized(res.save_directory).check() == []


def test_fused_groups_are_qkv_and_gate_up(tiny_model):
    arch = open_model(tiny_model)
    leaves = {tuple(n.rpartition(".")[2] for n in g) for g in fused_groups(arch)}
    assert leaves == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}  # CLIP's q/k/v too; fc1 alone
    lm, clip = "language_model.model.layers.1.", "vision_tower.vision_model.encoder.layers.0."
    got = whole_fused_groups(arch, {lm + "mlp.up_proj", clip + "self_attn.k_proj", lm + "mlp.down_proj"})
    assert sorted(got) == sorted([clip + "self_attn.q_proj", clip + "self_attn.v_proj", lm + "mlp.gate_proj"])
    assert got == [n for n in arch.linear_names if n in got]


def test_keep_float_in_compressed_tensors_ignore(kept):
    cfg = json.loads((kept["compressed-tensors"].save_directory / "config.json").read_text())
    ignore = cfg["quantization_config"]["ignore"]
    kept_float = kept["compressed-tensors"].kept_float
    assert kept_float and {module_pattern(n) for n in kept_float} <= set(ignore)
    for n in kept_float:  # ignored as every transformers version and vLLM name it
        assert matching_layouts(ignore, n) == (True, True, True), n
    assert read_quantized(kept["compressed-tensors"].save_directory).check() == []


def test_resolution_is_idempotent_and_explicit_names_are_kept(quantized, tiny_model):
    cal, _ = quantized
    arch = open_model(tiny_model)
    explicit = "language_model.model.layers.0.self_attn.o_proj"
    recipe = QuantRecipe.from_dict(cal.cache.manifest["recipe"]).replace(keep_float=2, float_linears=(explicit,))
    once, errors = resolve_float_linears(arch, cal.cache, recipe)
    twice, _ = resolve_float_linears(arch, cal.cache, once)
    assert once.float_linears == twice.float_linears
    top2 = set(most_sensitive(errors, 2))
    assert set(once.float_linears) == {explicit, *top2, *whole_fused_groups(arch, top2)}


def test_unknown_float_linear_is_a_clear_error(quantized, tiny_model, tmp_path):
    cal, _ = quantized
    recipe = QuantRecipe.from_dict(cal.cache.manifest["recipe"]).replace(float_linears=("language_model.nope",))
    with pytest.raises(LlavaqError, match="no Linear named 'language_model.nope'"):
        api.export(tiny_model, cal.cache, tmp_path / "out", recipe=recipe)
    assert not (tmp_path / "out").exists()


def test_unknown_float_linear_fails_before_calibration(tiny_model, calib_dir, tmp_path):
    before = ForwardCounter.count
    with pytest.raises(LlavaqError, match="no Linear named 'nope'"):
        api.quantize(tiny_model, calib_dir, tmp_path / "out", QuantRecipe(float_linears=("nope",)),
                     cache_dir=tmp_path / "cache")
    assert ForwardCounter.count == before and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_negative_keep_float_is_refused():
    with pytest.raises(LlavaqError, match="--keep_float must be an integer >= 0, not -1"):
        QuantRecipe(keep_float=-1)
