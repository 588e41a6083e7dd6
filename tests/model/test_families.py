"""Issue #19: the LLaVA family — Mistral and Qwen2 language models, SigLIP towers, any feature layer/strategy.

Tiny fixtures of each family (GQA, q/k/v biases, a sliding window shorter than the prompt, SigLIP "full"
features with and without the pooling head): the float model rebuilt from the layer builders equals
transformers' forward; quantize → inspect → verify; streamed = in-memory bytes; every recipe and format
from one session cache; one-line errors for configs transformers 4.37.2 cannot build. Parity with
msModelSlim itself is in tests/parity.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import llavaq.model.loading as loading_mod
from llavaq import api
from llavaq.algorithms.blocks import clip_qkv_block, llama_qkv_block
from llavaq.calib.cache import SessionCache
from llavaq.calib.engine import ForwardCounter
from llavaq.calib.samples import image_sample, load_processor, text_samples
from llavaq.errors import ModelError
from llavaq.inspect import inspect_path
from llavaq.model.checkpoint import InMemoryCheckpoint
from llavaq.model.forward import float_forward
from llavaq.quant.tensor_stream import iter_float_tensors
from llavaq.recipe import DEFAULT_PROMPT, QuantRecipe
from llavaq.testing import build_tiny_llava
from llavaq.verify import verify

HEAD = "vision_tower.vision_model.head."
FAMILIES = {
    # bakLlava-like: Mistral (GQA 4/2, sliding window 8 < the ~40-token prompt) + CLIP, "default" features
    "mistral_clip": dict(text_model_type="mistral", kv_heads=2, sliding_window=8, seed=31),
    # llava-interleave-like: Qwen2 (GQA, q/k/v biases) + SigLIP with its pooling head, "full" features of layer -1
    "qwen2_siglip": dict(text_model_type="qwen2", vision_model_type="siglip", kv_heads=2, seed=32),
    # llava-interleave's checkpoints: no SigLIP head; here also tied embeddings, MHA, 42 px (9 patches),
    # "default" features of layer -2 (transformers 4.37.2 drops the first patch: SigLIP has no class token)
    "qwen2_siglip_nohead": dict(text_model_type="qwen2", vision_model_type="siglip", kv_heads=4, seed=33,
                                vision_use_head=False, tie_word_embeddings=True, image_size=42,
                                vision_feature_layer=-2, vision_feature_select_strategy="default"),
}
HELDOUT = "The cat sat on the table next to a cup of coffee. A rocket stands on the launch pad. " * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_llava(root / name, **kw) for name, kw in FAMILIES.items()}


@pytest.fixture(scope="module")
def quantized(models, calib_dir, tmp_path_factory) -> dict:
    """The default recipe (msModelSlim's) on each family; streams in memory, lazy checkpoint reads."""
    root = tmp_path_factory.mktemp("fam_q")
    return {name: api.quantize(m, calib_dir, root / name, cache_dir=root / "cache", device_type="cpu")
            for name, m in models.items()}


def _samples(model):
    proc = load_processor(model)
    img = Image.new("RGB", (40, 30), (200, 30, 60))
    return [image_sample(proc, img, DEFAULT_PROMPT), *text_samples(proc, ["Where is the rocket? It is on the pad."])]


# ---------------------------------------------------------------------------------- the descriptions
def test_each_family_is_described(models):
    archs = {n: api.open_model(m) for n, m in models.items()}
    a = archs["mistral_clip"]
    assert (a.text.name, a.vision.name) == ("Mistral", "CLIP")
    assert [s.kind for s in a.stages()].count("vision_head") == 0
    groups = a.all_smooth_groups()
    assert {g.shift for g in groups if g.name.startswith("text")} == {False}  # RMSNorm: scale only
    assert {g.shift for g in groups if g.name.startswith("vision")} == {True}  # LayerNorm: shift too
    assert {g.name.split(".")[0] for g in groups if g.m2} == {"vision"}  # msModelSlim wraps CLIP, not Mistral
    q = archs["qwen2_siglip"]
    assert (q.text.name, q.vision.name) == ("Qwen2", "SigLIP")
    assert [s.name for s in q.stages()][2] == "vision_head"
    assert not any(g.m2 for g in q.all_smooth_groups())
    assert HEAD + "attention.out_proj" in q.linear_names  # a Linear, but never called: float
    assert HEAD + "attention.out_proj" not in q.quantized_linears()
    assert HEAD + "mlp.fc1" in q.quantized_linears()
    n = archs["qwen2_siglip_nohead"]
    assert n.absent_prefixes == (HEAD,) and not any(x.startswith(HEAD) for x in n.linear_names)
    assert n.tied_embeddings
    # one <image> token expands to the tower's positions, less position 0 with "default"
    assert (a.image_tokens, q.image_tokens, n.image_tokens) == (4, 4, 8)


@pytest.mark.parametrize("name", [*FAMILIES, "clip_full_42px"])
def test_rebuilt_float_model_equals_transformers(name, models, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = models.get(name) or build_tiny_llava(tmp_path / name, image_size=42, vision_feature_layer=-1,
                                                 vision_feature_select_strategy="full", seed=34)
    arch = api.open_model(model)
    samples = _samples(model)
    ours = float_forward(arch, samples)
    ref_model = LlavaForConditionalGeneration.from_pretrained(str(model), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for s, got in zip(samples, ours, strict=True):
            ref = ref_model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits
            assert torch.equal(got, ref), name
    text_tokens = samples[0].input_ids.shape[1] - 1
    assert ours[0].shape[1] == text_tokens + arch.image_tokens
    if name == "mistral_clip":
        assert ours[0].shape[1] > arch.text_config.sliding_window  # 4.37.2's SDPA ignores the window


def _input_of(module: torch.nn.Module, run, *args) -> torch.Tensor:
    """What ``module`` receives while ``run(*args)`` runs."""
    seen = []
    hook = module.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            run(*args)
    finally:
        hook.remove()
    return seen[0]


def test_m2_blocks_compute_what_the_layers_compute(models):
    """Mistral (GQA, the layer's 4-D mask), Qwen2 (q/k/v biases before RoPE), SigLIP (biases): the m2 block
    equals the attention up to o_proj/out_proj of the layer transformers builds."""
    g = torch.Generator().manual_seed(0)
    for name in ("mistral_clip", "qwen2_siglip"):
        arch = api.open_model(models[name])
        attn, heads = arch.build_text_layer(0).self_attn, arch.text.heads(arch.text_config)
        x = torch.randn(1, 12, arch.text_config.hidden_size, generator=g)
        pos = torch.arange(12).unsqueeze(0)
        mask = arch.causal_mask(torch.ones(1, 12, dtype=torch.long), x)
        mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        bias = torch.cat([m.bias for m in mods]) if arch.text.qkv_bias else None
        block = llama_qkv_block(heads.heads, heads.kv_heads, heads.head_dim, attn.rotary_emb.cos_cached,
                                attn.rotary_emb.sin_cached, pos, mask, bias=bias)
        want = _input_of(attn.o_proj, arch.text.call_attention, attn, x, mask, pos)
        with torch.no_grad():
            torch.testing.assert_close(block(x, torch.cat([m.weight for m in mods])), want, rtol=1e-5, atol=1e-6)
    arch = api.open_model(models["qwen2_siglip"])
    attn, heads = arch.build_vision_layer(0).self_attn, arch.vision.heads(arch.vision_config)
    x = torch.randn(1, 4, arch.vision_config.hidden_size, generator=g)
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    block = clip_qkv_block(heads.heads * heads.head_dim, heads.heads, heads.head_dim, torch.cat([m.bias for m in mods]))
    want = _input_of(attn.out_proj, arch.vision.call_attention, attn, x)
    with torch.no_grad():
        torch.testing.assert_close(block(x, torch.cat([m.weight for m in mods])), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- quantize → inspect → verify
@pytest.mark.parametrize("name", list(FAMILIES))
def test_quantize_inspect_verify(name, models, quantized, calib_dir, tmp_path):
    cal, res = quantized[name]
    rep = inspect_path(res.save_directory)
    assert rep["ok"], rep["problems"]
    assert rep["architecture"] == {"mistral_clip": "Mistral + CLIP"}.get(name, "Qwen2 + SigLIP")
    arch = api.open_model(models[name])
    assert rep["quantized"] == arch.quantized_linears()
    desc = json.loads((res.save_directory / "quant_model_description.json").read_text())
    if name == "qwen2_siglip":  # the head's called Linears are W8A8, the never-called out_proj stays float
        assert desc[HEAD + "mlp.fc1.weight"] == "W8A8" and desc[HEAD + "attention.out_proj.weight"] == "FLOAT"
    if name == "qwen2_siglip_nohead":
        assert not any(k.startswith(HEAD) for k in desc)
    # smoothing as msModelSlim's m2 does it: CLIP layers only (Mistral, Qwen2, SigLIP layers are not wrapped)
    smoothed = {g["group"] for g in inspect_path(cal.cache.path)["smoothing"]}
    assert smoothed == ({f"vision.{i}.{p}" for i in range(2) for p in ("attn", "mlp")} if name == "mistral_clip"
                        else set())
    (tmp_path / "eval").mkdir()
    shutil.copy(sorted(calib_dir.iterdir())[0], tmp_path / "eval" / "a.jpg")
    (tmp_path / "eval" / "prompts.json").write_text(json.dumps([{"image": "a.jpg", "question": "What is it?"}]))
    (tmp_path / "heldout.txt").write_text(HELDOUT)
    report = verify(models[name], res.save_directory, prompts=tmp_path / "eval" / "prompts.json",
                    text=tmp_path / "heldout.txt")
    assert report.quantized_linears == len(arch.quantized_linears())
    assert report.prompts[0].answer_tokens > 0 and 0.0 <= report.top1 <= 1.0
    assert report.ppl_q is not None and torch.isfinite(torch.tensor(report.ppl_q))
    assert {e.name for e in report.worst_layers} <= set(arch.quantized_linears())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_streamed_equals_in_memory_bytes(name, models, quantized, calib_dir, tmp_path, monkeypatch):
    """Lazy per-layer reads with the hidden states in memory == everything read up front with them on disk."""
    _, res = quantized[name]
    monkeypatch.setattr(loading_mod, "Checkpoint", InMemoryCheckpoint)
    out = tmp_path / "in_memory"
    api.quantize(models[name], calib_dir, out, cache_dir=tmp_path / "cache", device_type="cpu", stream_memory_gb=0)
    files = [p.name for p in sorted(res.save_directory.iterdir()) if p.name != "llavaq_record.json"]
    assert files == [p.name for p in sorted(out.iterdir()) if p.name != "llavaq_record.json"]
    for f in files:
        assert (res.save_directory / f).read_bytes() == (out / f).read_bytes(), f


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_recipe_and_format_from_one_cache(name, models, quantized, tmp_path):
    cal, _ = quantized[name]
    before = ForwardCounter.count
    recipe = QuantRecipe.from_dict(cal.cache.manifest["recipe"])
    variants = {
        **{fmt: dict(format=fmt) for fmt in ("mindie", "compressed-tensors", "fakequant")},
        "m1_auto": dict(recipe=recipe.replace(anti_outlier="m1", alpha="auto")),
        "none": dict(recipe=recipe.replace(anti_outlier="none"), format="compressed-tensors"),
        "keep_float": dict(recipe=recipe.replace(keep_float=2), format="fakequant"),
    }
    for key, kw in variants.items():
        res = api.export(models[name], cal.cache.path, tmp_path / key, **kw)
        assert inspect_path(res.save_directory)["ok"], key
        if key == "keep_float":  # the 2 most sensitive Linears, each with its vLLM-fused group (q/k/v, gate/up)
            assert len(res.kept_float) - len(res.fused_float) == 2
    assert ForwardCounter.count == before  # exports run no forward pass


@pytest.mark.parametrize("name", ["mistral_clip", "qwen2_siglip"])
def test_m2_scope_all_smooths_every_family_exactly(name, models, calib_dir, tmp_path, monkeypatch):
    """``--m2_scope all``: m2 on Mistral/Qwen2 (scale only) and SigLIP (shift + scale) layers too; the
    smoothed float model still computes the original (an exact re-parametrisation up to rounding)."""
    from transformers import LlavaForConditionalGeneration

    from llavaq.cli import app

    r = CliRunner().invoke(app, ["calibrate", "--model_path", str(models[name]), "--calib_images", str(calib_dir),
                                 "--cache_dir", str(tmp_path / "cache"), "--m2_scope", "all", "--device_type", "cpu"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cache = SessionCache.load("".join(r.stdout.split()))  # stdout: the cache path (wrapped at 80)
    groups = {g["group"]: g for g in inspect_path(cache.path)["smoothing"]}
    assert {f"text.{i}.{p}" for i in range(2) for p in ("attn", "mlp")} <= set(groups)
    assert all("m2_threshold" in g for g in groups.values()) and groups["text.0.attn"]["shift"] is False
    arch = api.open_model(models[name])
    recipe = QuantRecipe.from_dict(cache.manifest["recipe"])
    assert recipe.m2_scope == "all"
    smoothed = dict(iter_float_tensors(arch, cache, recipe, dequantize=False, float_dtype=torch.float32))
    model = LlavaForConditionalGeneration.from_pretrained(str(models[name]), torch_dtype=torch.float32).eval()
    s = _samples(models[name])[0]
    with torch.no_grad():
        ref = model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits
        model.load_state_dict(smoothed, strict=False)
        got = model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    if name == "qwen2_siglip":
        _interrupted_on_disk_resumes_to_the_same_cache(models[name], calib_dir, recipe, cache, tmp_path, monkeypatch)


def test_smooth_vo_and_gptq_follow_the_roles(models, calib_dir, tmp_path):
    """``--smooth_vo`` pairs from the roles on Qwen2 (GQA; v_proj has a bias, o_proj none: scale only) and SigLIP
    (v/out_proj biases: with a shift), an exact re-parametrisation; GPTQ on every quantized Linear, the SigLIP
    head's included."""
    from transformers import LlavaForConditionalGeneration

    model = models["qwen2_siglip"]
    recipe = QuantRecipe(anti_outlier="m1", alpha=0.8, smooth_vo=True, modules="with_down_proj", weight_method="gptq")
    cal = api.calibrate(model, calib_dir, recipe, cache_dir=tmp_path / "cache", device_type="cpu")
    text, vision = cal.cache.read_stage("text_layer.0"), cal.cache.read_stage("vision_layer.0")
    assert text["smooth.text.0.vo.scale"].shape == (2 * 16,) and "smooth.text.0.vo.shift" not in text
    assert "smooth.text.0.down.scale" in text and "smooth.vision.0.vo.shift" in vision
    arch = api.open_model(model)
    smoothed = dict(iter_float_tensors(arch, cal.cache, recipe, dequantize=False, float_dtype=torch.float32))
    ref_model = LlavaForConditionalGeneration.from_pretrained(str(model), torch_dtype=torch.float32).eval()
    s = _samples(model)[0]
    with torch.no_grad():
        ref = ref_model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits
        ref_model.load_state_dict(smoothed, strict=False)
        got = ref_model(input_ids=s.input_ids, pixel_values=s.pixel_values, attention_mask=s.attention_mask).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5
    res = api.export(model, cal.cache, tmp_path / "gptq", recipe=recipe)
    rep = inspect_path(res.save_directory)
    assert rep["ok"], rep["problems"]
    assert HEAD + "mlp.fc1" in rep["quantized"]


def _interrupted_on_disk_resumes_to_the_same_cache(model, calib_dir, recipe, ref, tmp_path, monkeypatch):
    """Ctrl-C after the SigLIP head's stage, hidden states (SigLIP's channels-first layout, the m2 stream) on
    disk; the resumed calibration gives the uninterrupted one's cache, byte for byte."""
    from safetensors.torch import load_file

    real = SessionCache.write_stage

    def flaky(self, stage, *args):
        if stage == "projector":
            raise KeyboardInterrupt
        return real(self, stage, *args)

    monkeypatch.setattr(SessionCache, "write_stage", flaky)
    with pytest.raises(KeyboardInterrupt):
        api.calibrate(model, calib_dir, recipe, cache_dir=tmp_path / "resume", device_type="cpu", stream_memory_gb=0)
    monkeypatch.undo()
    cal = api.calibrate(model, calib_dir, recipe, cache_dir=tmp_path / "resume", device_type="cpu",
                        stream_memory_gb=0)
    assert cal.cache.manifest["stages_done"] == ref.manifest["stages_done"]
    for st in ref.manifest["stages_done"]:
        x, y = load_file(str(cal.cache.stage_file(st))), load_file(str(ref.stage_file(st)))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), st


# ---------------------------------------------------------------------------------- inputs and configs
def test_processor_is_built_from_its_parts(models, tiny_model):
    """transformers 4.37.2's AutoProcessor cannot load a Qwen2 + SigLIP LLaVA; llavaq's processor can, and on a
    llava-1.5 checkpoint it encodes exactly what AutoProcessor does."""
    from transformers import AutoProcessor

    with pytest.raises(ValueError, match="bos_token = None"):
        AutoProcessor.from_pretrained(str(models["qwen2_siglip"]), local_files_only=True, pad_token="<pad>")
    proc = load_processor(models["qwen2_siglip"])
    assert type(proc.image_processor).__name__ == "SiglipImageProcessor"
    assert type(proc.tokenizer).__name__ == "Qwen2TokenizerFast"
    img = Image.new("RGB", (50, 37), (10, 200, 90))
    ref = AutoProcessor.from_pretrained(str(tiny_model), local_files_only=True, pad_token="<pad>")
    got = load_processor(tiny_model)(images=img, text=DEFAULT_PROMPT, return_tensors="pt")
    want = ref(images=img, text=DEFAULT_PROMPT, return_tensors="pt")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _set(path: str, value):
    def edit(cfg: dict) -> None:
        *parents, last = path.split(".")
        d = cfg
        for p in parents:
            d = d[p]
        d[last] = value

    return edit


CONFIG_CASES = {
    # id: (edit of config.json, substrings of the one-line error)
    "text_type_unknown": (_set("text_config.model_type", "gemma"), ["text_config.model_type", "'gemma'",
                                                                     "transformers"]),
    "text_type_unsupported": (_set("text_config.model_type", "phi"), ["text_config.model_type", "'phi'",
                                                                       "llama, mistral, qwen2"]),
    "vision_type_unsupported": (_set("vision_config.model_type", "blip_vision_model"),
                                ["vision_config.model_type", "clip_vision_model, siglip_vision_model"]),
    "rope_scaling_llama3": (lambda c: (_set("text_config.model_type", "llama")(c),
                                       _set("text_config.rope_scaling", {"type": "llama3", "factor": 8.0})(c)),
                            ["text_config (llama)", "rope_scaling", "cannot be built"]),
    "rope_scaling_mistral": (_set("text_config.rope_scaling", {"type": "linear", "factor": 2.0}),
                             ["text_config.rope_scaling", "mistral", "ignores"]),
    "feature_strategy": (_set("vision_feature_select_strategy", "cls_patch"),
                         ["vision_feature_select_strategy", "'cls_patch'"]),
    "feature_layer_range": (_set("vision_feature_layer", 5), ["vision_feature_layer", "-3..2"]),
    "feature_layer_list": (_set("vision_feature_layer", [-2, -1]), ["vision_feature_layer", "one integer"]),
    "head_dim": (_set("text_config.head_dim", 32), ["text_config.head_dim", "16"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_unbuildable_config_is_one_line_naming_the_field(case, models, tmp_path):
    edit, needles = CONFIG_CASES[case]
    model = tmp_path / "model"
    shutil.copytree(models["mistral_clip"], model)
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        api.open_model(model)
    msg = e.value.message
    assert "\n" not in msg and msg.startswith(str(model / "config.json"))
    for n in needles:
        assert n in msg, (n, msg)
