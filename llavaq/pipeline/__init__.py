"""The quantization pipeline: ``calibrate`` once into a session cache, ``export`` many times, or ``quantize``.

Modules by step: :mod:`~llavaq.pipeline.calibration`, :mod:`~llavaq.pipeline.exporting`,
:mod:`~llavaq.pipeline.quantizing`; opening a model is :mod:`llavaq.model.loading`.
"""

from llavaq.model.loading import model_for_recipe, open_model
from llavaq.pipeline.calibration import CalibrationResult, calibrate, stream_budget
from llavaq.pipeline.exporting import ExportResult, export, float_dtype_for, recipe_diff
from llavaq.pipeline.quantizing import quantize

__all__ = ["CalibrationResult", "ExportResult", "calibrate", "export", "float_dtype_for", "model_for_recipe",
           "open_model", "quantize", "recipe_diff", "stream_budget"]
