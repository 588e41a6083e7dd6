"""Issue #16: rotations folded into the weights (``--rotation hadamard``).

The math (Hadamard constructions, orthogonality), the rotated float model computing the original logits
(tiny GQA models with tied embeddings, Paley and fallback sizes, attention biases; the demo model), the
recipe/CLI surface, and rotated outputs through export (every format), inspect and verify.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from llavaq import QuantRecipe, api
from llavaq.algorithms.rotation import hadamard_factors, hadamard_matrix, make_rotation
from llavaq.calib.engine import ForwardCounter
from llavaq.errors import CacheError, LlavaqError
from llavaq.model.rotated import rotated_arch
from llavaq.testing import build_tiny_llava

EMBED = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"
PROMPT = "USER: <image>\nDescribe this image in detail. ASSISTANT:"


# --------------------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 76, 108, 124, 576, 896])
def test_hadamard_constructions(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_hadamard_factors_of_model_sizes():
    assert hadamard_factors(4096) == (4096, 1, "sylvester")  # LLaVA-1.5-7B
    assert hadamard_factors(5120) == (256, 20, "paley1")  # 13B
    assert hadamard_factors(576) == (16, 36, "paley2")  # SmolLM2-135M (demo model)
    assert hadamard_factors(896) == (32, 28, "paley2")  # Qwen2-0.5B
    assert hadamard_factors(3584) == (128, 28, "paley2")  # Qwen2-7B
    assert hadamard_factors(100) is None and hadamard_factors(6) is None


@pytest.mark.parametrize("n", [12, 48, 64, 576, 100, 50])
def test_rotation_is_orthogonal_and_seeded(n):
    r = make_rotation(n, 0)
    q = r.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(make_rotation(n, 0).matrix(), q)
    assert not torch.equal(make_rotation(n, 1).matrix(), q)
    if hadamard_factors(n) is None:
        assert r.kind == "random_orthogonal" and "QR" in r.construction
    else:  # Q = H·diag(d)/√n
        assert r.kind == "hadamard"
        assert torch.allclose(q * n**0.5 / r.signs, hadamard_matrix(n), atol=1e-12)


def test_rotation_of_a_7b_residual_stream_without_the_dense_matrix():
    r = make_rotation(4096, 3)
    x = torch.randn(3, 4096, dtype=torch.float64)
    dense = hadamard_matrix(4096) * (r.signs / 64.0)
    assert torch.allclose(r.apply(x), x @ dense, atol=1e-10)


# --------------------------------------------------------------------------------------------- rotated float = original
def rotated_float_model(model: nn.Module, model_dir, seed: int = 0) -> nn.Module:
    """``model`` with every tensor replaced by the rotated view's (lm_head untied)."""
    rot = rotated_arch(api.open_model(model_dir), seed)
    out = copy.deepcopy(model)
    lm = out.language_model
    lm.lm_head.weight = nn.Parameter(lm.lm_head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        for name, p in out.named_parameters(remove_duplicate=False):
            p.copy_(rot.ckpt.tensor(name))
    return out.eval()


def assert_same_logits(a: nn.Module, b: nn.Module, inputs: dict) -> None:
    with torch.no_grad():
        la, lb = a(**inputs).logits, b(**inputs).logits
    assert float((la - lb).norm() / la.norm()) <= 1e-4
    assert float((la - lb).abs().max() / la.abs().max()) <= 1e-4


def prompt_inputs(processor, image_path) -> list[dict]:
    img = Image.open(image_path).convert("RGB")
    return [processor.tokenizer("USER: What is the capital of France? ASSISTANT: Paris is", return_tensors="pt"),
            processor(images=img, text=PROMPT, return_tensors="pt")]


@pytest.mark.parametrize("shape", [
    dict(hidden=64, heads=4, kv_heads=2),  # Sylvester 64, heads 16
    dict(hidden=48, heads=4, kv_heads=2, attention_bias=True),  # Paley I 12 (x4), heads 12; q/k/v/o biases
    dict(hidden=100, heads=2, kv_heads=1),  # no Hadamard of 100 or 50: random orthogonal
], ids=["sylvester", "paley-bias", "fallback"])
def test_rotated_float_model_computes_the_original_logits(shape, tmp_path, calib_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    d = build_tiny_llava(tmp_path / "m", tie_word_embeddings=True, dtype=torch.float32, seed=5,
                         intermediate=2 * shape["hidden"], **shape)
    model = LlavaForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float32).eval()
    rot = rotated_float_model(model, d)
    assert rot.language_model.lm_head.weight.data_ptr() != rot.language_model.model.embed_tokens.weight.data_ptr()
    for inputs in prompt_inputs(AutoProcessor.from_pretrained(d), sorted(calib_dir.glob("*.jpg"))[0]):
        assert_same_logits(model, rot, inputs)


def test_demo_model_rotated_logits_equal_the_original(demo_build, demo_float):
    model, processor = demo_float
    rot = rotated_float_model(model, demo_build[0])
    view = rotated_arch(api.open_model(demo_build[0]), 0).ckpt
    assert view.residual.construction == "sylvester 16 x paley2 36" and view.head.construction == "sylvester 64"
    photo = sorted((Path(__file__).resolve().parents[2] / "calibImages").glob("*.jpg"))[0]
    for inputs in prompt_inputs(processor, photo):
        assert_same_logits(model, rot, inputs)


def test_the_view_keeps_the_models_fingerprint_and_unties(tiny_model_tied):
    arch = api.open_model(tiny_model_tied)
    rot = rotated_arch(arch, 0)
    assert arch.tied_embeddings and not rot.tied_embeddings
    assert rot.ckpt.fingerprint() == arch.ckpt.fingerprint()
    assert rot.ckpt.has(HEAD) and rot.ckpt.shape(HEAD) == arch.ckpt.shape(EMBED)
    assert rot.ckpt.config_dict["text_config"]["tie_word_embeddings"] is False
    assert arch.ckpt.config_dict["text_config"]["tie_word_embeddings"] is True  # the original is untouched
    norm = "language_model.model.layers.0.input_layernorm.weight"
    assert torch.equal(rot.ckpt.tensor(norm), torch.ones_like(arch.ckpt.tensor(norm)))
    vision = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(rot.ckpt.tensor(vision), arch.ckpt.tensor(vision))
    l1 = "multi_modal_projector.linear_1.weight"
    assert torch.equal(rot.ckpt.tensor(l1), arch.ckpt.tensor(l1))


# --------------------------------------------------------------------------------------------- recipe and CLI
def test_rotation_with_quantized_down_proj_is_refused(capsys, monkeypatch):
    with pytest.raises(LlavaqError, match="online Hadamard") as e:
        QuantRecipe(rotation="hadamard", modules="with_down_proj")
    assert "\n" not in e.value.message
    from llavaq.cli import main

    monkeypatch.setattr(sys, "argv", ["llavaq", "quantize", "--model_path", "nowhere", "--save_directory", "x",
                                      "--rotation", "hadamard", "--modules", "with_down_proj"])
    with pytest.raises(SystemExit) as ex:
        main()
    assert ex.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: --rotation hadamard cannot be used with --modules "
                                               "with_down_proj") and "down_proj" in err[0]


def test_rotation_keys_the_cache_only_when_set():
    default = QuantRecipe()
    assert set(default.calibration_dict()) == set(QuantRecipe.CALIBRATION_FIELDS)  # old cache keys unchanged
    rot = QuantRecipe(rotation="hadamard")
    assert rot.calibration_dict()["rotation"] == "hadamard" and rot.calibration_dict()["rotation_seed"] == 0
    keys = {default.calibration_key(), rot.calibration_key(), rot.replace(rotation_seed=1).calibration_key()}
    assert len(keys) == 3
    with pytest.raises(LlavaqError, match="--rotation must be"):
        QuantRecipe(rotation="quarot")
    with pytest.raises(LlavaqError, match="--rotation_seed"):
        QuantRecipe(rotation="hadamard", rotation_seed=-1)


# --------------------------------------------------------------------------------------------- rotated outputs
@pytest.fixture(scope="module")
def rotated(tiny_model_tied, calib_dir, cache_root, tmp_path_factory):
    """(calibration, export) of the tied GQA tiny model with --rotation hadamard (m2, histogram)."""
    out = tmp_path_factory.mktemp("rot") / "out"
    return api.quantize(tiny_model_tied, calib_dir, out, QuantRecipe(rotation="hadamard"), cache_dir=cache_root,
                        device_type="cpu")


def test_rotated_output_is_an_ordinary_w8a8_output(rotated, tiny_model_tied, calib_dir, cache_root, tmp_path):
    from llavaq.inspect import inspect_path

    cal, res = rotated
    out = res.save_directory
    _, plain = api.quantize(tiny_model_tied, calib_dir, tmp_path / "plain", cache_dir=cache_root, device_type="cpu")
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc == json.loads((plain.save_directory / "quant_model_description.json").read_text())
    assert desc["language_model.model.norm.weight"] == "FLOAT" and desc[HEAD] == "FLOAT"
    t = load_file(str(out / "quant_model_weight_w8a8.safetensors"))
    view = rotated_arch(api.open_model(tiny_model_tied), 0).ckpt
    assert torch.equal(t[EMBED], view.tensor(EMBED)) and torch.equal(t[HEAD], view.tensor(HEAD))
    assert not torch.equal(t[HEAD], t[EMBED])
    assert torch.equal(t["language_model.model.norm.weight"], torch.ones(64))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["text_config"]["tie_word_embeddings"] is False
    rec = json.loads((out / "llavaq_record.json").read_text())
    assert rec["recipe"]["rotation"] == "hadamard" and rec["rotation"]["residual"]["construction"] == "sylvester 64"
    assert rec["rotation"]["untied_embeddings"] is True
    rep = inspect_path(out)
    assert rep["ok"], rep["problems"]
    assert rep["rotation"]["seed"] == 0
    weights = "quant_model_weight_w8a8.safetensors"  # same tensors, same bytes (the record and config differ)
    assert (out / weights).stat().st_size == (plain.save_directory / weights).stat().st_size


def test_every_format_writes_the_rotated_weights(rotated, tiny_model_tied, tmp_path):
    from llavaq.inspect import inspect_path

    cal, _ = rotated
    view = rotated_arch(api.open_model(tiny_model_tied), 0).ckpt
    before = ForwardCounter.count
    for fmt, weights in (("compressed-tensors", "model.safetensors"), ("fakequant", "model.safetensors"),
                         ("mindie", "quant_model_weight_w8a8.safetensors")):
        res = api.export(tiny_model_tied, cal.cache, tmp_path / fmt, format=fmt)
        t = load_file(str(res.save_directory / weights))
        dtype = t[EMBED].dtype
        assert torch.equal(t[EMBED], view.tensor(EMBED, dtype)) and torch.equal(t[HEAD], view.tensor(HEAD, dtype))
        cfg = json.loads((res.save_directory / "config.json").read_text())
        assert cfg["text_config"]["tie_word_embeddings"] is False
        rep = inspect_path(res.save_directory)
        assert rep["ok"], rep["problems"]
    assert ForwardCounter.count == before  # exports run no forward pass


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory, calib_dir):
    d = tmp_path_factory.mktemp("eval")
    images = sorted(p.name for p in calib_dir.iterdir())
    prompts = [{"image": images[0], "question": "What is in the picture?"}, {"question": "Where is the rocket?"}]
    (d / "prompts.json").write_text(json.dumps(prompts))
    (d / "heldout.txt").write_text("The cat sat on the table next to a cup of coffee. A rocket stands on the "
                                   "launch pad under a blue sky. " * 4)
    return dict(prompts=d / "prompts.json", images=calib_dir, text=d / "heldout.txt")


def test_verify_emulates_a_rotated_output(rotated, tiny_model_tied, small_eval):
    from llavaq.verify import build_quantized_model, load_float_model, read_quantized_output, verify

    _, res = rotated
    q = read_quantized_output(res.save_directory)
    fp = load_float_model(tiny_model_tied)
    qm = build_quantized_model(fp, q, mode="weight_only")
    lm = qm.language_model
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()  # untied where they differ
    assert torch.equal(lm.lm_head.weight, q.float_tensors[HEAD].float())
    assert fp.language_model.lm_head.weight.data_ptr() == fp.language_model.model.embed_tokens.weight.data_ptr()
    static = verify(tiny_model_tied, res.save_directory, **small_eval)
    assert static.top1 > 0.6 and static.ppl_increase < 10
    # the per-Linear reference is the rotated float Linear: with float activations only the int8 weights differ
    wo = verify(tiny_model_tied, res.save_directory, mode="weight_only", worst=100, **small_eval)
    assert wo.top1 > 0.9
    lm_layers = [e for e in wo.worst_layers if e.name.startswith("language_model.")]
    assert len(lm_layers) == 12 and max(e.rel_mse for e in lm_layers) < 1e-3


def test_rotation_composes_with_smoothing_and_derived_exports(tiny_model_tied, calib_dir, cache_root, tmp_path):
    from llavaq.inspect import inspect_path

    base = QuantRecipe(rotation="hadamard", anti_outlier="none", act_method=1)
    cal = api.calibrate(tiny_model_tied, calib_dir, base, cache_dir=cache_root, device_type="cpu")
    before = ForwardCounter.count
    t = {}
    for name, recipe in (("none", base), ("m1", base.replace(anti_outlier="m1", alpha=0.8))):
        res = api.export(tiny_model_tied, cal.cache, tmp_path / name, recipe=recipe)
        assert inspect_path(res.save_directory)["ok"]
        t[name] = load_file(str(res.save_directory / "quant_model_weight_w8a8.safetensors"))
    assert ForwardCounter.count == before
    norm = "language_model.model.layers.0.input_layernorm.weight"
    assert torch.equal(t["none"][norm], torch.ones(64)) and not torch.equal(t["m1"][norm], torch.ones(64))
    with pytest.raises(CacheError, match="rotation"):
        api.export(tiny_model_tied, cal.cache, tmp_path / "unrotated", recipe=base.replace(rotation="none"))
    auto = api.calibrate(tiny_model_tied, calib_dir, base.replace(anti_outlier="m1", alpha="auto"),
                         cache_dir=cache_root, device_type="cpu")
    assert auto.cache.path != cal.cache.path
    res = api.export(tiny_model_tied, auto.cache, tmp_path / "auto")
    assert inspect_path(res.save_directory)["ok"]


def test_rotation_composes_with_gptq_and_smooth_vo(tiny_model_tied, calib_dir, cache_root, tmp_path, small_eval):
    from llavaq.inspect import inspect_path
    from llavaq.verify import verify

    recipe = QuantRecipe(rotation="hadamard", anti_outlier="m1", alpha=0.5, act_method=1, smooth_vo=True,
                         weight_method="gptq")
    _, res = api.quantize(tiny_model_tied, calib_dir, tmp_path / "out", recipe, cache_dir=cache_root,
                          device_type="cpu")
    rep = inspect_path(res.save_directory)
    assert rep["ok"], rep["problems"]
    assert rep["rotation"]["method"] == "hadamard" and rep["weight_method"] == "gptq"
    assert res.gptq_error  # GPTQ ran on the rotated Linears
    # the per-Linear reference undoes v->o smoothing on the rotated float v_proj: only the int8 weights differ
    wo = verify(tiny_model_tied, res.save_directory, mode="weight_only", worst=100, **small_eval)
    lm_layers = [e for e in wo.worst_layers if e.name.startswith("language_model.")]
    assert len(lm_layers) == 12 and max(e.rel_mse for e in lm_layers) < 1e-3


def test_cli_quantize_and_calibrate_take_the_rotation(tiny_model_tied, calib_dir, cache_root, tmp_path, monkeypatch,
                                                      capsys):
    from llavaq.cli import main

    def run(*args: str) -> None:
        monkeypatch.setattr(sys, "argv", ["llavaq", *args])
        try:
            main()
        except SystemExit as ex:
            assert ex.code in (0, None), capsys.readouterr().err

    common = ["--model_path", str(tiny_model_tied), "--calib_images", str(calib_dir), "--cache_dir", str(cache_root),
              "--device_type", "cpu", "--anti_outlier", "none", "--act_method", "1", "--rotation", "hadamard",
              "--rotation_seed", "3"]
    run("calibrate", *common)
    cache = capsys.readouterr().out.strip().splitlines()[-1]
    manifest = json.loads((Path(cache) / "manifest.json").read_text())
    assert manifest["recipe_calibration"]["rotation_seed"] == 3
    run("quantize", *common, "--save_directory", str(tmp_path / "out"))
    rec = json.loads((tmp_path / "out" / "llavaq_record.json").read_text())
    assert rec["recipe"]["rotation"] == "hadamard" and rec["rotation"]["seed"] == 3
