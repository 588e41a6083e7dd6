"""The float model's greedy answers, layer-streamed: what ``generate(do_sample=False)`` of transformers returns.

The prompts are prefilled by one :class:`~llavaq.verify.streamed.StreamedPass` (float side only) whose language
model layers fill one ``DynamicCache`` per prompt; each next token then streams the language model's layers
once for all prompts (one new position each, reading the caches). The image token is never generated
(``bad_words_ids``); a prompt stops at an end-of-sequence token (kept in the answer, as transformers keeps it)
or after ``max_new`` tokens. The caches of all prompts of a group are in memory: prompts are grouped so that
their caches stay within the memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from llavaq.model.llava import LlavaArch
from llavaq.verify.streamed import EvalItem, Side, StreamedPass, release_stage_memory


def eos_ids(arch: LlavaArch) -> set[int]:
    """The end-of-sequence ids ``generate`` stops at: the model's generation config (its file when present)."""
    from transformers import GenerationConfig

    path = Path(arch.ckpt.path)
    cfg = GenerationConfig.from_pretrained(str(path)) if (path / "generation_config.json").is_file() \
        else GenerationConfig.from_model_config(arch.config)
    eos = cfg.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def cache_bytes(arch: LlavaArch, positions: int) -> int:
    """Float32 bytes of one prompt's key/value cache over ``positions`` positions."""
    tc = arch.text_config
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    return 2 * arch.n_text_layers * positions * kv * (tc.hidden_size // heads) * 4


def _next_token(logits: Tensor, bad: int) -> int:
    scores = logits.clone()
    scores[..., bad] = -float("inf")
    return int(scores.argmax(-1))


@torch.no_grad()
def greedy_answers(arch: LlavaArch, items: Sequence[EvalItem], max_new: int, work: Path, budget: int) -> list[Tensor]:
    """Each prompt's generated tokens ``[1, n]`` (n ≤ ``max_new``), in groups whose caches fit ``budget``."""
    out: list[Tensor] = []
    group: list[EvalItem] = []
    used = 0
    for it in items:
        need = cache_bytes(arch, it.input_ids.shape[1] + arch.image_tokens * int(it.pixel_values is not None)
                           + max_new)
        if group and used + need > budget:
            out += _greedy_group(arch, group, max_new, work)
            group, used = [], 0
        group.append(it)
        used += need
    if group:
        out += _greedy_group(arch, group, max_new, work)
    return out


def _greedy_group(arch: LlavaArch, items: Sequence[EvalItem], max_new: int, work: Path) -> list[Tensor]:
    from transformers import DynamicCache

    bad, eos = arch.config.image_token_index, eos_ids(arch)
    caches = [DynamicCache() for _ in items]
    items = [EvalItem(it.input_ids, it.attention_mask, it.pixel_values, slice(-1, None)) for it in items]
    answers: list[list[int]] = [[] for _ in items]

    def first(j: int, logits: dict[str, Tensor]) -> None:
        answers[j].append(_next_token(logits["float"][-1], bad))

    StreamedPass({"float": Side(arch, arch.build_stage)}, items, work, 1 << 62, caches=caches).run(first)
    for _ in range(max_new - 1):
        active = [j for j, a in enumerate(answers) if a[-1] not in eos]
        if not active:
            break
        for j, tok in zip(active, _decode_step(arch, [answers[j][-1] for j in active],
                                               [caches[j] for j in active], bad), strict=True):
            answers[j].append(tok)
    return [torch.tensor([a], dtype=torch.long) for a in answers]


def _decode_step(arch: LlavaArch, tokens: list[int], caches: list, bad: int) -> list[int]:
    """One new position per prompt through the language model's layers (streamed), reading and extending the
    caches; the greedy next tokens."""
    embed = arch.token_embedder()
    hs = [embed(torch.tensor([[t]])) for t in tokens]
    pos = [torch.tensor([[c.get_seq_length()]]) for c in caches]
    del embed
    for st in arch.stages():
        if st.kind != "text_layer":
            continue
        layer = arch.build_stage(st)
        hs = [layer(h, attention_mask=None, position_ids=p, past_key_value=c, use_cache=True)[0]
              for h, p, c in zip(hs, pos, caches, strict=True)]
        del layer
        release_stage_memory()
    norm, head = arch.build_final_norm(), arch.lm_head_weight()
    return [_next_token(F.linear(norm(h), head)[0, -1], bad) for h in hs]
