"""One ``verify`` run, layer-streamed: the float model's greedy answers, then one pass of the float and the
emulated quantized model together over the prompts (teacher-forced on prompt + answer) and the held-out text
windows, scored sample by sample as their logits come out.

The float side (answers, float logits at the scored positions) is looked up in ``reference`` first and stored
there when computed: with every sample's float side known, the pass streams the quantized model alone (the
float stages are then built only for the per-Linear errors' float weights).
"""

from __future__ import annotations

import tempfile
from collections.abc import MutableMapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from llavaq.model.llava import LlavaArch, Stage
from llavaq.verify.data import EvalPrompt
from llavaq.verify.generate import greedy_answers
from llavaq.verify.layers import LayerErrorHooks
from llavaq.verify.metrics import (
    PromptResult,
    TextScores,
    TokenStats,
    encode_prompt,
    prompt_key,
    score_prompt,
    text_positions,
)
from llavaq.verify.outputs import QuantizedCheckpoint
from llavaq.verify.stages import output_arch, quantized_stage, stage_linears
from llavaq.verify.streamed import EvalItem, Side, StreamedPass


class StreamedVerify:
    """The float and the quantized model of one ``verify`` call (see the module docstring)."""

    def __init__(self, arch: LlavaArch, q: QuantizedCheckpoint, mode: str, processor,
                 reference: MutableMapping, budget: int) -> None:
        self.arch, self.q, self.mode, self.processor = arch, q, mode, processor
        self.qarch = output_arch(arch, q)
        self.reference, self.budget = reference, budget

    def _attach(self, hooks: LayerErrorHooks | None):
        def attach(stage: Stage, mods: dict[str, nn.Module]) -> list:
            if hooks is None or not stage_linears(self.q, stage):
                return []
            fmod = mods["float"] if "float" in mods else self.arch.build_stage(stage)
            return hooks.attach(stage, mods["quant"], fmod)

        return attach

    def _items(self, prompts: Sequence[EvalPrompt], answer_tokens: int, windows: Sequence[Tensor], work: Path):
        """The pass's samples, each prompt's (prompt length, answer) and every sample's reference key."""
        encs = [encode_prompt(self.processor, p) for p in prompts]
        keys = [prompt_key(p, answer_tokens) for p in prompts]
        missing = [i for i, k in enumerate(keys) if k not in self.reference]
        generated = dict(zip(missing, greedy_answers(
            self.arch, [EvalItem(*encs[i], slice(-1, None)) for i in missing], answer_tokens, work / "gen",
            self.budget), strict=True)) if missing else {}
        image = (self.arch.config.image_token_index, self.arch.image_tokens)
        items, answers = [], []
        for i, (ids, _mask, pixels) in enumerate(encs):
            answer = self.reference[keys[i]][0] if i not in generated else generated[i]
            full = torch.cat([ids, answer], 1)
            items.append(EvalItem(full, torch.ones_like(full), pixels, text_positions(full, *image)))
            answers.append((ids.shape[1], answer))
        for w in windows:
            items.append(EvalItem(w.unsqueeze(0), torch.ones(1, w.numel(), dtype=torch.long), None, slice(0, -1)))
            keys.append(("text", tuple(w.tolist())))
        return items, answers, keys

    def score(self, prompts: Sequence[EvalPrompt], answer_tokens: int, windows: Sequence[Tensor],
              hooks: LayerErrorHooks | None) -> tuple[list[PromptResult], TokenStats, TokenStats, TokenStats,
                                                       TextScores]:
        tok = self.processor.tokenizer
        acc, image_acc, textq_acc, text = TokenStats(), TokenStats(), TokenStats(), TextScores()
        results: list[PromptResult] = []
        with tempfile.TemporaryDirectory(prefix="llavaq-verify-") as tmp:
            items, answers, keys = self._items(prompts, answer_tokens, windows, Path(tmp))
            sides = {"float": Side(self.arch, self.arch.build_stage)} \
                if any(k not in self.reference for k in keys) else {}
            sides["quant"] = Side(self.qarch, lambda st: quantized_stage(self.qarch, self.q, st, self.mode))

            def on_logits(j: int, out: dict[str, Tensor]) -> None:
                key = keys[j]
                if j < len(prompts):
                    n, answer = answers[j]
                    if key not in self.reference:
                        self.reference[key] = (answer, out["float"])
                    lf = self.reference[key][1]
                    p = prompts[j]
                    results.append(score_prompt(p, tok, n, answer, lf, out["quant"],
                                                [acc, image_acc if p.image is not None else textq_acc]))
                else:
                    if key not in self.reference:
                        self.reference[key] = out["float"]
                    text.add(items[j].input_ids[0], self.reference[key], out["quant"], acc)

            StreamedPass(sides, items, Path(tmp), self.budget, self._attach(hooks)).run(on_logits)
        return results, acc, image_acc, textq_acc, text
