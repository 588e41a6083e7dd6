"""The tuner's evaluation data: the set (and its screening subset), its digest, and its overlap check."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llavaq.calib.images import is_doc_file, list_image_files
from llavaq.calib.prompts import read_text_prompts
from llavaq.errors import LlavaqError
from llavaq.files import shipped
from llavaq.model.checkpoint import file_sha256
from llavaq.tuning.tables import SCORE_VERSION, ScreenSpec
from llavaq.verify import EvalPrompt, load_eval_prompts, load_heldout_text, shipped_eval


@dataclass
class EvalData:
    prompts: list[EvalPrompt]
    text_path: Path | None
    text: str | None
    answer_tokens: int
    digest: str = ""
    max_text_tokens: int = 4096

    @property
    def image_prompts(self) -> int:
        return sum(p.image is not None for p in self.prompts)

    def screen(self, spec: ScreenSpec) -> EvalData | None:
        """The screening subset, or None when it would be (almost) the whole set: score everything in full."""
        images, seen = [], set()
        for p in self.prompts:  # one prompt per photo first, then the others
            if p.image is not None and p.image not in seen:
                seen.add(p.image)
                images.append(p)
        images += [p for p in self.prompts if p.image is not None and p not in images]
        texts = [p for p in self.prompts if p.image is None]
        sub = images[: spec.image_prompts] + texts[: spec.text_prompts]
        tokens = min(spec.text_tokens, self.max_text_tokens)
        if len(sub) >= len(self.prompts) and (self.text is None or len(self.text.encode()) <= tokens):
            return None
        order = {id(p): i for i, p in enumerate(self.prompts)}
        return EvalData(sorted(sub, key=lambda p: order[id(p)]), self.text_path, self.text, self.answer_tokens,
                        self.digest + ":screen", tokens)


def load_eval_data(eval_prompts: str | Path | None, eval_images: str | Path | None, eval_text: str | Path | None,
                   answer_tokens: int) -> EvalData:
    """The evaluation set (defaults: the shipped held-out set) and its digest (prompts, image bytes, text)."""
    prompts = load_eval_prompts(eval_prompts, eval_images)
    text = load_heldout_text(eval_text)
    if text is None:
        raise LlavaqError("--recipe auto needs held-out text for perplexity: pass --eval_text "
                          "(the shipped held-out set is not installed)")
    text_path = Path(eval_text) if eval_text is not None else shipped_eval("heldout.txt")
    h = hashlib.sha256(f"v{SCORE_VERSION}:{answer_tokens}".encode())
    for p in prompts:
        h.update(json.dumps([p.question, file_sha256(p.image) if p.image is not None else None]).encode())
    h.update(text.encode())
    return EvalData(prompts, text_path, text, answer_tokens, h.hexdigest()[:16])


def _norm(text: str) -> str:
    """A prompt without its chat wrapper, whitespace and case: ``USER: <image>\\nQ ASSISTANT:`` -> ``q``."""
    s = " ".join(text.replace("<image>", " ").split()).casefold()
    if s.startswith("user:"):
        s = s[len("user:"):].strip()
    if s.endswith("assistant:"):
        s = s[: -len("assistant:")].strip()
    return s


def check_disjoint(calib_images: str | Path, text_prompts: tuple[str, ...], data: EvalData) -> None:
    """Refuse evaluation data that overlaps the calibration data: one line naming the first overlap."""
    calib = {}
    for f in list_image_files(Path(calib_images)):
        if not is_doc_file(f):
            calib.setdefault(file_sha256(f), f)
    for p in data.prompts:
        if p.image is not None and (twin := calib.get(file_sha256(p.image))) is not None:
            raise LlavaqError(f"evaluation image {p.image} is identical to calibration image {twin}: the evaluation "
                              "data must not overlap the calibration data (pass other --eval_images/--eval_prompts "
                              "or --calib_images)")
    prompts = {_norm(t): t for t in text_prompts if _norm(t)}
    for p in data.prompts:
        if p.image is None and _norm(p.question) in prompts:
            raise LlavaqError(f"evaluation prompt {p.question!r} is also a calibration prompt: the evaluation data "
                              "must not overlap the calibration data (pass other --eval_prompts or --text_prompts)")
    text = data.text or ""
    pieces = [text, *text.split("\n\n"), *text.splitlines()]
    for piece in pieces:
        if _norm(piece) in prompts:
            raise LlavaqError(f"the held-out text {data.text_path} contains the calibration prompt "
                              f"{prompts[_norm(piece)]!r}: the evaluation data must not overlap the calibration "
                              "data (pass another --eval_text or --text_prompts)")


def shipped_text_prompts() -> tuple[str, ...]:
    """The shipped text-only calibration prompts (``llavaq/data/calib_text.json``), if installed."""
    p = shipped("calib_text.json")
    return read_text_prompts(p) if p is not None and p.is_file() else ()
