"""Output formats: one module per format, each a writer (and reader) registered by name."""

from llavaq.formats.base import FORMATS, ExportContext, detect_format, get_format, register_format

# Importing the modules registers them.
from llavaq.formats import msmodelslim  # noqa: E402,F401  isort: skip
from llavaq.formats import compressed_tensors, fakequant  # noqa: E402,F401  isort: skip

__all__ = ["FORMATS", "ExportContext", "detect_format", "get_format", "register_format"]
