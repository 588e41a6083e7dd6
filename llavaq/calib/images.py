"""Robust loading of calibration / evaluation photos.

Every readable image is used, converted to 8-bit RGB in one of two ways (:data:`IMAGE_LOADING`):

- ``upright`` (default): EXIF orientation applied, transparent pixels composited on white, 16-bit
  scaled to 8 bit, images wider/taller than ``MAX_SIDE`` downscaled;
- ``msmodelslim``: exactly what msModelSlim's LLaVA example feeds its processor: the file as
  ``Image.open`` decodes it, then ``convert("RGB")`` (no EXIF transpose, alpha dropped, no downscale).

Unreadable files are reported together in one summary line; zero usable images is an error. Images over
``MAX_PIXELS`` are refused (decompression-bomb guard), images wider/taller than ``MAX_SIDE`` are
downscaled, images under ``MIN_SIDE`` px are refused. Licence/readme notes (``LICENSE*``,
``README*``, ``*.md``) are ignored. Files are taken from the folder itself, sorted by name
(msModelSlim uses unsorted ``os.listdir``: the order decides which photo drives the anti-outlier
pass, so we make it deterministic). Sub-folders are ignored.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from llavaq.errors import ImageError
from llavaq.recipe import IMAGE_LOADING  # --image_loading choices (module docstring); first = default

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
#: Images with more pixels than this are refused as possible decompression bombs (≈ 8k × 8k), from
#: the header alone, before any pixel is decoded. This is stricter than PIL's own guard
#: (``Image.MAX_IMAGE_PIXELS`` ≈ 89.5 MP warns, twice that raises), so PIL's warning never fires.
MAX_PIXELS = 64_000_000
#: Larger images are downscaled (aspect kept) before the processor sees them: it resizes to
#: 336 px anyway, and this bounds memory.
MAX_SIDE = 4096
#: Smaller images are refused: they carry no calibration signal, and the CLIP processor cannot tell
#: the channel axis of an image 1 or 3 pixels high.
MIN_SIDE = 8


@dataclass
class LoadedImages:
    #: the decoded images, or what ``load_images``' ``convert`` made of each
    images: list[Any]
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    folder: Path | None = None
    #: hash of every used file's name and decoded pixels (see :meth:`digest`)
    pixels_digest: str = ""

    def digest(self) -> str:
        """Identity of the images: names and decoded pixels, in order."""
        return self.pixels_digest

    def summary(self) -> str:
        s = f"{len(self.images)} image(s) used"
        if self.skipped:
            s += f", {len(self.skipped)} skipped"
        return s

    def skipped_line(self) -> str | None:
        """ONE line naming every unreadable file and why (None when all files were used)."""
        if not self.skipped:
            return None
        where = f" in {self.folder}" if self.folder is not None else ""
        return (f"skipped {len(self.skipped)} unreadable file(s){where}: "
                + ", ".join(f"{p.name} ({why})" for p, why in self.skipped))


def list_image_files(folder: Path, skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Regular files (or symlinks to them) directly in ``folder``, sorted by name; sub-folders are ignored.

    Broken or looping symlinks are appended to ``skipped`` (when given) with the reason.
    """
    if not folder.exists():
        raise ImageError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise ImageError(f"image folder {folder} is not a directory")
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise ImageError(f"cannot list image folder {folder} ({e.strerror})") from None
    files = []
    for e in entries:
        try:
            if e.is_file():  # follows symlinks
                files.append(Path(e.path))
                continue
            broken = e.is_symlink() and not e.is_dir()
        except OSError:
            broken = True
        if broken and skipped is not None:
            try:
                os.stat(e.path)
                why = "broken or looping symlink"
            except OSError as err:
                why = f"broken or looping symlink ({err.strerror})"
            skipped.append((Path(e.path), why))
    return files


def load_image(path: Path, mode: str = "upright") -> Image.Image:
    """Open one image as 8-bit RGB (``mode``: :data:`IMAGE_LOADING`), or raise ImageError with the reason.

    The size limits, the bomb guard and the truncated/corrupted-file checks apply in both modes.
    """
    if mode not in IMAGE_LOADING:
        raise ImageError(f"--image_loading must be one of {', '.join(IMAGE_LOADING)}, not {mode!r}")
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our MAX_PIXELS check is stricter
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(
                        f"{path}: {im.width}x{im.height} pixels is too large (limit {MAX_PIXELS} pixels)"
                    )
                if min(im.size) < MIN_SIDE:
                    raise ImageError(
                        f"{path}: {im.width}x{im.height} pixels is too small (minimum {MIN_SIDE} px per side)"
                    )
                im.load()
                if mode == "msmodelslim":  # upstream: Image.open(path), then the processor's convert("RGB")
                    return im.convert("RGB") if im.mode != "RGB" else im.copy()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    im = im.point(lambda v: v / 256).convert("L")
                im = im.convert("RGB")
                if max(im.size) > MAX_SIDE:
                    im.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
                return im
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # > 2 x PIL's MAX_IMAGE_PIXELS, refused by Image.open itself
        raise ImageError(f"{path}: image is too large ({str(e).split(',')[0]}; limit {MAX_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: unreadable image ({str(e) or e.__class__.__name__})") from None


#: Notes that commonly sit beside photos (e.g. calibImages/LICENSE.md) are ignored silently.
DOC_NAMES = {"LICENSE", "LICENCE", "README", "NOTICE", "COPYING", "ATTRIBUTION"}


def is_doc_file(path: Path) -> bool:
    return path.suffix.lower() in (".md", ".rst") or path.stem.upper() in DOC_NAMES


def load_images(folder: str | Path, convert: Callable[[Image.Image, Path], Any] | None = None,
                mode: str = "upright") -> LoadedImages:
    """Every usable image of ``folder`` (sorted by name); unreadable files are listed in ``skipped``.

    ``mode``: how each photo becomes RGB (:data:`IMAGE_LOADING`).

    ``convert(image, path)`` (optional) replaces each decoded image as soon as it is read, so that only
    one decoded photo is in memory at a time (calibration keeps the processor's 336 px tensors).
    """
    folder = Path(folder)
    skipped: list[tuple[Path, str]] = []
    files = [f for f in list_image_files(folder, skipped) if not is_doc_file(f)]
    images, paths = [], []
    h = hashlib.sha256()
    for f in files:
        try:
            im = load_image(f, mode)
        except ImageError as e:
            reason = e.message.split(": ", 1)[-1]
            skipped.append((f, reason))
            continue
        h.update(os.fsencode(f.name))  # the name's bytes (any encoding; = UTF-8 for UTF-8 names)
        h.update(im.tobytes())
        images.append(im if convert is None else convert(im, f))
        paths.append(f)
        del im
    if not images:
        if not skipped:
            subdirs = any(p.is_dir() for p in folder.iterdir())
            raise ImageError(f"no image files in {folder}" + (" (sub-folders are not searched)" if subdirs else ""))
        shown = ", ".join(f"{p.name}: {r}" for p, r in skipped[:5])
        more = f", and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        raise ImageError(f"no usable images in {folder} ({len(skipped)} unreadable: {shown}{more})")
    return LoadedImages(images, paths, skipped, folder, h.hexdigest()[:16])
