"""Opening a model directory, and the model a recipe works on (the model itself or its rotated view)."""

from __future__ import annotations

from pathlib import Path

from llavaq.model.checkpoint import Checkpoint
from llavaq.model.llava import LlavaArch
from llavaq.model.rotated import rotated_arch
from llavaq.recipe import QuantRecipe


def open_model(model_path: str | Path, *, trust_remote_code: bool = False) -> LlavaArch:
    """A LLaVA checkpoint directory, validated (one-line errors for bad model directories)."""
    return LlavaArch(Checkpoint(model_path), trust_remote_code=trust_remote_code)


def model_for_recipe(arch: LlavaArch, recipe: QuantRecipe) -> LlavaArch:
    """The model the recipe calibrates and exports: ``arch`` itself, or its rotated view (``--rotation``)."""
    if recipe.rotation == "none":
        return arch
    return rotated_arch(arch, recipe.rotation_seed)
