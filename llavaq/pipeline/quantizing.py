"""``quantize``: calibrate (reusing a matching cache) and export, checking every argument first."""

from __future__ import annotations

from pathlib import Path

from llavaq.calib.cache import default_cache_dir
from llavaq.formats import get_format
from llavaq.formats.base import AtomicOutputDir
from llavaq.model.loading import model_for_recipe, open_model
from llavaq.pipeline.calibration import CalibrationResult, calibrate, stream_budget
from llavaq.pipeline.exporting import ExportResult, check_weight_only_shapes, export
from llavaq.progress import Progress
from llavaq.quant.float_linears import check_float_linears
from llavaq.recipe import QuantRecipe, check_part_file_size


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
    stream_budget(stream_memory_gb)
    get_format(format)
    AtomicOutputDir.check(Path(save_directory), overwrite, [
        ("model directory", model_path), ("calibration photo directory", calib_images),
        ("session cache directory", Path(cache_dir) if cache_dir else default_cache_dir())])
    if recipe is not None and (recipe.float_linears or recipe.keep_float or recipe.weight_only):  # fail before
        arch = open_model(model_path, trust_remote_code=trust_remote_code)  # the calibration
        check_float_linears(arch, recipe.float_linears)
        recipe.check_quantizes(len(model_for_recipe(arch, recipe).quantized_linears(recipe.modules,
                                                                                    recipe.float_linears)))
        check_weight_only_shapes(arch, recipe)
    cal = calibrate(model_path, calib_images, recipe, cache_dir=cache_dir, device_type=device_type,
                    trust_remote_code=trust_remote_code, progress=progress, stream_memory_gb=stream_memory_gb)
    exp = export(model_path, cal.cache, save_directory, format=format, recipe=recipe,
                 part_file_size=part_file_size, overwrite=overwrite, device_type=device_type,
                 trust_remote_code=trust_remote_code)
    return cal, exp
