"""Tiny LLaVA checkpoints built in-process, for tests and benchmarks (no hub access).

The models are llava-hf-format directories (config.json, safetensors, fast Llama tokenizer,
CLIP image processor) that load with ``LlavaForConditionalGeneration.from_pretrained`` and
``AutoProcessor.from_pretrained``, exactly like a real LLaVA-1.5 checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_CORPUS = (
    "USER: Describe this image in detail. ASSISTANT: The image shows a cat sitting on a table "
    "next to a cup of coffee. A rocket stands on the launch pad under a blue sky. "
    "An astronaut in a white suit holds a helmet. The quick brown fox jumps over the lazy dog. "
    "0123456789 What is in the picture? Where is it? How many colours are there?"
)


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE fast Llama tokenizer with ``<image>`` and ``<pad>`` special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False, legacy=False,
    )
    fast.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return fast


def build_tiny_llava(
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    text_layers: int = 2,
    vision_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vision_hidden: int = 48,
    vision_heads: int = 4,
    vision_intermediate: int = 96,
    image_size: int = 28,
    patch_size: int = 14,
    outliers: bool = True,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
) -> Path:
    """Write a tiny random LLaVA-1.5-shaped checkpoint (llava-hf layout) to ``out_dir``.

    ``outliers`` scales a few norm channels up so that the activations have the channel
    outliers that smoothing exists for (as real LLMs do).
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=vision_hidden, intermediate_size=vision_intermediate,
            num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
            patch_size=patch_size, projection_dim=vision_hidden, hidden_act="quick_gelu",
        ),
        text_config=dict(
            model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=tie_word_embeddings, attention_bias=attention_bias, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("layer_norm1.weight") or name.endswith(
                "layer_norm2.weight"
            ) or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                if outliers:
                    idx = torch.randperm(p.numel(), generator=g)[:3]
                    p[idx] *= 8.0
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5 * 0.8)
    model.to(dtype)
    model.config.torch_dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out


def write_test_images(out_dir: str | Path, sizes=((64, 48), (40, 56), (33, 33)), seed: int = 0) -> Path:
    """Write a few deterministic RGB JPEG/PNG photos-like images of different sizes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
        arr = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        ext = "jpg" if i % 2 == 0 else "png"
        Image.fromarray(arr).save(out / f"img_{i:02d}.{ext}")
    return out


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
