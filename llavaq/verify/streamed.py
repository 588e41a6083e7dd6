"""The layer-streamed forward ``verify`` runs: the float model and the emulated quantized model advance together,
one stage at a time, over every evaluation sample.

Between two stages each side holds every sample's hidden state, in memory within a budget and on disk beyond
it (:class:`~llavaq.calib.streams.StreamStore`, as calibration keeps its streams); only the current stage's
weights of each side are in memory. The vision tower, the projector and the merge of the image features into
the token embeddings follow :func:`llavaq.model.forward.float_forward` (what ``LlavaForConditionalGeneration``
computes), so the float side's logits are transformers'. At the end each sample's logits are computed (one
sample at a time: ``positions x vocab``) and handed to ``on_logits`` with the rows it asked for.

``caches`` (optional, float side only) gives each sample a transformers ``DynamicCache``: the language model's
layers then read and extend it (greedy generation, :mod:`llavaq.verify.generate`).
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llavaq.calib.streams import StreamStore, default_stream_budget
from llavaq.memory import release_free_memory
from llavaq.model.llava import LlavaArch, Stage


def release_stage_memory() -> None:
    """After a stage: free what cycles hold, and give the freed heap back to the OS (a stage's weights are
    tens of MiB blocks; glibc keeps them otherwise, and the peak RSS would grow with the depth)."""
    gc.collect()
    release_free_memory()


@dataclass
class EvalItem:
    """One sequence to run: token ids ``[1, L]``, its attention mask, its photo's pixel values (or None), and
    the rows of its logits (merged positions) to hand back."""

    input_ids: Tensor
    attention_mask: Tensor
    pixel_values: Tensor | None
    rows: Tensor | slice


@dataclass
class Side:
    """One model of the pair: its arch (the builders read its tensors) and how a stage is built."""

    arch: LlavaArch
    build: Callable[[Stage], nn.Module]


#: (stage, {side: module}) -> hook handles to remove after the stage (the per-Linear error hooks)
Attach = Callable[[Stage, dict[str, nn.Module]], list[Any]]


class StreamedPass:
    """One pass of ``sides`` over ``items`` (see the module docstring)."""

    def __init__(self, sides: dict[str, Side], items: Sequence[EvalItem], root: Path, budget: int,
                 attach: Attach | None = None, caches: list[Any] | None = None) -> None:
        self.sides, self.items, self.attach, self.caches = sides, list(items), attach, caches
        self.store = StreamStore(root / "h", budget)
        self.feat_store = StreamStore(root / "feat", budget)
        self.n = 0
        self.h: dict[str, Sequence[Tensor | None]] = {}
        self.feats: dict[str, Sequence[Tensor | None]] = {}
        self.ctx: list[tuple[Tensor | None, Tensor]] = []
        self.arch = next(iter(sides.values())).arch

    def _advance(self, fns: dict[str, Callable[[int, Tensor], Tensor]]) -> None:
        """Every side's stream through one step: ``fns[side](j, h)`` for each sample that has a state."""
        self.n += 1
        gen = self.store.begin(self.n)
        for k, fn in fns.items():
            new = gen.new_list(k)
            for j in range(len(self.items)):
                h = self.h[k][j]
                new.append(None if h is None else fn(j, h))
            self.h[k] = new
        self.store.keep_only(self.n)

    def _capture(self) -> None:
        gen = self.feat_store.begin(self.n)
        self.feats = {k: gen.carry(f"feat_{k}", list(self.h[k])) for k in self.sides}
        self.feat_store.keep_only(self.n)

    def _stage(self, stage: Stage, call: Callable[[nn.Module, int, Tensor], Tensor]) -> None:
        mods = {k: s.build(stage) for k, s in self.sides.items()}
        handles = self.attach(stage, mods) if self.attach is not None else []
        try:
            self._advance({k: (lambda j, h, m=m: call(m, j, h)) for k, m in mods.items()})
        finally:
            for hd in handles:
                hd.remove()
        del mods, handles
        release_stage_memory()

    @torch.no_grad()
    def run(self, on_logits: Callable[[int, dict[str, Tensor]], None]) -> None:
        self.h = {k: [None if it.pixel_values is None else it.pixel_values.float() for it in self.items]
                  for k in self.sides}
        if any(it.pixel_values is not None for it in self.items):
            self._vision()
        self._language_model()
        self._logits(on_logits)

    def _vision(self) -> None:
        arch = self.arch
        embs = {k: s.arch.build_vision_embeddings() for k, s in self.sides.items()}
        self._advance({k: (lambda j, x, e=e: e(x)) for k, e in embs.items()})
        del embs
        if arch.feature_index == 0:
            self._capture()
        stages = {st.kind: st for st in arch.stages() if st.kind != "vision_layer"}
        for st in arch.stages():
            if st.kind != "vision_layer":
                continue
            self._stage(st, lambda m, j, h: arch.vision.call_layer(m, h))
            if st.index + 1 == arch.feature_index:
                self._capture()
        if "vision_head" in stages and self.attach is not None:  # the tower runs it (its Linears' errors)
            mods = {k: s.build(stages["vision_head"]) for k, s in self.sides.items()}
            handles = self.attach(stages["vision_head"], mods)
            for k, m in mods.items():
                for h in self.h[k]:
                    if h is not None:
                        m(h)
            for hd in handles:
                hd.remove()
        self.h = self.feats
        self._stage(stages["projector"], lambda m, j, h: m(arch.select_image_features(h)))

    def _language_model(self) -> None:
        arch = self.arch
        feats = self.h
        self.n += 1
        gen = self.store.begin(self.n)
        merged = {}
        for k, s in self.sides.items():
            embed = s.arch.token_embedder()
            merged[k] = gen.new_list(k)
            for j, it in enumerate(self.items):
                tok = embed(it.input_ids)
                f = feats[k][j] if it.pixel_values is not None else None
                if f is None:
                    e, mask2d, pos = tok, it.attention_mask, torch.arange(tok.shape[1]).unsqueeze(0)
                else:
                    e, mask2d, pos = arch.merge_image_features(f, tok, it.input_ids, it.attention_mask)
                merged[k].append(e)
                if len(self.ctx) <= j:
                    self.ctx.append((arch.causal_mask(mask2d, e), pos))
            del embed
        self.h = merged
        self.feats = {}
        self.feat_store.keep_only(-1)
        self.store.keep_only(self.n)
        for st in arch.stages():
            if st.kind == "text_layer":
                self._stage(st, self._text_call)

    def _text_call(self, layer: nn.Module, j: int, h: Tensor) -> Tensor:
        mask, pos = self.ctx[j]
        if self.caches is None:
            return self.arch.text.call_layer(layer, h, mask, pos)
        return layer(h, attention_mask=mask, position_ids=pos, past_key_value=self.caches[j], use_cache=True)[0]

    def _logits(self, on_logits: Callable[[int, dict[str, Tensor]], None]) -> None:
        heads = {k: (s.arch.build_final_norm(), s.arch.lm_head_weight()) for k, s in self.sides.items()}
        for j, it in enumerate(self.items):
            out = {}
            for k, (norm, head) in heads.items():
                out[k] = F.linear(norm(self.h[k][j]), head)[0][it.rows]
            on_logits(j, out)
        self.store.keep_only(-1)


def tmp_root() -> str:
    """Where a pass keeps the hidden states it spills (the system's temporary directory)."""
    return tempfile.gettempdir()


@torch.no_grad()
def float_window_logits(arch: LlavaArch, windows: Sequence[Tensor], tmp: Path, budget: int | None = None
                        ) -> list[Tensor]:
    """The float model's logits (float64) at every position but the last of each text window, streamed."""
    items = [EvalItem(w.unsqueeze(0), torch.ones(1, w.numel(), dtype=torch.long), None, slice(0, -1))
             for w in windows]
    out: list[Tensor] = []
    with tempfile.TemporaryDirectory(prefix="llavaq-verify-", dir=tmp) as d:
        StreamedPass({"float": Side(arch, arch.build_stage)}, items, Path(d),
                     default_stream_budget() if budget is None else budget).run(
            lambda j, logits: out.append(logits["float"].double()))
    return out
