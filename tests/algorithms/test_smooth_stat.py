"""``--smooth_stat``: SmoothQuant's per-channel activation statistic (absmax, or llm-compressor's max − min)."""

from __future__ import annotations

import pytest
import torch

from llavaq import api
from llavaq.algorithms.smoothquant import act_statistic, smoothquant_group
from llavaq.calib.engine import ForwardCounter
from llavaq.errors import LlavaqError
from llavaq.formats.reader import read_quantized
from llavaq.model.llava import SmoothGroup
from llavaq.quant.int8 import activation_qparams
from llavaq.recipe import QuantRecipe


def _group(shift: bool) -> SmoothGroup:
    return SmoothGroup("g", "llama_qkv", "n", ("a", "b"), shift)


def test_act_statistic_values():
    mn = torch.tensor([-1.0, -4.0, 0.5, -0.25])
    mx = torch.tensor([3.0, 4.0, 2.0, -0.125])
    assert act_statistic(mn, mx, False).tolist() == [3.0, 4.0, 2.0, 0.25]
    assert act_statistic(mn, mx, False, "range").tolist() == [4.0, 8.0, 1.5, 0.125]
    # a centred (LayerNorm) group uses the half-range whatever the statistic: the same scales
    assert act_statistic(mn, mx, True).tolist() == act_statistic(mn, mx, True, "range").tolist() == \
        [2.0, 4.0, 0.75, 0.0625]
    with pytest.raises(ValueError):
        act_statistic(mn, mx, False, "mean")


def test_range_scale_is_llm_compressors_up_to_a_constant():
    g = torch.Generator().manual_seed(0)
    mn, mx = -torch.rand(64, generator=g) * 3, torch.rand(64, generator=g) * 5
    ws = [torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)]
    s, shift = smoothquant_group(_group(False), mn, mx, ws, 0.8, stat="range")
    assert shift is None
    w_absmax = torch.cat(ws).abs().amax(0)
    torch.testing.assert_close(s, (mx - mn).pow(0.8) / w_absmax.pow(0.2))
    # llm-compressor (modifiers/transform/smoothquant/base.py): (max - min)^α / (2·max|W|)^(1-α): a constant
    # factor 2^(1-α) apart, which moves every smoothed column and range alike and changes no integer
    llmc = (mx - mn).pow(0.8) / (2 * w_absmax).pow(0.2)
    ratio = s / llmc
    torch.testing.assert_close(ratio, torch.full_like(ratio, 2 ** 0.2))
    absmax, _ = smoothquant_group(_group(False), mn, mx, ws, 0.8)
    assert not torch.allclose(absmax / s, (absmax / s)[0].expand_as(s))  # per channel, not a constant apart
    # centred groups: the statistic changes nothing
    a, za = smoothquant_group(_group(True), mn, mx, ws, 0.8)
    b, zb = smoothquant_group(_group(True), mn, mx, ws, 0.8, stat="range")
    assert torch.equal(a, b) and torch.equal(za, zb)


def test_recipe_field_and_cache_key():
    with pytest.raises(LlavaqError, match="--smooth_stat must be one of absmax, range"):
        QuantRecipe(smooth_stat="mean")
    base = QuantRecipe(anti_outlier="m1", alpha=0.8)
    assert "smooth_stat" not in base.calibration_dict()  # caches made before the field keep their ids
    assert base.replace(smooth_stat="range").calibration_key() != base.calibration_key()
    none = QuantRecipe(anti_outlier="none")  # only m1 smooths with it at calibration time
    assert none.replace(smooth_stat="range").calibration_key() == none.calibration_key()
    assert QuantRecipe.from_dict(base.replace(smooth_stat="range").to_dict()).smooth_stat == "range"


def test_derived_export_with_range_statistic(quantized, tiny_model, tmp_path):
    cal, _ = quantized
    cached = QuantRecipe.from_dict(cal.cache.manifest["recipe"])
    before = ForwardCounter.count
    outs = {}
    for stat in ("absmax", "range"):
        res = api.export(tiny_model, cal.cache.path, tmp_path / stat, format="fakequant",
                         recipe=cached.replace(anti_outlier="m1", alpha=0.8, smooth_stat=stat))
        assert res.derived
        outs[stat] = read_quantized(res.save_directory)
    assert ForwardCounter.count == before  # no forward pass
    v = outs["range"]
    assert v.check() == [] and v.record["recipe"]["smooth_stat"] == "range"
    arch = api.open_model(tiny_model)
    st = cal.cache.read_stage("text_layer.0")
    p = "language_model.model.layers.0."
    mn, mx = st[f"float.{p}self_attn.q_proj.min"], st[f"float.{p}self_attn.q_proj.max"]
    w = torch.cat([arch.ckpt.tensor(f"{p}self_attn.{x}_proj.weight") for x in "qkv"]).float()
    s = ((mx - mn).clamp(min=1e-5).pow(0.8) / w.abs().amax(0).clamp(min=1e-5).pow(0.2)).clamp(min=1e-5)
    gamma = arch.ckpt.tensor(p + "input_layernorm.weight")
    stored = v.tensor(p + "input_layernorm.weight")  # smoothed: float16 cannot hold it, so float32 (issue 30)
    assert stored.dtype == torch.float32 and torch.equal(stored, (gamma / s).float())
    scale, offset = activation_qparams((mn / s).min().reshape(1), (mx / s).max().reshape(1))
    lv = v.linear(p + "self_attn.q_proj")
    assert torch.equal(lv.input_scale, scale.float()) and torch.equal(lv.input_offset, offset.float())
    assert not torch.equal(outs["absmax"].tensor(p + "input_layernorm.weight"), v.tensor(p + "input_layernorm.weight"))
    # the CLIP tower's LayerNorm groups are centred: identical under both statistics
    vp = "vision_tower.vision_model.encoder.layers.0."
    assert torch.equal(outs["absmax"].tensor(vp + "layer_norm1.weight"), v.tensor(vp + "layer_norm1.weight"))
