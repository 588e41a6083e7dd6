"""The numbers ``verify`` measures: logits cosine, top-1 agreement and KL per prompt, perplexity on held-out text.

Per prompt (image + question, or text only) the FP model's greedy answer is teacher-forced through both models;
logits cosine, top-1 agreement and KL(FP‖Q) over the answer positions, and top-1 over all text positions of the
sequence. Held-out plain text: perplexity FP vs Q, top-1 agreement and KL per token.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

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


def text_positions(input_ids: torch.Tensor, image_token: int, image_tokens: int) -> torch.Tensor:
    """Merged-sequence index of every input token: an ``<image>`` token expands to ``image_tokens``
    positions (the tower's patches, less the class token with the "default" feature strategy)."""
    ids = input_ids[0]
    width = torch.where(ids == image_token, torch.full_like(ids, image_tokens), torch.ones_like(ids))
    return torch.cumsum(width, 0) - 1


def encode_prompt(processor, p: EvalPrompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask, pixel_values or None) of one evaluation prompt."""
    if p.image is not None:
        enc = processor(images=load_image(p.image), text=IMAGE_TEMPLATE.format(q=p.question), return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], enc["pixel_values"].float()
    enc = processor.tokenizer(TEXT_TEMPLATE.format(q=p.question), return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], None


def prompt_key(p: EvalPrompt, answer_tokens: int) -> tuple:
    """A prompt's key in the float reference (its answer and float logits): the photo by name and content."""
    photo = hashlib.sha256(p.image.read_bytes()).hexdigest() if p.image is not None else None
    return ("prompt", str(p.image), photo, p.question, answer_tokens)


def score_prompt(p: EvalPrompt, tok, prompt_len: int, answer: torch.Tensor, lf_tok: torch.Tensor,
                 lq_tok: torch.Tensor, accs: list[TokenStats]) -> PromptResult:
    """One prompt's numbers from the FP and Q logits at its text positions (one row per input token), teacher-
    forced on prompt + FP's greedy answer."""
    a = answer.shape[1]
    ans = slice(prompt_len - 1, prompt_len + a - 1)
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


class TextScores:
    """Held-out text: perplexity FP vs Q, pooled over the windows in order (``add`` one window at a time)."""

    def __init__(self) -> None:
        self.nll_f = self.nll_q = 0.0
        self.n = 0
        self.local = TokenStats()

    def add(self, window: torch.Tensor, lf: torch.Tensor, lq: torch.Tensor, acc: TokenStats) -> None:
        lf, lq = lf.double(), lq.double()
        tgt = window[1:]
        self.nll_f += float(F.cross_entropy(lf, tgt, reduction="sum"))
        self.nll_q += float(F.cross_entropy(lq, tgt, reduction="sum"))
        self.n += tgt.numel()
        self.local.add(lf, lq)
        acc.add(lf, lq)

    def result(self) -> tuple[float, float, int, TokenStats]:
        if self.n == 0:
            raise LlavaqError("held-out text is too short for perplexity (needs at least 2 tokens)")
        return math.exp(self.nll_f / self.n), math.exp(self.nll_q / self.n), self.n, self.local
