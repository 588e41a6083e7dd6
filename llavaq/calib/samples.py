"""Calibration samples: processor outputs for image prompts (and optional text-only prompts)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from llavaq.errors import ModelError


@dataclass
class Sample:
    """One calibration input, as msModelSlim feeds ``model(input_ids, pixel_values, attention_mask)``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    label: str = ""

    def digest(self) -> bytes:
        h = hashlib.sha256(self.input_ids.numpy().tobytes())
        h.update(self.attention_mask.numpy().tobytes())
        if self.pixel_values is not None:
            h.update(self.pixel_values.float().numpy().tobytes())
        return h.digest()


def load_processor(model_path: str | Path, *, trust_remote_code: bool = False):
    """AutoProcessor exactly as msModelSlim's script loads it (``pad_token="<pad>"``)."""
    import logging

    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        return AutoProcessor.from_pretrained(
            str(model_path), local_files_only=True, pad_token="<pad>", trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise ModelError(f"{model_path}: cannot load the processor/tokenizer ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(prev)


def image_sample(processor, image, prompt: str, label: str = "") -> Sample:
    """One image prompt as the processor encodes it (pixel values in float32)."""
    enc = processor(images=image, text=prompt, return_tensors="pt")
    return Sample(enc["input_ids"], enc["attention_mask"], enc["pixel_values"].float(), label)


def text_samples(processor, text_prompts=()) -> list[Sample]:
    """Text-only prompts (no image), tokenized."""
    tok = getattr(processor, "tokenizer", processor)
    out = []
    for j, text in enumerate(text_prompts):
        enc = tok(text, return_tensors="pt")
        out.append(Sample(enc["input_ids"], enc["attention_mask"], None, f"text{j}"))
    return out


def build_samples(processor, images, prompt: str, text_prompts=(), labels=None) -> list[Sample]:
    """Image prompts (in order), then the text-only prompts."""
    samples = [image_sample(processor, img, prompt, labels[i] if labels else f"image{i}")
               for i, img in enumerate(images)]
    return samples + text_samples(processor, text_prompts)


def samples_digest(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.digest())
    return h.hexdigest()[:16]
