"""The library API: ``calibrate`` once, ``export`` many times, or ``quantize`` (both); ``tune`` (``--recipe
auto``) and ``verify``.

A thin, typed facade: the CLI and library users call these names; the work is done in
:mod:`llavaq.pipeline`, :mod:`llavaq.tuning` and :mod:`llavaq.verify`. Nothing in llavaq imports this module
but the CLI.
"""

from __future__ import annotations

from llavaq.model.loading import model_for_recipe, open_model
from llavaq.pipeline import CalibrationResult, ExportResult, calibrate, export, quantize
from llavaq.tuning import TuningResult, tune
from llavaq.verify import FidelityReport, verify

__all__ = [
    "CalibrationResult",
    "ExportResult",
    "FidelityReport",
    "TuningResult",
    "calibrate",
    "export",
    "model_for_recipe",
    "open_model",
    "quantize",
    "tune",
    "verify",
]
