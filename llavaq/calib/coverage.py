"""Which calibration samples set each quantized Linear's activation range.

The calibration engine records, per sample and per Linear input, the float per-tensor min and max
(``float.<linear>.sample_min`` / ``.sample_max``). Image samples come first, text-only prompts after
them; vision-tower and projector Linears see the image samples only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llavaq.calib.cache import SessionCache
from llavaq.errors import CacheError


@dataclass
class RangeDrivers:
    samples: list[str]
    kinds: list[str]  # "image" | "text" per sample
    language_linears: int = 0
    set_by_text: int = 0  # language-model Linears whose min or max comes from a text-only sample
    set_by_image: int = 0
    per_sample: dict[str, int] = field(default_factory=dict)  # Linears (all) whose min or max a sample sets
    text_linears: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        n_txt = self.kinds.count("text")
        if not n_txt:
            return (f"all {len(self.samples)} calibration samples are image prompts: they set the activation "
                    f"range of every quantized Linear")
        return (f"text-only prompts ({n_txt}) set the activation range (min or max) of {self.set_by_text}/"
                f"{self.language_linears} quantized language-model Linears; image prompts "
                f"({len(self.samples) - n_txt}) of {self.set_by_image}/{self.language_linears}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary
        return d


def range_drivers(cache: str | Path | SessionCache) -> RangeDrivers:
    """Count, per sample set, the quantized Linears whose float input range it sets (from the cache)."""
    sc = cache if isinstance(cache, SessionCache) else SessionCache.load(cache)
    cal = sc.manifest.get("calibration", {})
    images = list(cal.get("images", []))
    n = int(cal.get("num_samples", len(images)))
    labels = images + [f"text{j}" for j in range(n - len(images))]
    kinds = ["image"] * len(images) + ["text"] * (n - len(images))
    rd = RangeDrivers(labels, kinds, per_sample={lab: 0 for lab in labels})
    for stage in sc.manifest.get("stages_done", []):
        rec = sc.read_stage(stage)
        is_text = stage.startswith("text_layer")
        for key in rec:
            if not key.startswith("act.") or not key.endswith(".input_scale"):
                continue
            lin = key[len("act."):-len(".input_scale")]
            smin, smax = rec.get(f"float.{lin}.sample_min"), rec.get(f"float.{lin}.sample_max")
            if smin is None or smax is None:
                raise CacheError(f"cache {sc.path} has no per-sample ranges (made by an older llavaq); "
                                 "run calibrate again")
            # vision side: calls are the image samples, in order; language model: every sample
            idx = list(range(n)) if is_text else list(range(len(images)))
            if len(idx) != smin.numel():
                idx = list(range(smin.numel()))
            lo, hi = idx[int(smin.argmin())], idx[int(smax.argmax())]
            for j in {lo, hi}:
                rd.per_sample[labels[j]] = rd.per_sample.get(labels[j], 0) + 1
            if is_text:
                rd.language_linears += 1
                if kinds[lo] == "text" or kinds[hi] == "text":
                    rd.set_by_text += 1
                    rd.text_linears.append(lin)
                if kinds[lo] == "image" or kinds[hi] == "image":
                    rd.set_by_image += 1
    return rd
