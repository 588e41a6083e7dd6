"""Issue #3: the quantize pipeline's math and files, on tiny models built in fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from llavaq import api
from llavaq.calib.samples import build_samples, load_processor
from llavaq.quant.int8 import fake_quant_activation
from llavaq.quant.state import unpack_deq_scale
from llavaq.quant.tensor_stream import iter_float_tensors
from llavaq.recipe import DEFAULT_PROMPT, QuantRecipe

SUFFIXES = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")


def _logits(model_dir, state=None, image=None):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected
        assert all("lm_head" in m for m in missing)  # tied models only
    proc = load_processor(model_dir)
    s = build_samples(proc, [image], DEFAULT_PROMPT)[0]
    with torch.no_grad():
        return model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits


@pytest.mark.parametrize("model_fixture", ["tiny_model", "tiny_model_mha"])
def test_smoothing_alone_preserves_float_logits(model_fixture, request, calib_dir, cache_root):
    model_dir = request.getfixturevalue(model_fixture)
    cal = api.calibrate(model_dir, calib_dir, QuantRecipe(), cache_dir=cache_root, device_type="cpu")
    arch = api.open_model(model_dir)
    smoothed = dict(iter_float_tensors(arch, cal.cache, QuantRecipe(), dequantize=False, float_dtype=torch.float32))
    # smoothing really changed the norms and linears
    orig = arch.ckpt.tensor("language_model.model.layers.0.input_layernorm.weight")
    assert not torch.allclose(smoothed["language_model.model.layers.0.input_layernorm.weight"], orig)
    img = Image.open(sorted(calib_dir.iterdir())[1]).convert("RGB")
    ref = _logits(model_dir, image=img)
    got = _logits(model_dir, smoothed, image=img)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel <= 1e-4, rel


def test_quantized_linear_tensors(quantized, tiny_model):
    cal, res = quantized
    arch = api.open_model(tiny_model)
    tensors = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    names = arch.quantized_linears()
    assert len(names) == 2 * 6 + 2 + 2 * 6  # CLIP 6/layer, projector 2, Llama q,k,v,o,gate,up
    assert not any("down_proj" in n or "lm_head" in n for n in names)
    for n in names:
        w = tensors[n + ".weight"]
        out_f, in_f = arch.ckpt.shape(n + ".weight")
        assert w.dtype == torch.int8 and w.shape == (out_f, in_f)
        assert w.abs().max() <= 127
        ws = tensors[n + ".weight_scale"]
        assert ws.shape == (out_f, 1) and ws.dtype == torch.float32  # msModelSlim's CPU run: float32
        assert tensors[n + ".weight_offset"].shape == (out_f, 1) and not tensors[n + ".weight_offset"].any()
        s, o = tensors[n + ".input_scale"], tensors[n + ".input_offset"]
        assert s.shape == (1,) and o.shape == (1,) and s.dtype == torch.float32 and o.dtype == torch.float32
        assert -128 <= o.item() <= 127 and o.item() == round(o.item())
        qb, deq = tensors[n + ".quant_bias"], tensors[n + ".deq_scale"]
        assert qb.dtype == torch.int32 and qb.shape == (out_f,)
        assert deq.dtype == torch.int64 and deq.shape == (out_f,)  # fp16 model: int64-packed float32
        expect = (s * ws.float()).squeeze(1).float()
        bits = expect.numpy().view(np.int32).astype(np.int64)
        assert np.array_equal(deq.numpy(), bits)
    # float modules are saved as FLOAT, float32 as msModelSlim's CPU run writes them (--float_dtype auto on CPU)
    assert tensors["language_model.model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert tensors["language_model.lm_head.weight"].dtype == torch.float32


def test_description_lists_exactly_the_tensors(quantized):
    _, res = quantized
    desc = json.loads((res.save_directory / "quant_model_description.json").read_text())
    assert list(desc)[:2] == ["version", "model_quant_type"]
    assert desc["version"] == "1.0.0" and desc["model_quant_type"] == "W8A8"
    with safe_open(str(res.save_directory / "quant_model_weight_w8a8.safetensors"), "pt") as f:
        keys = set(f.keys())
    entries = {k: v for k, v in desc.items() if k not in ("version", "model_quant_type")}
    assert set(entries) == keys
    for k, tag in entries.items():
        assert tag == ("W8A8" if k.rsplit(".", 1)[-1] in SUFFIXES and not k.endswith("down_proj.weight")
                       and "lm_head" not in k and "embed" not in k and "norm" not in k
                       and "patch_embedding" not in k else "FLOAT"), k
    cfg = json.loads((res.save_directory / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16" and "quantization_config" not in cfg
    for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json"):
        assert (res.save_directory / f).is_file()


def test_sharded_and_mindie_outputs_are_consistent(quantized, tiny_model, tmp_path):
    cal, res = quantized
    single = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    out = tmp_path / "sharded"
    r = api.export(tiny_model, cal.cache, out, format="mindie", part_file_size=60_000 / 2**30)
    index = json.loads((out / "quant_model_weight_w8a8.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("quant_model_weight_w8a8-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"quant_model_weight_w8a8-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    merged = {}
    for s in shards:
        part = load_file(str(out / s))
        assert all(index["weight_map"][k] == s for k in part)
        merged.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)
    desc = json.loads((out / "quant_model_description_w8a8.json").read_text())
    assert list(desc)[0] == "model_quant_type" and set(desc) - {"model_quant_type"} == set(single)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantize"] == "w8a8" and cfg["vision_config"]["quantize"] == "w8a8"
    assert cfg["quantization_config"]["anti_method"] == "m2" and cfg["quantization_config"]["act_method"] == 2
    assert r.derived is False


def test_integer_identity_matches_fake_quant_forward(quantized, tiny_model):
    """y = deq_scale·(x_q·W_qᵀ + quant_bias), from the saved tensors alone, equals the fake-quant Linear."""
    _, res = quantized
    arch = api.open_model(tiny_model)
    t = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    g = torch.Generator().manual_seed(0)
    for n in arch.quantized_linears():
        wq = t[n + ".weight"].to(torch.int64)
        ws = t[n + ".weight_scale"].float()
        s, o = t[n + ".input_scale"], t[n + ".input_offset"]
        bias = t.get(n + ".bias")
        lo, hi = (-128 - o) * s, (127 - o) * s
        x = lo + (hi - lo) * torch.rand(3, 5, wq.shape[1], generator=g)
        # integer path
        xq = torch.clamp(torch.round(x / s + o), -128, 127).to(torch.int64)
        acc = xq @ wq.T + t[n + ".quant_bias"].to(torch.int64)
        y_int = unpack_deq_scale(t[n + ".deq_scale"]) * acc.double()
        # fake-quant path
        y_fq = F.linear(fake_quant_activation(x, s, o).double(), (wq.double() * ws.double()),
                        None if bias is None else bias.double())
        # the only differences: quant_bias rounds b/deq to an integer (≤ deq/2), and the saved float
        # bias is in the checkpoint dtype (fp16: relative 2^-11)
        deq = unpack_deq_scale(t[n + ".deq_scale"]).double()
        b = torch.zeros_like(deq) if bias is None else bias.double()
        bound = 0.5 * deq + b.abs() * 2**-11 + 1e-9 * y_fq.abs().max()
        assert ((y_int - y_fq).abs() <= bound).all(), n


def test_tied_embeddings_are_saved_untied(tiny_model_tied, calib_dir, cache_root, tmp_path):
    cal, res = api.quantize(tiny_model_tied, calib_dir, tmp_path / "o", cache_dir=cache_root, device_type="cpu")
    t = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    assert torch.equal(t["language_model.lm_head.weight"], t["language_model.model.embed_tokens.weight"])


def test_float_dtype_auto_follows_msmodelslim_per_device_and_can_be_forced(quantized, tiny_model, tmp_path):
    from llavaq.formats import get_format
    from llavaq.pipeline import float_dtype_for as _float_dtype

    msm, ct = get_format("msmodelslim"), get_format("compressed-tensors")
    assert _float_dtype("auto", msm, torch.float16, "cpu") == torch.float32  # msModelSlim's CPU run
    assert _float_dtype("auto", msm, torch.float16, "npu") == torch.float16  # its NPU run
    assert _float_dtype("auto", ct, torch.float16, "cpu") == torch.float16  # vLLM loads the checkpoint dtype
    assert _float_dtype("bfloat16", msm, torch.float16, "cpu") == torch.bfloat16
    cal, _ = quantized
    res = api.export(tiny_model, cal.cache, tmp_path / "fp16", recipe=QuantRecipe(float_dtype="float16"))
    t = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    name = "language_model.model.layers.0.self_attn.q_proj"
    assert t[name + ".weight_scale"].dtype == torch.float16 and t[name + ".weight"].dtype == torch.int8
    assert t["language_model.lm_head.weight"].dtype == torch.float16
    assert t[name + ".input_scale"].dtype == torch.float32 and t[name + ".deq_scale"].dtype == torch.int64
