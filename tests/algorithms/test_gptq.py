"""Issue #15: GPTQ weights from cached input moments (``--weight_method gptq``)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from llavaq import api
from llavaq.algorithms.gptq import GPTQOptions, gptq_codes, prepare_hessian, weighted_error
from llavaq.algorithms.hessian import InputMoments, pack_upper, smoothed_hessian, unpack_upper
from llavaq.calib.engine import ForwardCounter
from llavaq.errors import CacheError
from llavaq.quant.int8 import quantize_weight, weight_qparams
from llavaq.quant.state import plan_stage
from llavaq.quant.tensor_stream import iter_float_tensors
from llavaq.recipe import DEFAULT_PROMPT, QuantRecipe


def reference_gptq(w: torch.Tensor, h: torch.Tensor, ws: torch.Tensor, damp: float, order=None) -> torch.Tensor:
    """Textbook OBQ in float64: quantize one column, spread its error with the explicit inverse Hessian,
    then remove that column from the inverse (rank-one downdate). No Cholesky, no blocks."""
    w, h, ws = w.double().clone(), h.double().clone(), ws.double().reshape(-1)
    n = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = list(range(n)) if order is None else list(order)
    h = h + damp * float(torch.diagonal(h).mean()) * torch.eye(n, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros_like(w)
    for k, j in enumerate(order):
        q = torch.clamp(torch.round(w[:, j] / ws), -127, 127)
        codes[:, j] = q
        delta = (w[:, j] - q * ws) / hinv[j, j]
        rest = order[k + 1:]
        w[:, rest] -= delta.unsqueeze(1) * hinv[j, rest].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes.to(torch.int8)


def _layer(seed: int, n_in: int = 48, n_out: int = 20, tokens: int = 300):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5 + torch.eye(n_in)  # correlated channels
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, :3] *= 12  # outlier channels, as in real activations
    x[:, 5] = 0  # a dead channel
    w = torch.randn(n_out, n_in, generator=g) / n_in**0.5
    return x, w


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_gptq_equals_float64_column_by_column_reference(act_order, block_size):
    x, w = _layer(0)
    h = x.double().T @ x.double()
    ws = weight_qparams(w)
    opts = GPTQOptions(damp=0.01, block_size=block_size, act_order=act_order)
    prep = prepare_hessian(h, opts, dtype=torch.float64)
    got = gptq_codes(w, ws, prep, opts)
    order = prep.perm.tolist() if act_order else None
    want = reference_gptq(w, h, ws, 0.01, order)
    assert got.dtype == torch.int8 and got.shape == w.shape
    assert torch.equal(got, want)
    assert act_order == (prep.perm is not None) and int(prep.perm[0] if act_order else 0) in (0, 1, 2)


def test_gptq_output_error_on_calibration_rows_is_below_rtn():
    for seed in range(4):
        x, w = _layer(seed)
        h = x.double().T @ x.double()
        ws = weight_qparams(w)
        opts = GPTQOptions()
        codes32 = gptq_codes(w, ws, prepare_hessian(h, opts), opts)  # the float32 path used by exports
        codes64 = gptq_codes(w, ws, prepare_hessian(h, opts, dtype=torch.float64), opts)
        assert (codes32 == codes64).float().mean() > 0.995  # float32 rounding flips a tie now and then
        rtn = quantize_weight(w, ws)
        assert codes32.abs().max() <= 127 and not torch.equal(codes32, rtn)

        def out_err(c, x=x, w=w, ws=ws):
            return float(((x @ (w - c.float() * ws).T) ** 2).sum())

        assert out_err(codes32) < 0.9 * out_err(rtn), seed
        # the reported error is the same quantity, relative to the output power
        rel = weighted_error(w, codes32.float() * ws, h)
        assert rel == pytest.approx(out_err(codes32) / float(((x @ w.T) ** 2).sum()), rel=1e-4)


def test_input_moments_merge_batches_and_give_the_smoothed_hessian_exactly():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 16, generator=g) * 0.5 + torch.linspace(-40, 40, 16) for n in (7, 130, 1, 64)]
    m = InputMoments()
    for b in batches:
        m.update(b.reshape(1, -1, 16))  # [batch, tokens, channels] like a Linear's input
    x = torch.cat(batches).double()
    assert m.n == x.shape[0] and torch.allclose(m.mean, x.mean(0), rtol=0, atol=1e-12)
    back = InputMoments.from_tensors(**m.to_tensors())
    assert back.n == m.n and torch.equal(back.mean, m.mean) and torch.equal(back.cov, m.cov.double())
    scale = torch.rand(16, generator=g) * 3 + 0.1
    shift = torch.randn(16, generator=g) * 40
    for s, z in ((None, None), (scale, None), (scale, shift)):
        xs = x - (z.double() if z is not None else 0)
        xs = xs / (s.double() if s is not None else 1)
        want = xs.T @ xs
        got = smoothed_hessian(back, s, z)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), (s is None, z is None)


def test_pack_upper_round_trip():
    a = torch.randn(9, 9, dtype=torch.float64)
    a = a + a.T
    v = pack_upper(a)
    assert v.numel() == 45 and v.dtype == torch.float32
    assert torch.equal(unpack_upper(v, 9), a.float().double())
    with pytest.raises(ValueError):
        unpack_upper(v, 8)


# ------------------------------------------------------------------------------------------ through the cache
@pytest.fixture(scope="module")
def gptq_cache(tiny_model, calib_dir, tmp_path_factory):
    recipe = QuantRecipe(anti_outlier="none", act_method=1, weight_method="gptq")
    cal = api.calibrate(tiny_model, calib_dir, recipe, cache_dir=tmp_path_factory.mktemp("gptq-cache"),
                        device_type="cpu")
    return cal


def test_hessian_of_a_derived_smoothing_equals_the_smoothed_models_input(gptq_cache, tiny_model, calib_dir):
    """Moments recorded once (unsmoothed float model) give H of the input of a model smoothed later."""
    from transformers import LlavaForConditionalGeneration

    from llavaq.calib.samples import build_samples, load_processor

    cache = gptq_cache.cache
    arch = api.open_model(tiny_model)
    derived = QuantRecipe(anti_outlier="m1", alpha=0.8, act_method=1, input_moments=True)
    smoothed = dict(iter_float_tensors(arch, cache, derived, dequantize=False, derive=True,
                                       float_dtype=torch.float32))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    model.load_state_dict(smoothed, strict=False)
    targets = {"vision_tower.vision_model.encoder.layers.1.self_attn.q_proj": None,  # LayerNorm group: shift
               "language_model.model.layers.1.mlp.gate_proj": None,  # RMSNorm group: scale only
               "language_model.model.layers.0.self_attn.o_proj": None}  # not smoothed
    hooks = []
    for name in targets:
        def hook(_m, args, name=name):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            targets[name] = x.T @ x if targets[name] is None else targets[name] + x.T @ x
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    proc = load_processor(tiny_model)
    images = [Image.open(p).convert("RGB") for p in sorted(calib_dir.iterdir())]
    with torch.no_grad():
        for s in build_samples(proc, images, DEFAULT_PROMPT):
            model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask)
    for h in hooks:
        h.remove()
    quantized = set(arch.quantized_linears())
    for name, want in targets.items():
        stage = arch.stage_of(name)
        record = cache.read_stage(stage.name)
        weights = {stage.prefix + k: v for k, v in arch.ckpt.tensors(stage.prefix).items()}
        plan = plan_stage(arch, stage, record, derived, True, quantized, weights)
        key = arch.shared_inputs(stage)[name]
        group = next((g for g in arch.smooth_groups(stage) if name in g.linears), None)
        scale, shift = plan.smooth[group.name] if group is not None else (None, None)
        moments = InputMoments.from_tensors(*(record[f"hess.{key}.{k}"] for k in ("n", "mean", "cov")))
        got = smoothed_hessian(moments, scale, shift)
        assert (scale is not None) == (name != "language_model.model.layers.0.self_attn.o_proj")
        assert (shift is not None) == name.startswith("vision_tower")
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 2e-5, (name, err)


def test_gptq_export_runs_no_forward_pass_and_lowers_every_linears_error(gptq_cache, tiny_model, tmp_path):
    cache = gptq_cache.cache
    before = ForwardCounter.count
    res = api.export(tiny_model, cache, tmp_path / "gptq", format="msmodelslim",
                     recipe=QuantRecipe.from_dict(cache.manifest["recipe"]).replace(anti_outlier="m1", alpha=0.8))
    rtn = api.export(tiny_model, cache, tmp_path / "rtn", recipe=QuantRecipe.from_dict(cache.manifest["recipe"])
                     .replace(anti_outlier="m1", alpha=0.8, weight_method="rtn"))
    assert ForwardCounter.count == before
    assert res.derived and set(res.gptq_error) == set(api.open_model(tiny_model).quantized_linears())
    ratios = [e["gptq"] / e["rtn"] for e in res.gptq_error.values()]
    assert max(ratios) <= 1.0 and sorted(ratios)[len(ratios) // 2] < 0.9, ratios
    rec = json.loads((res.save_directory / "llavaq_record.json").read_text())
    assert rec["recipe"]["weight_method"] == "gptq" and rec["gptq"]["damp"] == 0.01
    assert rec["gptq"]["error"] == res.gptq_error  # JSON floats round-trip exactly
    assert not rtn.gptq_error and json.loads((rtn.save_directory / "llavaq_record.json").read_text()).get("gptq") \
        is None
    # same grid (scales, activation params); only rounding decisions differ
    from safetensors.torch import load_file

    a = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    b = load_file(str(rtn.save_directory / "quant_model_weight_w8a8.safetensors"))
    assert a.keys() == b.keys()
    name = "language_model.model.layers.0.self_attn.q_proj"
    for suffix in ("weight_scale", "input_scale", "input_offset", "deq_scale"):
        assert torch.equal(a[f"{name}.{suffix}"], b[f"{name}.{suffix}"]), suffix
    assert not torch.equal(a[f"{name}.weight"], b[f"{name}.weight"])
    assert (a[f"{name}.weight"].int() - b[f"{name}.weight"].int()).abs().max() <= 3
    # inspect shows the weight method and the per-Linear error reduction
    from llavaq.cli import app

    r = CliRunner().invoke(app, ["inspect", str(res.save_directory), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["weight_method"] == "gptq" and rep["gptq"]["act_order"] is True
    assert "below round-to-nearest" in rep["gptq_summary"]
    row = next(x for x in rep["layers"] if x["name"] == name)
    assert row["weight_error_gptq"] < row["weight_error_rtn"]


def test_gptq_export_from_a_cache_without_moments_is_refused(quantized, tiny_model, tmp_path):
    cal, _res = quantized
    with pytest.raises(CacheError, match="no input moments"):
        api.export(tiny_model, cal.cache, tmp_path / "o",
                   recipe=QuantRecipe.from_dict(cal.cache.manifest["recipe"]).replace(weight_method="gptq"))
    assert not (tmp_path / "o").exists()


def test_default_recipe_cache_key_is_unchanged_and_gptq_keys_its_own():
    assert "input_moments" not in QuantRecipe().calibration_dict()
    assert QuantRecipe(weight_method="gptq").calibration_dict()["input_moments"] is True
    assert QuantRecipe(weight_method="gptq").calibration_key() != QuantRecipe().calibration_key()
    # weight_method itself is export-time: the same moments serve rtn and gptq
    assert QuantRecipe(weight_method="gptq").calibration_key() == QuantRecipe(input_moments=True).calibration_key()


def test_cli_export_gptq_with_smooth_vo_from_one_cache(gptq_cache, tiny_model, tmp_path):
    from llavaq.cli import app

    out = tmp_path / "fq"
    r = CliRunner().invoke(app, ["export", "--model_path", str(tiny_model), "--cache", str(gptq_cache.cache.path),
                                 "--save_directory", str(out), "--format", "fakequant", "--anti_outlier", "m1",
                                 "--alpha", "0.8", "--smooth_vo", "--weight_method", "gptq", "--gptq_act_order",
                                 "False", "--gptq_damp", "0.05"])
    assert r.exit_code == 0, r.output
    assert "GPTQ: output error on the calibration inputs" in r.output
    rec = json.loads((out / "llavaq_record.json").read_text())
    assert rec["recipe"]["smooth_vo"] is True and rec["gptq"]["act_order"] is False and rec["gptq"]["damp"] == 0.05
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "below round-to-nearest" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["export", "--model_path", str(tiny_model), "--cache", str(gptq_cache.cache.path),
                                 "--save_directory", str(tmp_path / "bad"), "--weight_method", "awq"])
    assert r.exit_code != 0 and "--weight_method must be one of rtn, gptq" in str(r.exception)


def test_weighted_input_moments_equal_the_weighted_sums():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(90, 12, generator=g) * torch.linspace(0.1, 4, 12) + 2.0
    w = torch.rand(90, generator=g).double() * 3
    m = InputMoments()
    for lo, hi in ((0, 30), (30, 31), (31, 90)):
        m.update(x[lo:hi], w[lo:hi])
    xd = x.double()
    mean = (w[:, None] * xd).sum(0) / w.sum()
    cov = ((xd - mean) * w[:, None]).T @ (xd - mean)
    assert m.n == pytest.approx(float(w.sum()))
    assert torch.allclose(m.mean, mean, atol=1e-12)
    assert torch.allclose(m.cov.double(), cov, rtol=1e-5, atol=1e-4)
    back = InputMoments.from_tensors(**m.to_tensors())
    assert back.n == pytest.approx(m.n) and torch.equal(back.mean, m.mean)


def test_balanced_gptq_tokens_weigh_image_and_text_rows_half_each(tiny_model, calib_dir, tmp_path):
    """``--gptq_tokens balanced``: the language model's H is Σ w·x xᵀ with image rows and text rows each
    weighing half of the calibration set (the vision tower's, all image rows, is unchanged)."""
    from transformers import LlavaForConditionalGeneration

    from llavaq.calib.samples import build_samples, load_processor

    recipe = QuantRecipe(anti_outlier="none", act_method=1, weight_method="gptq", gptq_tokens="balanced")
    assert recipe.calibration_key() != recipe.replace(gptq_tokens="all").calibration_key()
    assert "gptq_tokens" not in QuantRecipe(weight_method="gptq").calibration_dict()  # old caches keep their key
    cal = api.calibrate(tiny_model, calib_dir, recipe, cache_dir=tmp_path / "cache", device_type="cpu")
    arch = api.open_model(tiny_model)
    proc = load_processor(tiny_model)
    images = [Image.open(p).convert("RGB") for p in sorted(calib_dir.iterdir())]
    samples = build_samples(proc, images, DEFAULT_PROMPT)
    masks = [arch.image_rows(s.input_ids) for s in samples]
    n_img, n_all = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    assert 0 < n_img < n_all and n_img == len(samples) * arch.image_tokens
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model, torch_dtype=torch.float32).eval()
    name = "language_model.model.layers.1.self_attn.o_proj"
    want, cur = [torch.zeros(())], {}

    def hook(_m, args):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        w = torch.where(cur["mask"], n_all / (2 * n_img), n_all / (2 * (n_all - n_img))).double()
        want[0] = want[0] + (x * w[:, None]).T @ x

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        for s, mask in zip(samples, masks, strict=True):
            cur["mask"] = mask
            model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask)
    h.remove()
    stage = arch.stage_of(name)
    record = cal.cache.read_stage(stage.name)
    key = arch.shared_inputs(stage)[name]
    moments = InputMoments.from_tensors(*(record[f"hess.{key}.{k}"] for k in ("n", "mean", "cov")))
    assert moments.n == pytest.approx(n_all)
    got = smoothed_hessian(moments, None, None)
    assert float((got - want[0]).abs().max() / want[0].abs().max()) < 2e-5
    # an export takes the cache's token weighting and records it
    res = api.export(tiny_model, cal.cache, tmp_path / "out", recipe=QuantRecipe(anti_outlier="m1", alpha=0.8,
                                                                                act_method=1, weight_method="gptq"))
    rec = json.loads((res.save_directory / "llavaq_record.json").read_text())
    assert rec["recipe"]["gptq_tokens"] == "balanced" and rec["recipe"]["weight_method"] == "gptq"
