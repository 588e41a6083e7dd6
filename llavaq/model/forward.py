"""The float LLaVA forward rebuilt from the layer builders, one layer at a time over every sample.

What ``LlavaForConditionalGeneration`` computes (vision tower → ``hidden_states[vision_feature_layer]``
→ feature selection → projector → merge with the token embeddings → decoder layers → final norm →
lm_head), with one layer's weights in memory at a time, as calibration streams them. The tests compare
its logits with transformers' for every family; ``benchmarks/scale.py`` times it as the physical floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from llavaq.model.llava import LlavaArch


@torch.no_grad()
def float_forward(arch: LlavaArch, samples: Sequence[Any],
                  on_compute: Callable[[int, float], None] | None = None) -> list[torch.Tensor]:
    """Float32 logits ``[1, positions, vocab]`` of every sample (objects with ``input_ids``,
    ``attention_mask`` and ``pixel_values``, None for a text-only sample).

    ``on_compute(j, seconds)`` (optional) receives each piece of sample ``j``'s compute time.
    """

    def run(fn: Callable[[int, torch.Tensor], torch.Tensor], items: dict[int, torch.Tensor]) -> dict:
        out = {}
        for j, h in items.items():
            t = time.perf_counter()
            out[j] = fn(j, h)
            if on_compute is not None:
                on_compute(j, time.perf_counter() - t)
        return out

    images = {j: s.pixel_values.float() for j, s in enumerate(samples) if s.pixel_values is not None}
    hs = images
    if images:
        emb = arch.build_vision_embeddings()
        hs = run(lambda j, x: emb(x), images)
        del emb
    feats = hs if arch.feature_index == 0 else {}
    for i in range(arch.n_vision_layers if images else 0):
        layer = arch.build_vision_layer(i)
        hs = run(lambda j, h, layer=layer: arch.vision.call_layer(layer, h), hs)
        del layer
        if i + 1 == arch.feature_index:
            feats = hs
    if images:
        proj = arch.build_projector()
        feats = run(lambda j, h: proj(arch.select_image_features(h)), feats)
        del proj
    embed = arch.token_embedder()
    lm, ctx = {}, {}
    for j, s in enumerate(samples):
        tok = embed(s.input_ids)
        if j in feats:
            e, mask2d, pos = arch.merge_image_features(feats[j], tok, s.input_ids, s.attention_mask)
        else:
            e, mask2d, pos = tok, s.attention_mask, torch.arange(tok.shape[1]).unsqueeze(0)
        lm[j], ctx[j] = e, (arch.causal_mask(mask2d, e), pos)
    del embed
    for i in range(arch.n_text_layers):
        layer = arch.build_text_layer(i)
        lm = run(lambda j, h, layer=layer: arch.text.call_layer(layer, h, *ctx[j]), lm)
        del layer
    norm = arch.build_final_norm()
    head = arch.lm_head_weight()
    logits = run(lambda j, h: F.linear(norm(h), head), lm)
    return [logits[j] for j in range(len(samples))]
