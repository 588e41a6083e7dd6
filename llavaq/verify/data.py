"""Evaluation data: the prompts (image + question, or text only) and the held-out text ``verify`` scores."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llavaq.calib.images import IMAGE_SUFFIXES
from llavaq.calib.prompts import read_user_text
from llavaq.errors import ImageError, LlavaqError
from llavaq.files import shipped

IMAGE_TEMPLATE = "USER: <image>\n{q} ASSISTANT:"
TEXT_TEMPLATE = "USER: {q} ASSISTANT:"
DEFAULT_QUESTION = "Describe this image in detail."


@dataclass
class EvalPrompt:
    question: str
    image: Path | None = None

    @property
    def label(self) -> str:
        return (self.image.name + ": " if self.image else "[text] ") + self.question


def shipped_eval(name: str) -> Path | None:
    """A file/dir under llavaq/data/eval shipped with the package (the held-out set), if present."""
    return shipped("eval", name)


def load_eval_prompts(prompts: str | Path | list[EvalPrompt] | None, images: str | Path | None) -> list[EvalPrompt]:
    """Evaluation prompts: a JSON list of ``{"image": file, "question": q}`` / ``{"question": q}`` / strings.

    Image files are resolved against ``images`` (default: the prompts file's folder, then the shipped
    held-out images). Without a prompts file every image in ``images`` gets "Describe this image in detail."
    A list of :class:`EvalPrompt` (already resolved) is used as it is.
    """
    if isinstance(prompts, list):
        return list(prompts)

    img_dir = Path(images) if images is not None else None
    if img_dir is not None and not img_dir.is_dir():
        raise ImageError(f"evaluation image folder {img_dir} does not exist")
    if prompts is None:
        prompts = shipped_eval("prompts.json") if images is None else None
        if img_dir is None:
            img_dir = shipped_eval("images")
    if prompts is None:
        if img_dir is None:
            return []
        files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"evaluation image folder {img_dir} has no images")
        return [EvalPrompt(DEFAULT_QUESTION, f) for f in files]
    prompts = Path(prompts)
    if not prompts.is_file():
        raise LlavaqError(f"prompt file {prompts} does not exist")
    try:
        data = json.loads(prompts.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaqError(f"prompt file {prompts}: invalid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, list) or not data:
        raise LlavaqError(f"prompt file {prompts}: expected a non-empty JSON list")
    bases = [d for d in (img_dir, prompts.parent, prompts.parent / "images", shipped_eval("images")) if d is not None]
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(EvalPrompt(item))
            continue
        if not isinstance(item, dict):
            raise LlavaqError(f"prompt file {prompts}: item {i} is not an object or a string")
        q = item.get("question", item.get("text", item.get("prompt")))
        if not isinstance(q, str) or not q.strip():
            raise LlavaqError(f"prompt file {prompts}: item {i} has no \"question\"")
        img = item.get("image")
        if img is None:
            out.append(EvalPrompt(q))
            continue
        found = next((b / img for b in bases if (b / img).is_file()), None)
        if found is None:
            raise ImageError(f"prompt file {prompts}: image {img!r} (item {i}) not found in "
                             f"{', '.join(str(b) for b in bases)}")
        out.append(EvalPrompt(q, found))
    return out


def load_heldout_text(text: str | Path | None) -> str | None:
    path = Path(text) if text is not None else shipped_eval("heldout.txt")
    if path is None:
        return None
    s = read_user_text(path, "held-out text file")
    if not s.strip():
        raise LlavaqError(f"held-out text file {path} is empty")
    return s
