"""``calibrate``: the anti-outlier and calibration passes, once per recipe, into a session cache (resumable)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llavaq.calib.cache import SessionCache, default_cache_dir
from llavaq.calib.engine import CalibrationEngine
from llavaq.calib.images import load_images
from llavaq.calib.samples import image_sample, load_processor, samples_digest, text_samples
from llavaq.device import resolve_devices
from llavaq.formats.sharding import GB
from llavaq.model.loading import model_for_recipe, open_model
from llavaq.progress import NullProgress, Progress
from llavaq.recipe import QuantRecipe, check_stream_memory_gb
from llavaq.safety import check_not_input


@dataclass
class CalibrationResult:
    cache: SessionCache
    num_samples: int
    images_summary: str
    reused: bool
    seconds: float
    forward_passes: int


def calibrate(
    model_path: str | Path,
    calib_images: str | Path,
    recipe: QuantRecipe | None = None,
    *,
    cache_dir: str | Path | None = None,
    device_type: str = "cpu",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    stream_memory_gb: float | None = None,
) -> CalibrationResult:
    """Run the anti-outlier + calibration passes once and fill the session cache (resumable).

    ``stream_memory_gb``: memory for the samples' hidden states between layers (default a quarter of
    the available memory); beyond it they are read back from files in the session cache.  It changes
    no result, only where the hidden states wait.
    """
    t0 = time.perf_counter()
    budget = stream_budget(stream_memory_gb)
    recipe = recipe or QuantRecipe()
    progress = progress or NullProgress()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    check_not_input(root, "cache directory", [("model directory", model_path),
                                              ("calibration photo directory", calib_images)], flag="--cache_dir")
    arch = open_model(model_path, trust_remote_code=trust_remote_code)
    device = resolve_devices(device_type)
    processor = load_processor(model_path, trust_remote_code=trust_remote_code)
    # each photo is encoded as it is decoded: one decoded photo in memory at a time
    loaded = load_images(calib_images, lambda im, path: image_sample(processor, im, recipe.prompt, path.name),
                         mode=recipe.image_loading)
    if loaded.skipped_line():
        progress.log(f"warning: {loaded.skipped_line()}")
    samples = loaded.images + text_samples(processor, recipe.text_prompts)
    identity = {
        "model_path": str(Path(model_path).resolve()),
        "fingerprint": arch.ckpt.fingerprint(),
        "calibration": {
            "images": [p.name for p in loaded.paths],
            "images_digest": loaded.digest(),
            "samples_digest": samples_digest(samples),
            "num_samples": len(samples),
        },
        "recipe": recipe.to_dict(),
        "recipe_calibration": recipe.calibration_dict(),
    }
    with SessionCache.create_or_resume(root, identity) as cache:  # holds the session's writer lock
        reused = cache.complete
        if not reused:
            if cache.manifest["stages_done"]:
                progress.log(f"resuming calibration at layer {len(cache.manifest['stages_done']) + 1} "
                             f"from {cache.path}")
            cache.weights_digest = arch.ckpt.weights_sha256
            CalibrationEngine(model_for_recipe(arch, recipe), samples, recipe, cache, progress=progress,
                              device=device, stream_budget=budget, release_images=True).run()
    return CalibrationResult(cache, len(samples), loaded.summary(), reused, time.perf_counter() - t0,
                             int(cache.manifest.get("forward_passes", 0)))


def stream_budget(stream_memory_gb: float | None) -> int | None:
    """``--stream_memory_gb`` in bytes (None: the default budget), checked."""
    check_stream_memory_gb(stream_memory_gb)
    return None if stream_memory_gb is None else int(stream_memory_gb * GB)
