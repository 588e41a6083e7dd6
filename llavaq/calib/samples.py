"""Calibration samples: processor outputs for image prompts (and optional text-only prompts)."""

from __future__ import annotations

import hashlib
import logging
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


class LlavaInputs:
    """A LLaVA processor built from its parts: the checkpoint's fast tokenizer (``AutoTokenizer``) and
    image processor (``AutoImageProcessor``), joined exactly as transformers 4.37.2's
    ``LlavaProcessor.__call__`` joins them (image processor → ``pixel_values``, tokenizer → ``input_ids``,
    ``attention_mask``; one ``<image>`` token per image, expanded by the model).

    ``AutoProcessor`` cannot be used: 4.37.2's ``LlavaProcessor`` forces a ``LlamaTokenizerFast`` (a Qwen2
    tokenizer has no BOS token: "add_bos_token = True but bos_token = None") and a ``CLIPImageProcessor``
    (llava-interleave ships a ``SiglipImageProcessor``). On a llava-1.5 checkpoint both parts are the
    classes ``AutoProcessor`` picks, so the inputs are the same.
    """

    def __init__(self, image_processor, tokenizer) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def __call__(self, text=None, images=None, return_tensors: str = "pt") -> dict:
        out = dict(self.tokenizer(text, return_tensors=return_tensors))
        out["pixel_values"] = None if images is None else \
            self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        return out

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def load_processor(model_path: str | Path, *, trust_remote_code: bool = False) -> LlavaInputs:
    """The checkpoint's processor, from its parts (see :class:`LlavaInputs`). The tokenizer keeps its own pad
    token; one without gets msModelSlim's ``pad_token="<pad>"`` (padding never happens: one sample at a time)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True, use_fast=True,
                                                  trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
        image_processor = AutoImageProcessor.from_pretrained(str(model_path), local_files_only=True,
                                                             trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"{model_path}: cannot load the processor/tokenizer ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(prev)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{model_path}: no fast tokenizer (tokenizer.json); LLaVA's processor needs one")
    return LlavaInputs(image_processor, tokenizer)


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
