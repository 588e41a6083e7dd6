"""Regenerate the bundled photos deterministically from scikit-image's sample data.

    python benchmarks/make_images.py            # writes calibImages/ and llavaq/data/eval/images/

* ``calibImages/``: calibration photos, resized to cover 640x480 (COCO-like) and centre-cropped.
* ``llavaq/data/eval/images/``: held-out evaluation photos (different images), long side <= 640 px.

All images are public domain or CC0; see the ``LICENSE.md`` next to them. Requires ``scikit-image``
(only its bundled files are used, nothing is downloaded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CALIB_DIR = ROOT / "calibImages"
EVAL_DIR = ROOT / "llavaq" / "data" / "eval" / "images"
QUALITY = 90
CALIB_SIZE = (640, 480)  # width, height
EVAL_MAX_SIDE = 640

# output name -> (skimage.data loader, vertical crop anchor 0=top .. 1=bottom)
CALIB = {
    "astronaut_nasa.jpg": ("astronaut", 0.35),
    "coffee_cc0.jpg": ("coffee", 0.5),
    "chelsea_cat_cc0.jpg": ("chelsea", 0.5),
}
EVAL = {
    "rocket_spacex.jpg": "rocket",
    "hubble_deep_field_nasa.jpg": "hubble_deep_field",
    "retina_cc0.jpg": "retina",
}


def _load(name: str) -> Image.Image:
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    return Image.fromarray(arr[..., :3].astype(np.uint8), "RGB")


def cover_crop(img: Image.Image, size: tuple[int, int], anchor_y: float = 0.5) -> Image.Image:
    """Resize so ``img`` covers ``size`` (w, h), then crop (centred horizontally, at ``anchor_y``)."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    rw, rh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    x0 = (rw - w) // 2
    y0 = int(round((rh - h) * anchor_y))
    return img.crop((x0, y0, x0 + w, y0 + h))


def fit_long_side(img: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(img.size)
    if scale >= 1:
        return img
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)


def make_calib_images(out_dir: Path = CALIB_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, (loader, anchor) in CALIB.items():
        img = cover_crop(_load(loader), CALIB_SIZE, anchor)
        img.save(out_dir / fname, "JPEG", quality=QUALITY, optimize=True)
        written.append(out_dir / fname)
    return written


def make_eval_images(out_dir: Path = EVAL_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, loader in EVAL.items():
        img = fit_long_side(_load(loader), EVAL_MAX_SIDE)
        img.save(out_dir / fname, "JPEG", quality=QUALITY, optimize=True)
        written.append(out_dir / fname)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-dir", type=Path, default=CALIB_DIR)
    ap.add_argument("--eval-dir", type=Path, default=EVAL_DIR)
    args = ap.parse_args()
    for p in make_calib_images(args.calib_dir) + make_eval_images(args.eval_dir):
        with Image.open(p) as im:
            print(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: {im.width}x{im.height}")


if __name__ == "__main__":
    main()
