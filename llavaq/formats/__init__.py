"""Output formats: one registered class per format that writes and reads it (:class:`OutputFormat`)."""

from llavaq.formats.base import FORMATS, ExportContext, OutputFormat, detect_format, get_format, register_format

# Importing the modules registers them.
from llavaq.formats import msmodelslim  # noqa: E402,F401  isort: skip
from llavaq.formats import compressed_tensors, fakequant  # noqa: E402,F401  isort: skip
from llavaq.formats.reader import QuantizedLinearView, QuantizedModelView, read_quantized  # noqa: E402  isort: skip

__all__ = ["FORMATS", "ExportContext", "OutputFormat", "QuantizedLinearView", "QuantizedModelView",
           "detect_format", "get_format", "read_quantized", "register_format"]
