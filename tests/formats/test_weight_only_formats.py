"""Weight-only exports (issue 28) in every format: the same codes, scales and zero points read back, consistent
files, verify's weight-only kernel emulation, inspect's bits / group size / error, one calibration for all."""

from __future__ import annotations

import json

import pytest
import torch
from hostile_guard import cli, one_error

from llavaq import api
from llavaq.formats.reader import read_quantized
from llavaq.quant.weight_only import dequantize_groups
from llavaq.recipe import QuantRecipe
from llavaq.verify import build_quantized_model, load_float_model, read_quantized_output

FORMATS = ("msmodelslim", "mindie", "compressed-tensors", "fakequant")
W4 = QuantRecipe(w_bit=4, a_bit=16, group_size=16, w_sym=False, weight_method="gptq")


@pytest.fixture(scope="module")
def w4_exports(tiny_model, calib_dir, tmp_path_factory):
    """W4A16 GPTQ (act order, group 16, zero points) of the tiny model in every format, one calibration."""
    root = tmp_path_factory.mktemp("w4")
    cal = api.calibrate(tiny_model, calib_dir, W4, cache_dir=root / "cache", device_type="cpu")
    f32 = W4.replace(float_dtype="float32")
    return cal, {fmt: api.export(tiny_model, cal.cache, root / fmt, format=fmt,
                                 recipe=f32 if fmt == "fakequant" else W4) for fmt in FORMATS}


def _linears(path):
    v = read_quantized(path)
    assert v.check() == []
    return {lv.name: lv for lv in v.linears()}


def test_every_format_carries_the_same_weight_only_model(w4_exports):
    _, res = w4_exports
    ref = _linears(res["msmodelslim"].save_directory)
    assert len(ref) == 26
    q = ref["language_model.model.layers.0.self_attn.q_proj"]
    assert q.bits == 4 and q.group_size == 16 and q.weight_scale.shape == (64, 4) and q.activation == "none"
    assert int(q.weight.min()) >= -8 and int(q.weight.max()) <= 7 and (q.weight_offset != 0).any()
    for fmt in FORMATS[1:]:
        got = _linears(res[fmt].save_directory)
        for n, lv in ref.items():
            assert torch.equal(got[n].weight, lv.weight), (fmt, n)
            assert torch.equal(got[n].weight_scale.float(), lv.weight_scale.float()), (fmt, n)
            assert torch.equal(got[n].weight_offset.float(), lv.weight_offset.float()), (fmt, n)
    # msModelSlim's ascendV1 packs int4 two to a byte (pairs of output rows when group-wise); MindIE's does not
    from safetensors import safe_open

    for fmt, shape in (("msmodelslim", (32, 64)), ("mindie", (64, 64))):
        d = res[fmt].save_directory
        f = next(d.glob("quant_model_weight_w4a16*.safetensors"))
        with safe_open(f, "pt") as sf:
            assert tuple(sf.get_tensor("language_model.model.layers.0.self_attn.q_proj.weight").shape) == shape
    ct = json.loads((res["compressed-tensors"].save_directory / "config.json").read_text())["quantization_config"]
    w = ct["config_groups"]["group_0"]["weights"]
    assert ct["format"] == "pack-quantized" and (w["num_bits"], w["symmetric"], w["strategy"], w["group_size"],
                                                 w["actorder"]) == (4, False, "group", 16, "weight")


def test_gptq_record_and_inspect_show_bits_groups_and_errors(w4_exports, capsys):
    _, res = w4_exports
    d = res["msmodelslim"].save_directory
    rec = json.loads((d / "llavaq_record.json").read_text())
    wo = rec["weight_only"]
    assert (wo["quant_type"], wo["w_bit"], wo["group_size"], wo["w_sym"]) == ("W4A16", 4, 16, False)
    assert len(wo["weight_error"]) == 26 and all(0 < e < 0.05 for e in wo["weight_error"].values())
    errs = res["msmodelslim"].gptq_error
    assert sum(e["gptq"] for e in errs.values()) < 0.9 * sum(e["rtn"] for e in errs.values())
    from llavaq.inspect import inspect_output

    rows = {row["name"]: row for row in inspect_output(d)["layers"]}
    row = rows["language_model.model.layers.0.mlp.up_proj"]
    assert (row["bits"], row["group_size"], row["zero_point"], row["input_scale"]) == (4, 16, True, "float")
    assert row["weight_error"] == pytest.approx(wo["weight_error"]["language_model.model.layers.0.mlp.up_proj"],
                                                rel=1e-3)
    r = cli(capsys, "inspect", d)
    assert r.code == 0, r.err
    assert "W4A16" in r.out


@torch.no_grad()
def test_verify_emulates_the_weight_only_kernel_exactly(tiny_model, w4_exports):
    """The emulated Linear computes x·((W_q − o)·s)ᵀ + b with the stored tensors; the float32 fakequant export is that
    weight bit for bit."""
    _, res = w4_exports
    q = read_quantized_output(res["msmodelslim"].save_directory)
    fq = read_quantized(res["fakequant"].save_directory)
    model = build_quantized_model(load_float_model(tiny_model), q)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for name in ("language_model.model.layers.1.mlp.up_proj", "multi_modal_projector.linear_2"):
        p = q.linears[name]
        w = dequantize_groups(p.weight, p.weight_scale, p.weight_offset)
        assert torch.equal(w, fq.tensor(name + ".weight"))
        lin = model.get_submodule(name)
        assert lin.mode == "weight_only"
        want = x[:, :w.shape[1]] @ w.T + (p.bias.float() if p.bias is not None else 0)
        assert torch.equal(lin(x[:, :w.shape[1]]), want)
    rep = api.verify(tiny_model, res["msmodelslim"].save_directory, layer_errors=False)
    assert 0 <= rep.text_kl < 0.5 and rep.image_top1 > 0.5


def test_weight_only_from_a_w8a8_cache_needs_no_new_calibration(tiny_model, quantized, tmp_path):
    """W8A16 from the default (m2) W8A8 cache: derived, without smoothing: round to nearest of the checkpoint's own
    weights, as msModelSlim's data-free weight-only quantization."""
    from safetensors.torch import load_file

    from llavaq.quant.weight_only import group_qparams, quantize_groups

    cal, _ = quantized
    r = QuantRecipe(w_bit=8, a_bit=16, group_size=16)
    res = api.export(tiny_model, cal.cache, tmp_path / "w8", recipe=r)
    assert res.derived and r.anti_outlier == "none"
    src = load_file(str(tiny_model / "model.safetensors"))
    for name, lv in _linears(res.save_directory).items():
        w = src[name + ".weight"].float()
        s, o = group_qparams(w, 8, 16, True)
        assert torch.equal(lv.weight, quantize_groups(w, s, o, 8)) and torch.equal(lv.weight_scale, s), name


def test_weight_only_cli_flags_and_refusals(tiny_model, full_cache, tmp_path, capsys):
    r = cli(capsys, "export", "--model_path", tiny_model, "--cache", full_cache, "--save_directory", tmp_path / "o",
            "--w_bit", "4", "--a_bit", "16", "--group_size", "16", "--w_sym", "False", "--format", "compressed-tensors")
    assert r.code == 0, r.err
    lv = _linears(tmp_path / "o")["language_model.model.layers.0.self_attn.k_proj"]
    assert (lv.bits, lv.group_size, lv.weight_offset is not None) == (4, 16, True)
    r = cli(capsys, "export", "--model_path", tiny_model, "--cache", full_cache, "--save_directory", tmp_path / "p",
            "--w_bit", "4", "--a_bit", "16", "--group_size", "32")
    one_error(r, "--group_size 32 does not divide its 48 input columns", "vision_tower")
    assert not (tmp_path / "p").exists()
