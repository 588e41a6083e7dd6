"""The layer families llavaq knows, keyed by the config's ``model_type``.

Adding a family is one description module (see :mod:`llavaq.model.families.base`) registered here;
:class:`llavaq.model.llava.LlavaArch` picks the language model's and the vision tower's description
from ``text_config.model_type`` and ``vision_config.model_type``.
"""

from __future__ import annotations

from llavaq.model.families.base import DecoderFamily, EncoderFamily, Heads, LayerFamily, LayerRoles
from llavaq.model.families.clip import CLIP
from llavaq.model.families.llama import LLAMA
from llavaq.model.families.mistral import MISTRAL
from llavaq.model.families.qwen2 import QWEN2
from llavaq.model.families.siglip import SIGLIP

__all__ = ["DecoderFamily", "EncoderFamily", "Heads", "LayerFamily", "LayerRoles", "TEXT_FAMILIES",
           "VISION_FAMILIES", "register"]

TEXT_FAMILIES: dict[str, DecoderFamily] = {}
VISION_FAMILIES: dict[str, EncoderFamily] = {}


def register(family: LayerFamily) -> LayerFamily:
    """Make ``family`` available to :class:`~llavaq.model.llava.LlavaArch` under its ``model_type``."""
    table = TEXT_FAMILIES if isinstance(family, DecoderFamily) else VISION_FAMILIES
    table[family.model_type] = family
    return family


for _family in (LLAMA, MISTRAL, QWEN2, CLIP, SIGLIP):
    register(_family)
