"""Issue #15: Linear -> Linear smoothing (``--smooth_vo``): v_proj -> o_proj, up_proj -> down_proj."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llavaq import api
from llavaq.algorithms.smoothing import expand_heads, fold_pair, reduce_heads
from llavaq.calib.engine import ForwardCounter
from llavaq.errors import LlavaqError
from llavaq.quant.tensor_stream import iter_float_tensors
from llavaq.recipe import DEFAULT_PROMPT, QuantRecipe
from llavaq.verify import read_quantized_output

LM = "language_model.model.layers."


def _logits(model_dir, state, image):
    from transformers import LlavaForConditionalGeneration

    from llavaq.calib.samples import build_samples, load_processor

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if state is not None:
        _missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected
    s = build_samples(load_processor(model_dir), [image], DEFAULT_PROMPT)[0]
    with torch.no_grad():
        return model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits


def test_fold_pair_is_exact_through_gqa_attention():
    """v_proj rows / s, o_proj columns * s (per KV channel, repeated over its query heads): same output."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      attention_bias=True)
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    x = torch.randn(1, 7, 32)
    pos = torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        ref = attn(x, position_ids=pos)[0]
        heads = (4, 2, 8)
        s = torch.rand(16) * 4 + 0.1
        z = torch.randn(16)
        fold_pair(attn.v_proj.weight.data, attn.v_proj.bias.data, attn.o_proj.weight.data, attn.o_proj.bias.data,
                  s, z, heads)
        got = attn(x, position_ids=pos)[0]
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    e = expand_heads(torch.arange(16.0), heads)
    assert e.tolist() == [*range(8), *range(8), *range(8, 16), *range(8, 16)]  # heads 0,1 read KV head 0
    assert torch.equal(reduce_heads(e, heads, "max"), torch.arange(16.0))


@pytest.fixture(scope="module")
def vo_runs(tiny_model, calib_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vo")
    cal = api.calibrate(tiny_model, calib_dir, QuantRecipe(anti_outlier="m1", alpha=0.8, smooth_vo=True,
                                                           modules="with_down_proj"),
                        cache_dir=root / "cache", device_type="cpu")
    base = api.calibrate(tiny_model, calib_dir, QuantRecipe(anti_outlier="m1", alpha=0.8, modules="with_down_proj"),
                         cache_dir=root / "cache", device_type="cpu")
    return cal, base, root


def test_smooth_vo_leaves_the_float_model_unchanged(vo_runs, tiny_model, calib_dir):
    cal, base, _ = vo_runs
    arch = api.open_model(tiny_model)
    recipe = QuantRecipe.from_dict(cal.cache.manifest["recipe"])
    assert recipe.smooth_vo and cal.cache.path != base.cache.path  # its own session cache
    rec = cal.cache.read_stage("text_layer.0")
    assert rec["smooth.text.0.vo.scale"].shape == (2 * 16,)  # one scale per KV channel (2 KV heads x 16)
    assert "smooth.text.0.down.scale" in rec and "smooth.text.0.vo.shift" not in rec
    assert "smooth.vision.0.vo.shift" in cal.cache.read_stage("vision_layer.0")  # CLIP v/out_proj have biases
    assert not torch.all(rec["smooth.text.0.vo.scale"] == 1)
    smoothed = dict(iter_float_tensors(arch, cal.cache, recipe, dequantize=False, float_dtype=torch.float32))
    plain = dict(iter_float_tensors(arch, base.cache, QuantRecipe.from_dict(base.cache.manifest["recipe"]),
                                    dequantize=False, float_dtype=torch.float32))
    o = LM + "0.self_attn.o_proj.weight"
    ratio = smoothed[o] / plain[o]  # o_proj columns carry the expanded KV scales
    assert torch.allclose(ratio, expand_heads(rec["smooth.text.0.vo.scale"], (4, 2, 16)).expand_as(ratio), rtol=1e-5)
    img = Image.open(sorted(calib_dir.iterdir())[0]).convert("RGB")
    ref = _logits(tiny_model, None, img)
    for state in (smoothed, plain):
        got = _logits(tiny_model, state, img)
        rel = float((got - ref).abs().max() / ref.abs().max())
        assert rel <= 1e-5, rel


def test_smooth_vo_derived_from_a_plain_cache_and_verify_undoes_it(vo_runs, tiny_model, tmp_path):
    _cal, base, _ = vo_runs
    cached = QuantRecipe.from_dict(base.cache.manifest["recipe"])
    before = ForwardCounter.count
    res = api.export(tiny_model, base.cache, tmp_path / "vo", recipe=cached.replace(smooth_vo=True))
    assert ForwardCounter.count == before and res.derived
    q = read_quantized_output(res.save_directory)
    # verify's per-Linear reference recovers the smoothing of o_proj's input from v_proj's weight scale
    from llavaq.verify import LayerErrorHooks

    arch = api.open_model(tiny_model)
    hooks = LayerErrorHooks(q, arch)
    from llavaq.quant.state import plan_stage

    st = arch.stage_of(LM + "1.self_attn.o_proj")
    weights = {st.prefix + k: v for k, v in arch.ckpt.tensors(st.prefix).items()}
    plan = plan_stage(arch, st, base.cache.read_stage(st.name), cached.replace(smooth_vo=True), True,
                      set(arch.quantized_linears("with_down_proj")), weights)
    (s, z), = [plan.smooth[g.name] for g in plan.groups if g.name == "text.1.vo"]
    undo_s, undo_z = hooks.undo[LM + "1.self_attn.o_proj"]
    assert z is None and undo_z is None
    assert torch.allclose(undo_s, expand_heads(s, (4, 2, 16)), rtol=2e-3)  # weight scales stored in fp32 here


def test_smooth_vo_needs_an_anti_outlier_method():
    with pytest.raises(LlavaqError, match="--smooth_vo needs an anti-outlier method"):
        QuantRecipe(anti_outlier="none", smooth_vo=True)
    assert "smooth_vo" not in QuantRecipe().calibration_dict()
    assert QuantRecipe(smooth_vo=True).calibration_dict()["smooth_vo"] is True


def test_verify_reference_of_the_smoothed_source_carries_its_output_scale(vo_runs, tiny_model, calib_dir, tmp_path):
    """v_proj's saved output is (y − z)/s (o_proj takes s back): with float activations only int8 weights differ."""
    from llavaq.verify import verify

    cal, _base, _ = vo_runs
    res = api.export(tiny_model, cal.cache, tmp_path / "vo")
    text = tmp_path / "heldout.txt"
    text.write_text("The cat sat on the table next to a cup of coffee. " * 4)
    rep = verify(tiny_model, res.save_directory, images=calib_dir, text=text, mode="weight_only", worst=100)
    v = [e for e in rep.worst_layers if e.name.endswith("v_proj")]
    assert len(v) == 4 and max(e.rel_mse for e in v) < 1e-3  # 2 CLIP (with a shift) + 2 Llama v_proj
