"""llavaq: W8A8 quantization of LLaVA vision-language models (msModelSlim-compatible, and better)."""

__version__ = "0.1.0"

from llavaq.errors import LlavaqError  # noqa: E402
from llavaq.recipe import QuantRecipe  # noqa: E402

__all__ = ["LlavaqError", "QuantRecipe", "__version__"]
