"""The library API: ``calibrate`` once, ``export`` many times, or ``quantize`` (both).

The CLI is a thin shell over these functions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavaq.calib.cache import SessionCache, default_cache_dir
from llavaq.calib.engine import CalibrationEngine
from llavaq.calib.images import load_images
from llavaq.calib.samples import image_sample, load_processor, samples_digest, text_samples
from llavaq.device import resolve_devices
from llavaq.errors import CacheError
from llavaq.formats import ExportContext, get_format
from llavaq.formats.base import AtomicOutputDir
from llavaq.formats.sharding import GB
from llavaq.model.checkpoint import Checkpoint
from llavaq.model.llava import LlavaArch
from llavaq.progress import NullProgress, Progress
from llavaq.quant.state import check_float_linears, iter_quantized_tensors, resolve_float_linears, weight_grid_dtype
from llavaq.recipe import QuantRecipe, check_part_file_size, check_stream_memory_gb
from llavaq.safety import check_not_input


def open_model(model_path: str | Path, *, trust_remote_code: bool = False) -> LlavaArch:
    return LlavaArch(Checkpoint(model_path), trust_remote_code=trust_remote_code)


def model_for_recipe(arch: LlavaArch, recipe: QuantRecipe) -> LlavaArch:
    """The model the recipe calibrates and exports: ``arch`` itself, or its rotated view (``--rotation``)."""
    if recipe.rotation == "none":
        return arch
    from llavaq.model.rotated import rotated_arch

    return rotated_arch(arch, recipe.rotation_seed)


@dataclass
class CalibrationResult:
    cache: SessionCache
    num_samples: int
    images_summary: str
    reused: bool
    seconds: float
    forward_passes: int


@dataclass
class ExportResult:
    save_directory: Path
    format: str
    files: list[str]
    num_tensors: int
    bytes_written: int
    quantized: int
    float_modules: int
    derived: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: Linears kept in float beyond the module preset (--float_linears / --keep_float), with their error
    kept_float: dict[str, float | None] = field(default_factory=dict)
    #: --weight_method gptq: per Linear, relative output error on the calibration inputs, {"rtn": e, "gptq": e}
    gptq_error: dict[str, dict[str, float]] = field(default_factory=dict)


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
    budget = _stream_budget(stream_memory_gb)
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


def _stream_budget(stream_memory_gb: float | None) -> int | None:
    check_stream_memory_gb(stream_memory_gb)
    return None if stream_memory_gb is None else int(stream_memory_gb * GB)


def _float_dtype(name: str, fmt, checkpoint_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """``--float_dtype``; ``auto`` = what the format's consumer gets (msModelSlim: float32 unless on NPU)."""
    if name != "auto":
        return getattr(torch, name)
    kind = resolve_devices("auto")[0].type if device_type == "auto" else device_type  # export runs no kernel
    return fmt.default_float_dtype(checkpoint_dtype, kind)


def _scale_dtype(name: str, checkpoint_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The weight scales' dtype (the int8 grid): the same for every format (issue 30)."""
    kind = resolve_devices("auto")[0].type if device_type == "auto" else device_type
    return weight_grid_dtype(name, checkpoint_dtype, kind)


def export(
    model_path: str | Path,
    cache: str | Path | SessionCache,
    save_directory: str | Path,
    *,
    format: str = "msmodelslim",
    recipe: QuantRecipe | None = None,
    part_file_size: float | None = None,
    overwrite: bool = False,
    device_type: str = "cpu",
    trust_remote_code: bool = False,
    extra_record: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> ExportResult:
    """Write a quantized model from a session cache: no forward pass.

    ``recipe`` defaults to the cache's. A recipe whose calibration fields differ is *derived* from
    the cached float statistics (anti_outlier ``none`` or ``m1``, min-max ranges); anything else
    needs a new ``calibrate``. ``extra_record`` adds keys to ``llavaq_record.json``; ``extra_json``
    (file name -> object) adds JSON files to the output, written before it is moved into place.
    """
    t0 = time.perf_counter()
    fmt = get_format(format)
    check_part_file_size(part_file_size)
    cache = cache if isinstance(cache, SessionCache) else SessionCache.load(cache)
    inputs = [("model directory", model_path), ("session cache", cache.path)]
    AtomicOutputDir.check(Path(save_directory), overwrite, inputs)
    arch = open_model(model_path, trust_remote_code=trust_remote_code)
    ckpt = arch.ckpt
    cache.check_model(ckpt.fingerprint(), Path(model_path))  # the cheap first screen (sampled weights)
    if not cache.complete:
        raise CacheError(f"cache {cache.path} is incomplete (calibration was interrupted); run calibrate to resume")
    cached_recipe = QuantRecipe.from_dict(cache.manifest["recipe"])
    recipe = recipe or cached_recipe
    if recipe.weight_method == "gptq" and not cached_recipe.input_moments:
        raise CacheError(f"cache {cache.path} has no input moments, which --weight_method gptq needs (it was "
                         "calibrated for round-to-nearest weights); run calibrate with --weight_method gptq")
    # input moments are extra statistics: a cache that has them serves recipes that do not need them (and the
    # tokens they weigh are the cache's)
    recipe = recipe.replace(input_moments=cached_recipe.input_moments, gptq_tokens=cached_recipe.gptq_tokens)
    derived = recipe.calibration_dict() != cached_recipe.calibration_dict()
    if derived:
        if recipe.anti_outlier not in ("none", "m1") or recipe.modules != cached_recipe.modules or \
                (recipe.rotation, recipe.rotation_seed) != (cached_recipe.rotation, cached_recipe.rotation_seed):
            raise CacheError(
                f"recipe differs from the cache's ({_diff(recipe, cached_recipe)}) and only "
                "--anti_outlier none|m1 with the same module set and rotation can be derived without a forward "
                "pass; run calibrate with this recipe"
            )
    float_dtype = _float_dtype(recipe.float_dtype, fmt, arch.ckpt.torch_dtype, device_type)
    scale_dtype = _scale_dtype(recipe.float_dtype, arch.ckpt.torch_dtype, device_type)
    arch = model_for_recipe(arch, recipe)
    recipe.check_quantizes(len(arch.quantized_linears(recipe.modules, recipe.float_linears)))
    recipe, errors = resolve_float_linears(arch, cache, recipe, derive=derived, scale_dtype=scale_dtype)
    extra_record = {"cache": str(cache.path), "model_fingerprint": {**ckpt.fingerprint(), "weights_sha256": str(
        cache.manifest.get("weights_sha256"))}, **(extra_record or {})}
    if recipe.rotation != "none":
        extra_record["rotation"] = arch.ckpt.describe()
    if errors:
        extra_record["linear_errors"] = {n: errors[n] for n in recipe.float_linears if n in errors}
    gptq_report: dict[str, dict[str, float]] | None = None
    if recipe.weight_method == "gptq":
        gptq_report = {}
        extra_record["gptq"] = {"damp": recipe.gptq_damp, "block_size": recipe.gptq_block_size,
                                "act_order": recipe.gptq_act_order, "error": gptq_report}
    ctx = ExportContext(arch, recipe, Path(model_path), int(part_file_size * GB) if part_file_size else None,
                        device_type=device_type, derived=derived, float_dtype=float_dtype, scale_dtype=scale_dtype,
                        extra_record=extra_record, planned_stream="quantized")
    with AtomicOutputDir(Path(save_directory), overwrite, inputs) as tmp:
        gptq_device = resolve_devices(device_type)[0] if recipe.weight_method == "gptq" else None
        tensors = iter_quantized_tensors(arch, cache, recipe, derive=derived, float_dtype=ctx.float_dtype,
                                         scale_dtype=scale_dtype, gptq_report=gptq_report, gptq_device=gptq_device)
        info = fmt.write(tmp, tensors, ctx)
        cache.check_weights(ckpt.weights_sha256(), Path(model_path))  # every byte, hashed as it was read
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    out = Path(save_directory)
    files = sorted(p.name for p in out.iterdir())
    size = sum((out / f).stat().st_size for f in files)
    nq = len(arch.quantized_linears(recipe.modules, recipe.float_linears))
    return ExportResult(out, format, files, info.get("tensors", 0), size, nq, len(arch.linear_names) - nq,
                        derived, time.perf_counter() - t0, info,
                        {n: errors.get(n) for n in recipe.float_linears}, gptq_report or {})


def _diff(a: QuantRecipe, b: QuantRecipe) -> str:
    da, db = a.calibration_dict(), b.calibration_dict()
    keys = sorted(set(da) | set(db))
    return ", ".join(f"{k}: {db.get(k)!r} -> {da.get(k)!r}" for k in keys if da.get(k) != db.get(k))


def quantize(
    model_path: str | Path,
    calib_images: str | Path,
    save_directory: str | Path,
    recipe: QuantRecipe | None = None,
    *,
    format: str = "msmodelslim",
    part_file_size: float | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    device_type: str = "cpu",
    trust_remote_code: bool = False,
    progress: Progress | None = None,
    stream_memory_gb: float | None = None,
) -> tuple[CalibrationResult, ExportResult]:
    """calibrate (reusing a matching cache) + export."""
    check_part_file_size(part_file_size)
    _stream_budget(stream_memory_gb)
    get_format(format)
    AtomicOutputDir.check(Path(save_directory), overwrite, [
        ("model directory", model_path), ("calibration photo directory", calib_images),
        ("session cache directory", Path(cache_dir) if cache_dir else default_cache_dir())])
    if recipe is not None and (recipe.float_linears or recipe.keep_float):  # fail before the calibration
        arch = open_model(model_path, trust_remote_code=trust_remote_code)
        check_float_linears(arch, recipe.float_linears)
        recipe.check_quantizes(len(model_for_recipe(arch, recipe).quantized_linears(recipe.modules,
                                                                                    recipe.float_linears)))
    cal = calibrate(model_path, calib_images, recipe, cache_dir=cache_dir, device_type=device_type,
                    trust_remote_code=trust_remote_code, progress=progress, stream_memory_gb=stream_memory_gb)
    exp = export(model_path, cal.cache, save_directory, format=format, recipe=recipe,
                 part_file_size=part_file_size, overwrite=overwrite, device_type=device_type,
                 trust_remote_code=trust_remote_code)
    return cal, exp


def tune(model_path: str | Path, calib_images: str | Path, save_directory: str | Path, **options: Any):
    """``quantize --recipe auto``: the best W8A8 model meeting an accuracy target (:func:`llavaq.tuning.tune`)."""
    from llavaq.tuning import tune as _tune

    return _tune(model_path, calib_images, save_directory, **options)
