"""``llavaq calibrate`` (fill a session cache once) and ``llavaq export`` (write any format from it)."""

from __future__ import annotations

from pathlib import Path

import typer

from llavaq.cli import render
from llavaq.cli.app import err, out
from llavaq.cli.common import device_line, progress, show_calibration, show_export, show_summary
from llavaq.cli.options import (
    CacheDir,
    CalibImages,
    DeviceType,
    Format,
    ModelPath,
    Overwrite,
    PartFileSize,
    RecipeArgs,
    SaveDirectory,
    StreamMemory,
    TrustRemote,
    parse_bool,
    recipe_options,
)
from llavaq.recipe import QuantRecipe

Cache = typer.Option(..., "--cache", help="Session cache directory (printed by calibrate).")
ExportDevice = typer.Option("cpu", "--device_type", help="Target device: recorded in MindIE's quantization_config; "
                            "with --float_dtype auto, npu keeps the checkpoint dtype.")


@recipe_options("calibrate")
def calibrate(
    model_path: Path = ModelPath,
    calib_images: Path = CalibImages,
    cache_dir: Path = CacheDir,
    device_type: str = DeviceType,
    trust_remote_code: str = TrustRemote,
    recipe: RecipeArgs = ...,  # the recipe options, where --help lists them (options.recipe_options)
    stream_memory_gb: float = StreamMemory,
) -> None:
    """Run calibration once and store the session cache (resumes if interrupted)."""
    from llavaq import api  # torch

    q = recipe.recipe()
    device_line(device_type)
    with progress() as bars:
        cal = api.calibrate(model_path, calib_images, q, cache_dir=cache_dir, device_type=device_type,
                            trust_remote_code=parse_bool(trust_remote_code, "--trust_remote_code"), progress=bars,
                            stream_memory_gb=stream_memory_gb)
    show_calibration(cal)
    _range_drivers(cal.cache)
    out.print(str(cal.cache.path))


def _range_drivers(cache: object) -> None:
    """The one line on what set the calibrated activation ranges (nothing when the cache cannot tell)."""
    from llavaq.calib.coverage import range_drivers
    from llavaq.errors import CacheError

    try:
        summary = range_drivers(cache).summary
    except CacheError:
        return
    render.range_drivers_line(err, summary)


@recipe_options("export")
def export(
    model_path: Path = ModelPath,
    cache: Path = Cache,
    save_directory: Path = SaveDirectory,
    format: str = Format,
    part_file_size: float = PartFileSize,
    recipe: RecipeArgs = ...,  # the recipe options, where --help lists them (options.recipe_options)
    device_type: str = ExportDevice,
    trust_remote_code: str = TrustRemote,
    overwrite: bool = Overwrite,
) -> None:
    """Write any format from a session cache, with no forward pass."""
    from llavaq import api  # torch
    from llavaq.calib.cache import SessionCache

    sc = SessionCache.load(cache)
    changes = recipe.values()  # --anti_outlier, --smooth_stat, --smooth_vo left out: as calibrated
    if "anti_outlier" not in changes:  # --alpha goes with a derived --anti_outlier
        del changes["alpha"]
    q = QuantRecipe.from_dict(sc.manifest["recipe"]).replace(**changes)
    res = api.export(model_path, sc, save_directory, format=format, recipe=q, part_file_size=part_file_size,
                     overwrite=overwrite, device_type=device_type,
                     trust_remote_code=parse_bool(trust_remote_code, "--trust_remote_code"))
    show_export(res)
    show_summary(0.0, res)
