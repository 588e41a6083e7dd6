"""``export``: a quantized model written from a session cache, with no forward pass."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavaq.calib.cache import SessionCache
from llavaq.device import resolve_devices
from llavaq.errors import CacheError, LlavaqError
from llavaq.formats import ExportContext, get_format
from llavaq.formats.base import AtomicOutputDir, FormatWriter
from llavaq.formats.sharding import GB
from llavaq.model.llava import LlavaArch
from llavaq.model.loading import model_for_recipe, open_model
from llavaq.quant.float_linears import fused_siblings, resolve_float_linears
from llavaq.quant.state import weight_grid_dtype
from llavaq.quant.tensor_stream import iter_quantized_tensors
from llavaq.quant.weight_only import shape_problem
from llavaq.recipe import QuantRecipe, check_part_file_size

__all__ = ["ExportResult", "check_part_file_size", "check_weight_only_shapes", "export", "float_dtype_for",
           "recipe_diff", "scale_dtype_for"]


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
    #: Linears --keep_float kept float with a chosen one because vLLM fuses them (q/k/v, gate/up)
    fused_float: list[str] = field(default_factory=list)


def _device_kind(device_type: str) -> str:
    """The kind of device the output is for (``auto`` resolved); export itself runs no kernel."""
    return resolve_devices("auto")[0].type if device_type == "auto" else device_type


def float_dtype_for(name: str, fmt: FormatWriter, checkpoint_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """``--float_dtype``; ``auto`` = what the format's consumer gets (msModelSlim: float32 unless on NPU)."""
    if name != "auto":
        return getattr(torch, name)
    return fmt.default_float_dtype(checkpoint_dtype, _device_kind(device_type))


def scale_dtype_for(name: str, checkpoint_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The weight scales' dtype (the int8 grid): the same for every format (issue 30)."""
    return weight_grid_dtype(name, checkpoint_dtype, _device_kind(device_type))


def recipe_diff(a: QuantRecipe, b: QuantRecipe) -> str:
    """The calibration fields in which ``a`` differs from ``b``: ``field: b's -> a's, ...``."""
    da, db = a.calibration_dict(), b.calibration_dict()
    keys = sorted(set(da) | set(db))
    return ", ".join(f"{k}: {db.get(k)!r} -> {da.get(k)!r}" for k in keys if da.get(k) != db.get(k))


def export_recipe(cache: SessionCache, recipe: QuantRecipe | None) -> tuple[QuantRecipe, bool]:
    """The recipe an export of ``cache`` uses (default: the cache's) and whether it is derived from the cached
    float statistics; refuses one that needs another calibration."""
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
                f"recipe differs from the cache's ({recipe_diff(recipe, cached_recipe)}) and only "
                "--anti_outlier none|m1 with the same module set and rotation can be derived without a forward "
                "pass; run calibrate with this recipe"
            )
    return recipe, derived


def check_weight_only_shapes(arch: LlavaArch, recipe: QuantRecipe) -> None:
    """Refuse a weight-only recipe whose groups or int4 packing do not fit a quantized Linear (one line, naming it)."""
    if not recipe.weight_only:
        return
    for name in arch.quantized_linears(recipe.modules, recipe.float_linears):
        problem = shape_problem(recipe.w_bit, recipe.group_size, *arch.ckpt.shape(name + ".weight"))
        if problem:
            raise LlavaqError(f"{recipe.quant_type} cannot quantize {name}: {problem}; choose another --group_size "
                              "or keep it in float with --float_linears")


def _record(arch: LlavaArch, cache: SessionCache, recipe: QuantRecipe, errors: dict[str, float],
            extra_record: dict[str, Any] | None, fused: list[str]
            ) -> tuple[dict[str, Any], dict[str, dict[str, float]] | None]:
    """The keys the export adds to the record, and the GPTQ report it fills (None: round-to-nearest weights);
    a weight-only recipe's ``weight_only`` entry (bits, group size, symmetry, per-Linear weight error); the
    Linears kept float only for their fused group (``keep_float_fused``)."""
    extra_record = {"cache": str(cache.path), "model_fingerprint": {**arch.ckpt.fingerprint(), "weights_sha256": str(
        cache.manifest.get("weights_sha256"))}, **(extra_record or {})}
    if recipe.rotation != "none":
        extra_record["rotation"] = arch.ckpt.describe()
    if fused:
        extra_record["keep_float_fused"] = fused
    if errors:
        extra_record["linear_errors"] = {n: errors[n] for n in recipe.float_linears if n in errors}
    if recipe.weight_only:
        extra_record["weight_only"] = {"quant_type": recipe.quant_type, "w_bit": recipe.w_bit,
                                       "group_size": recipe.group_size, "w_sym": recipe.w_sym, "weight_error": {}}
    gptq_report: dict[str, dict[str, float]] | None = None
    if recipe.weight_method == "gptq":
        gptq_report = {}
        extra_record["gptq"] = {"damp": recipe.gptq_damp, "block_size": recipe.gptq_block_size,
                                "act_order": recipe.gptq_act_order, "error": gptq_report}
    return extra_record, gptq_report


def _open_for_cache(model_path: str | Path, cache: SessionCache, trust_remote_code: bool) -> LlavaArch:
    """The model, once the cache is known to be complete and of this model (sampled weights: the cheap screen)."""
    arch = open_model(model_path, trust_remote_code=trust_remote_code)
    cache.check_model(arch.ckpt.fingerprint(), Path(model_path))
    if not cache.complete:
        raise CacheError(f"cache {cache.path} is incomplete (calibration was interrupted); run calibrate to resume")
    return arch


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
    arch = _open_for_cache(model_path, cache, trust_remote_code)
    ckpt = arch.ckpt
    recipe, derived = export_recipe(cache, recipe)
    float_dtype = float_dtype_for(recipe.float_dtype, fmt, ckpt.torch_dtype, device_type)
    scale_dtype = scale_dtype_for(recipe.float_dtype, ckpt.torch_dtype, device_type)
    arch = model_for_recipe(arch, recipe)
    check_weight_only_shapes(arch, recipe)
    asked = recipe.float_linears
    recipe, errors = resolve_float_linears(arch, cache, recipe, derive=derived, scale_dtype=scale_dtype)
    fused = fused_siblings(arch, recipe, errors, asked)
    extra_record, gptq_report = _record(arch, cache, recipe, errors, extra_record, fused)
    ctx = ExportContext(arch, recipe, Path(model_path), int(part_file_size * GB) if part_file_size else None,
                        device_type=device_type, derived=derived, float_dtype=float_dtype, scale_dtype=scale_dtype,
                        extra_record=extra_record, planned_stream="quantized",
                        exact_floats=recipe.float_dtype == "auto" and fmt.exact_float_tensors)
    gptq_device = resolve_devices(device_type)[0] if recipe.weight_method == "gptq" else None
    with AtomicOutputDir(Path(save_directory), overwrite, inputs) as tmp:
        tensors = iter_quantized_tensors(arch, cache, recipe, derive=derived, float_dtype=ctx.float_dtype,
                                         scale_dtype=scale_dtype, gptq_report=gptq_report, gptq_device=gptq_device,
                                         weight_report=extra_record.get("weight_only", {}).get("weight_error"),
                                         exact_floats=ctx.exact_floats)
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
                        {n: errors.get(n) for n in recipe.float_linears}, gptq_report or {}, fused)
