"""Issue #4: calibrate once, export many formats with no forward pass; each format proven by its consumer."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llavaq import api
from llavaq.calib.engine import ForwardCounter
from llavaq.formats.names import matching_layouts
from llavaq.formats.reader import read_quantized
from llavaq.quant.int8 import activation_qparams, fake_quant_activation
from llavaq.quant.tensor_stream import iter_float_tensors
from llavaq.recipe import QuantRecipe

FORMATS = ("msmodelslim", "mindie", "compressed-tensors", "fakequant")
TINY_SHARD_GB = 60_000 / 2**30


def _sha(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def exports(quantized, tiny_model, tmp_path_factory):
    """Every format, one file and sharded, from the session cache of the `quantized` fixture."""
    cal, _ = quantized
    root = tmp_path_factory.mktemp("exports")
    before = ForwardCounter.count
    out = {}
    for fmt in FORMATS:
        for sharded in (False, True):
            out[fmt, sharded] = api.export(tiny_model, cal.cache.path, root / f"{fmt}-{sharded}", format=fmt,
                                           part_file_size=TINY_SHARD_GB if sharded else None)
    out["forward_passes"] = ForwardCounter.count - before
    return out


def test_exports_run_no_forward_pass(exports):
    assert exports["forward_passes"] == 0
    for fmt in FORMATS:
        one, many = exports[fmt, False], exports[fmt, True]
        assert not one.derived
        shards = [f for f in many.files if "-of-" in f]
        assert len(shards) >= 3, (fmt, many.files)
        index = next(f for f in many.files if f.endswith(".safetensors.index.json"))
        wm = json.loads((many.save_directory / index).read_text())["weight_map"]
        assert sorted(set(wm.values())) == shards
        assert one.num_tensors == many.num_tensors == len(wm)


def test_msmodelslim_export_is_byte_identical_to_quantize(exports, quantized):
    _, res = quantized
    assert _sha(exports["msmodelslim", False].save_directory) == _sha(res.save_directory)


def test_hf_outputs_layout(exports, tiny_model):
    for fmt in ("compressed-tensors", "fakequant"):
        d = exports[fmt, False].save_directory
        assert (d / "model.safetensors").is_file()
        assert (d / "tokenizer.json").is_file() and (d / "preprocessor_config.json").is_file()
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["torch_dtype"] == "float16"
        rec = json.loads((d / "llavaq_record.json").read_text())
        assert rec["format"] == fmt and rec["derived_from_cache"] is False
        d2 = exports[fmt, True].save_directory
        assert (d2 / "model.safetensors.index.json").is_file() and (d2 / "model-00001-of-").exists() is False
        assert any(p.name.startswith("model-00001-of-") for p in d2.iterdir())


@pytest.mark.parametrize("sharded", [False, True])
def test_compressed_tensors_library_loads_our_output(exports, tiny_model, sharded):
    """compressed-tensors 0.8.1 parses the config, initialises exactly our Linears, loads our scales and
    zero points and decompresses weights equal to W_q·ws; its activation fake-quant equals ours. Codes and scales
    are the msModelSlim file's bit for bit (float32 scales), its float tensors that file's cast once to fp16."""
    from compressed_tensors.compressors import ModelCompressor, NaiveQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        load_pretrained_quantization,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from transformers import AutoConfig, LlavaForConditionalGeneration

    d = exports["compressed-tensors", sharded].save_directory
    ref = load_file(str(exports["msmodelslim", False].save_directory / "quant_model_weight_w8a8.safetensors"))
    arch = api.open_model(tiny_model)
    quantized = arch.quantized_linears()
    floats = [n for n in arch.linear_names if n not in quantized]

    emitted = json.loads((d / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(emitted)
    assert parsed.model_dump(mode="json") == emitted  # canonical: the library's own serialisation
    g = parsed.config_groups["group_0"]
    assert g.targets == ["Linear"]
    assert (g.weights.num_bits, g.weights.type, g.weights.symmetric, g.weights.strategy, g.weights.dynamic) == (
        8, "int", True, "channel", False)
    ia = g.input_activations
    assert (ia.num_bits, ia.type, ia.symmetric, ia.strategy, ia.dynamic) == (8, "int", False, "tensor", False)
    assert parsed.format == "int-quantized" and parsed.quantization_status == "compressed"
    # one anchored pattern per float Linear, matching it in the 4.37 layout (vLLM too) and in transformers >= 4.52's
    assert len(parsed.ignore) == len(floats) and all(e.startswith("re:^") for e in parsed.ignore)
    assert r"re:^(?:language_model\.)?lm_head$" in parsed.ignore
    for n in floats:
        assert matching_layouts(parsed.ignore, n) == (True, True, True), n
    for n in quantized:
        assert matching_layouts(parsed.ignore, n) == (False, False, False), n
    assert matching_layouts(parsed.ignore, "language_model.model.layers.1.mlp.down_proj") == (True, True, True)
    assert not matching_layouts(parsed.ignore, "language_model.model.layers.1.mlp.down_proj_x")[0]

    mc = ModelCompressor.from_pretrained(str(d))
    assert isinstance(mc.quantization_compressor, NaiveQuantizationCompressor)
    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(str(d))).float().eval()
    names_to_scheme = apply_quantization_config(model, mc.quantization_config)
    assert sorted(names_to_scheme) == sorted(quantized)
    load_pretrained_quantization(model, str(d))
    dense = dict(mc.quantization_compressor.decompress(str(d), names_to_scheme=names_to_scheme))
    assert sorted(dense) == sorted(n + ".weight" for n in quantized)
    x = torch.randn(3, 7, 256) * 4
    for n in quantized:
        wq, ws = ref[n + ".weight"], ref[n + ".weight_scale"]
        assert ws.dtype == torch.float32 and dense[n + ".weight"].dtype == torch.float32  # as the scale
        assert torch.equal(dense[n + ".weight"], wq.float() * ws), n
        mod = model.get_submodule(n)
        assert torch.equal(mod.weight_scale.data, ws.float()), n
        assert torch.equal(mod.input_scale.data, ref[n + ".input_scale"]), n
        assert mod.input_zero_point.dtype == torch.int8
        assert torch.equal(mod.input_zero_point.data.float(), ref[n + ".input_offset"]), n
        xi = x[..., : wq.shape[1]]
        theirs = fake_quantize(xi, mod.input_scale, mod.input_zero_point, mod.quantization_scheme.input_activations)
        ours = fake_quant_activation(xi, ref[n + ".input_scale"], ref[n + ".input_offset"])
        assert torch.equal(theirs, ours), n
    # every float tensor is the msModelSlim export's, in the model dtype where that is lossless, else float32
    ours = load_file(str(d / "model.safetensors")) if not sharded else {
        k: v for p in sorted(d.glob("model-*.safetensors")) for k, v in load_file(str(p)).items()}
    dtypes = set()
    for k, v in ref.items():
        if k.rpartition(".")[0] not in quantized or k.endswith(".bias"):
            lossless = torch.equal(v.half().float(), v)
            assert ours[k].dtype == (torch.float16 if lossless else torch.float32), k
            assert torch.equal(ours[k].float(), v), k
            dtypes.add(ours[k].dtype)
    assert dtypes == {torch.float16, torch.float32}  # m2 smoothed CLIP's norms; the rest is unchanged


@pytest.mark.parametrize("sharded", [False, True])
def test_fakequant_loads_with_from_pretrained(exports, quantized, sharded):
    from transformers import LlavaForConditionalGeneration

    cal, _ = quantized
    d = exports["fakequant", sharded].save_directory
    model, info = LlavaForConditionalGeneration.from_pretrained(str(d), output_loading_info=True, torch_dtype="auto")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float16
    ref = load_file(str(exports["msmodelslim", False].save_directory / "quant_model_weight_w8a8.safetensors"))
    sd = model.state_dict()
    rec = json.loads((d / "llavaq_record.json").read_text())
    acts = rec["activation_quant"]
    n_q = 0
    for k in ref:
        if k.endswith(".deq_scale"):
            n = k[: -len(".deq_scale")]
            n_q += 1
            want = (ref[n + ".weight"].float() * ref[n + ".weight_scale"].float()).half()
            assert torch.equal(sd[n + ".weight"], want), n
            assert torch.tensor([acts[n]["input_scale"]], dtype=torch.float32).equal(ref[n + ".input_scale"])
            assert acts[n]["input_offset"] == ref[n + ".input_offset"].item()
    assert n_q == len(acts) == 26
    # the same tensors as the library's dequantized float stream
    tiny = cal.cache.manifest["model_path"]
    flt = dict(iter_float_tensors(api.open_model(tiny), cal.cache, QuantRecipe.from_dict(cal.cache.manifest["recipe"]),
                                  dequantize=True))
    for k, v in flt.items():
        assert torch.equal(sd[k], v), k


def test_reader_gives_identical_kernel_params_for_every_format(exports):
    views = {(f, s): read_quantized(exports[f, s].save_directory) for f in FORMATS for s in (False, True)}
    base = views["msmodelslim", False]  # every format: the same codes and float32 scales (issue 30)
    assert len(base.quantized) == 26
    for key, v in views.items():
        assert v.format == key[0]
        assert v.check() == [], key
        assert sorted(v.quantized) == sorted(base.quantized)
        for n in base.quantized:
            a, b = base.linear(n), v.linear(n)
            for attr in ("weight", "weight_scale", "input_scale", "input_offset", "deq_scale"):
                assert torch.equal(getattr(a, attr), getattr(b, attr)), (key, n, attr)
            # HF formats store the float bias in the checkpoint dtype: msModelSlim's float32 bias cast once
            assert (a.bias is None) == (b.bias is None) and (a.bias is None or torch.equal(a.bias.to(b.bias.dtype),
                                                                                           b.bias))
            assert (b.quant_bias is not None) == (key[0] in ("msmodelslim", "mindie"))


def test_reader_reads_msmodelslim_own_output(exports, tmp_path):
    """msModelSlim writes the same files without llavaq_record.json: the reader still works."""
    d = tmp_path / "msm"
    shutil.copytree(exports["mindie", True].save_directory, d)
    (d / "llavaq_record.json").unlink()
    v = read_quantized(d)
    assert v.format == "mindie" and v.record is None and len(v.quantized) == 26 and v.check() == []
    lv = v.linear("language_model.model.layers.1.mlp.up_proj")
    assert lv.deq_scale.dtype == torch.float32 and lv.quant_bias.dtype == torch.int32


@pytest.mark.parametrize("anti_outlier", ["m1", "none"])
def test_derived_export_matches_smoothquant_formula(quantized, tiny_model, tmp_path, anti_outlier):
    cal, _ = quantized
    recipe = QuantRecipe.from_dict(cal.cache.manifest["recipe"]).replace(anti_outlier=anti_outlier, alpha=0.5)
    before = ForwardCounter.count
    res = api.export(tiny_model, cal.cache.path, tmp_path / "o", format="fakequant", recipe=recipe)
    assert ForwardCounter.count == before
    rec = json.loads((res.save_directory / "llavaq_record.json").read_text())
    assert res.derived and rec["derived_from_cache"] is True and "no forward pass" in rec["derivation"]
    assert rec["recipe"]["anti_outlier"] == anti_outlier
    v = read_quantized(res.save_directory)
    assert v.check() == []
    arch = api.open_model(tiny_model)
    st = cal.cache.read_stage("text_layer.0")
    p = "language_model.model.layers.0."
    mn, mx = st[f"float.{p}self_attn.q_proj.min"], st[f"float.{p}self_attn.q_proj.max"]
    gamma = arch.ckpt.tensor(p + "input_layernorm.weight")
    if anti_outlier == "m1":  # SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1−α) over q,k,v
        w = torch.cat([arch.ckpt.tensor(f"{p}self_attn.{x}_proj.weight") for x in "qkv"])
        s = torch.maximum(mn.abs(), mx.abs()).clamp(min=1e-5).pow(0.5) / w.abs().amax(0).clamp(min=1e-5).pow(0.5)
        s = s.clamp(min=1e-5)
        assert not torch.allclose(s, torch.ones_like(s))
    else:
        s = torch.ones_like(gamma)
    got = v.tensor(p + "input_layernorm.weight")
    # smoothed: float32, as formed (fp16 would round it); unsmoothed: the checkpoint's float16, unchanged
    assert got.dtype == (torch.float32 if anti_outlier == "m1" else torch.float16)
    assert torch.equal(got.float(), gamma / s)
    # activation range = min-max of the smoothed float statistics
    scale, offset = activation_qparams((mn / s).min().reshape(1), (mx / s).max().reshape(1))
    lv = v.linear(p + "self_attn.q_proj")
    assert torch.equal(lv.input_scale, scale.float()) and torch.equal(lv.input_offset, offset.float())
