"""Tiny LLaVA checkpoints built in-process, for tests and benchmarks (no hub access).

The models are llava-hf-format directories (config.json, safetensors, a fast tokenizer, an image
processor) that load with ``LlavaForConditionalGeneration.from_pretrained`` exactly like the real
checkpoints: LLaVA-1.5 (Llama + CLIP, also loads with ``AutoProcessor``), bakLlava (Mistral + CLIP)
and llava-interleave (Qwen2 + SigLIP, whose processor transformers 4.37.2 builds only from its parts).
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


def _train_bpe(special_tokens: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE fast Llama tokenizer with ``<image>`` and ``<pad>`` special tokens."""
    from transformers import LlamaTokenizerFast

    tok = _train_bpe(["<unk>", "<s>", "</s>"], vocab_size)
    fast = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False, legacy=False,
    )
    fast.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return fast


def build_qwen2_tokenizer(vocab_size: int = 300):
    """A byte-level BPE fast Qwen2 tokenizer (no BOS, ``<|endoftext|>`` pad, ``<|im_end|>`` eos, ``<image>``),
    shaped like llava-interleave-qwen's."""
    from transformers import Qwen2TokenizerFast

    tok = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


#: accepted spellings of the vision tower type
_VISION_TYPES = {"clip": "clip_vision_model", "clip_vision_model": "clip_vision_model",
                 "siglip": "siglip_vision_model", "siglip_vision_model": "siglip_vision_model"}


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
    text_model_type: str = "llama",
    vision_model_type: str = "clip_vision_model",
    sliding_window: int | None = None,
    vision_feature_layer: int | None = None,
    vision_feature_select_strategy: str | None = None,
    vision_use_head: bool = True,
    attention_bias: bool = False,
) -> Path:
    """Write a tiny random llava-hf LLaVA checkpoint to ``out_dir``.

    ``text_model_type``: ``llama`` (LLaVA-1.5), ``mistral`` (bakLlava: ``sliding_window``, default 4096) or
    ``qwen2`` (llava-interleave-qwen: q/k/v biases, Qwen2 tokenizer without BOS). ``vision_model_type``:
    ``clip_vision_model`` (336-px CLIP-L style: CLS token, ``pre_layrnorm``, quick_gelu; features
    ``vision_feature_layer=-2``, ``"default"``) or ``siglip_vision_model`` (no CLS token, no pre-norm,
    gelu_pytorch_tanh, ``post_layernorm`` + attention-pooling ``head``; features ``-1``, ``"full"``, a
    ``SiglipImageProcessor`` that transformers 4.37.2's ``LlavaProcessor`` refuses, as llava-interleave ships).
    ``vision_use_head=False`` leaves the SigLIP head's tensors out of the checkpoint and marks
    ``vision_config.vision_use_head = false`` (llava-interleave's checkpoints have no head).

    ``outliers`` scales a few norm channels up so that the activations have the channel
    outliers that smoothing exists for (as real LLMs do).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vision_model_type = _VISION_TYPES[vision_model_type]
    siglip = vision_model_type == "siglip_vision_model"
    tokenizer = build_qwen2_tokenizer() if text_model_type == "qwen2" else build_tokenizer()
    vocab = len(tokenizer)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    vision_config = dict(
        model_type=vision_model_type, hidden_size=vision_hidden, intermediate_size=vision_intermediate,
        num_hidden_layers=vision_layers, num_attention_heads=vision_heads, image_size=image_size,
        patch_size=patch_size,
    )
    if siglip:
        vision_config.update(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
        if not vision_use_head:
            vision_config["vision_use_head"] = False
    else:
        vision_config.update(projection_dim=vision_hidden, hidden_act="quick_gelu")
    text_config = dict(
        model_type=text_model_type, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if attention_bias:
        text_config["attention_bias"] = True
    if text_model_type in ("mistral", "qwen2"):
        text_config["sliding_window"] = sliding_window if sliding_window is not None else 4096
    if text_model_type == "qwen2":
        text_config.update(use_sliding_window=sliding_window is not None, max_window_layers=text_layers)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        vision_feature_layer=vision_feature_layer if vision_feature_layer is not None else (-1 if siglip else -2),
        vision_feature_select_strategy=vision_feature_select_strategy or ("full" if siglip else "default"),
        projector_hidden_act="gelu",
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layer_norm1.weight") or name.endswith(
                "layer_norm2.weight"
            ):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                if outliers:
                    idx = torch.randperm(p.numel(), generator=g)[:3]
                    p[idx] *= 8.0
            elif name.endswith(".bias") or name.endswith("in_proj_bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5 * 0.8)
    model.to(dtype)
    model.config.torch_dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    if siglip and not vision_use_head:  # llava-interleave ships no pooling head (transformers 4.37.2 builds one)
        from safetensors.torch import load_file, save_file

        state = load_file(str(out / "model.safetensors"))
        state = {k: v for k, v in state.items() if not k.startswith("vision_tower.vision_model.head.")}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_processor(out, tokenizer, image_size, siglip)
    return out


def save_processor(out: Path, tokenizer, image_size: int, siglip: bool) -> None:
    """The processor files as llava-hf ships them: a LlavaProcessor, or for SigLIP towers the tokenizer and a
    SiglipImageProcessor config saved side by side (4.37.2's LlavaProcessor accepts only a CLIPImageProcessor)."""
    from transformers import CLIPImageProcessor, LlavaProcessor, SiglipImageProcessor

    if siglip:
        ip = SiglipImageProcessor(size={"height": image_size, "width": image_size}, do_resize=True,
                                  do_rescale=True, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                                  image_std=[0.5, 0.5, 0.5])
        ip.save_pretrained(out)
        tokenizer.save_pretrained(out)
        cfg = json.loads((out / "preprocessor_config.json").read_text())
        cfg["processor_class"] = "LlavaProcessor"
        (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)


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
