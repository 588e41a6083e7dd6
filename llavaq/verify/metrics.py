"""The numbers ``verify`` measures: logits cosine, top-1 agreement and KL per prompt, perplexity on held-out text.

Per prompt (image + question, or text only) the FP model's greedy answer is teacher-forced through both models;
logits cosine, top-1 agreement and KL(FP‖Q) over the answer positions, and top-1 over all text positions of the
sequence. Held-out plain text: perplexity FP vs Q, top-1 agreement and KL per token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llavaq.calib.images import load_image
from llavaq.errors import LlavaqError
from llavaq.verify.data import IMAGE_TEMPLATE, TEXT_TEMPLATE, EvalPrompt
from llavaq.verify.layers import LayerError


@dataclass
class PromptResult:
    prompt: str
    image: str | None
    answer: str
    answer_tokens: int
    cosine: float
    top1: float
    top1_all: float
    kl: float
    positions_all: int


@dataclass
class FidelityReport:
    model_path: str
    quantized: str
    format: str
    mode: str
    prompts: list[PromptResult]
    ppl_fp: float | None
    ppl_q: float | None
    text_tokens: int
    text_top1: float | None
    text_kl: float | None
    text_cosine: float | None
    top1: float
    kl: float
    cosine: float
    worst_layers: list[LayerError]
    quantized_linears: int
    seconds: float
    range_drivers: dict[str, Any] | None = None
    #: answers to prompts with an image, pooled over their answer positions (None: no image prompt)
    image_top1: float | None = None
    image_kl: float | None = None
    image_positions: int = 0
    #: answers to text-only prompts, pooled likewise
    text_prompt_top1: float | None = None
    text_prompt_kl: float | None = None
    text_prompt_positions: int = 0

    @property
    def ppl_increase(self) -> float | None:
        if self.ppl_fp is None or self.ppl_q is None:
            return None
        return (self.ppl_q / self.ppl_fp - 1.0) * 100.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ppl_increase_percent"] = self.ppl_increase
        return d


class TokenStats:
    """Pooled next-token statistics over positions."""

    def __init__(self) -> None:
        self.n = 0
        self.agree = 0
        self.kl = 0.0
        self.cos = 0.0

    def add(self, lf: torch.Tensor, lq: torch.Tensor) -> None:
        lf, lq = lf.double(), lq.double()
        self.n += lf.shape[0]
        self.agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        pf, pq = F.log_softmax(lf, -1), F.log_softmax(lq, -1)
        self.kl += float((pf.exp() * (pf - pq)).sum(-1).clamp(min=0).sum())
        self.cos += float(F.cosine_similarity(lf, lq, dim=-1).sum())

    def means(self) -> tuple[float, float, float]:
        n = max(self.n, 1)
        return self.agree / n, self.kl / n, self.cos / n

    def top1_kl(self) -> tuple[float | None, float | None]:
        """(top-1, KL) or (None, None) when nothing was scored."""
        if not self.n:
            return None, None
        t1, kl, _ = self.means()
        return t1, kl


def _text_positions(input_ids: torch.Tensor, image_token: int, image_tokens: int, seq_len: int) -> torch.Tensor:
    """Merged-sequence index of every input token: an ``<image>`` token expands to ``image_tokens``
    positions (the tower's patches, less the class token with the "default" feature strategy)."""
    ids = input_ids[0]
    n_img = int((ids == image_token).sum())
    width = torch.where(ids == image_token, torch.full_like(ids, image_tokens), torch.ones_like(ids))
    pos = torch.cumsum(width, 0) - 1
    if int(pos[-1]) + 1 != seq_len:
        raise LlavaqError(f"the model's output has {seq_len} positions, {n_img} image(s) of {image_tokens} "
                          f"tokens and {ids.numel() - n_img} text tokens make {int(pos[-1]) + 1}")
    return pos


@torch.no_grad()
def prompt_result(fp: nn.Module, qm: nn.Module, processor, p: EvalPrompt, answer_tokens: int,
                   image: tuple[int, int], accs: list[TokenStats], reference: dict | None = None) -> PromptResult:
    """One prompt: FP greedy answer, then FP and Q logits teacher-forced on prompt + answer.

    ``reference`` (optional, shared between calls on the same float model) memoises the float side:
    the answer and the FP logits at the text positions.
    """
    image_token, image_tokens = image
    tok = processor.tokenizer
    if p.image is not None:
        img = load_image(p.image)
        enc = processor(images=img, text=IMAGE_TEMPLATE.format(q=p.question), return_tensors="pt")
        pixel_values = enc["pixel_values"].float()
    else:
        enc = tok(TEXT_TEMPLATE.format(q=p.question), return_tensors="pt")
        pixel_values = None
    ids = enc["input_ids"]
    key = ("prompt", str(p.image), p.question, answer_tokens)
    if reference is not None and key in reference:
        answer, lf_tok = reference[key]
        full = torch.cat([ids, answer], 1)
    else:
        gen = fp.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=enc["attention_mask"],
                          max_new_tokens=answer_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          bad_words_ids=[[image_token]])
        answer = gen[:, ids.shape[1]:]
        full = torch.cat([ids, answer], 1)
        lf = fp(input_ids=full, pixel_values=pixel_values, attention_mask=torch.ones_like(full)).logits[0]
        lf_tok = lf[_text_positions(full, image_token, image_tokens, lf.shape[0])]  # one row per input token
        if reference is not None:
            reference[key] = (answer, lf_tok)
    lq = qm(input_ids=full, pixel_values=pixel_values, attention_mask=torch.ones_like(full)).logits[0]
    lq_tok = lq[_text_positions(full, image_token, image_tokens, lq.shape[0])]
    a = answer.shape[1]
    ans = slice(ids.shape[1] - 1, full.shape[1] - 1)
    one = TokenStats()
    for acc in [one, *accs]:
        acc.add(lf_tok[ans], lq_tok[ans])
    every = TokenStats()
    every.add(lf_tok[:-1], lq_tok[:-1])
    t1, kl, cos = one.means()
    return PromptResult(p.question, p.image.name if p.image else None,
                        tok.decode(answer[0], skip_special_tokens=True), a, cos, t1, every.means()[0], kl, every.n)


def perplexity_windows(tokenizer, text: str, window: int = 256, max_tokens: int = 4096) -> list[torch.Tensor]:
    """The held-out text as ``verify`` scores it: the first ``max_tokens`` tokens in chunks of ``window − 1``,
    each after a BOS token (when the tokenizer has one); every token but the first of a window is predicted."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    bos = tokenizer.bos_token_id
    out = []
    for start in range(0, ids.numel(), window - 1):
        chunk = ids[start: start + window - 1]
        if chunk.numel() < 2:
            break
        out.append(torch.cat([torch.tensor([bos]), chunk]) if bos is not None else chunk)
    return out


@torch.no_grad()
def perplexity(fp: nn.Module, qm: nn.Module, tokenizer, text: str, window: int, max_tokens: int,
                acc: TokenStats, reference: dict | None = None) -> tuple[float, float, int, TokenStats]:
    nll_f = nll_q = 0.0
    n = 0
    local = TokenStats()
    for w in perplexity_windows(tokenizer, text, window, max_tokens):
        x = w.unsqueeze(0)
        key = ("text", tuple(x[0].tolist()))
        if reference is not None and key in reference:
            lf = reference[key]
        else:
            lf = fp(input_ids=x).logits[0, :-1].double()
            if reference is not None:
                reference[key] = lf
        lq = qm(input_ids=x).logits[0, :-1].double()
        tgt = x[0, 1:]
        nll_f += float(F.cross_entropy(lf, tgt, reduction="sum"))
        nll_q += float(F.cross_entropy(lq, tgt, reduction="sum"))
        n += tgt.numel()
        local.add(lf, lq)
        acc.add(lf, lq)
    if n == 0:
        raise LlavaqError("held-out text is too short for perplexity (needs at least 2 tokens)")
    return math.exp(nll_f / n), math.exp(nll_q / n), n, local
