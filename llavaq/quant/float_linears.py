"""``--keep_float`` / ``--float_linears``: which Linears stay float, from their W8A8 error on the cached rows."""

from __future__ import annotations

import torch

from llavaq.algorithms.sensitivity import most_sensitive, w8a8_relative_error
from llavaq.calib.cache import SessionCache
from llavaq.errors import CacheError, LlavaqError
from llavaq.model.llava import LlavaArch
from llavaq.quant.state import GRID_DTYPE, apply_smoothing, gptq_stage, input_smoothing, plan_stage
from llavaq.recipe import QuantRecipe

__all__ = ["check_float_linears", "fused_groups", "fused_siblings", "linear_errors", "resolve_float_linears",
           "whole_fused_groups"]


def linear_errors(
    arch: LlavaArch, cache: SessionCache, recipe: QuantRecipe, *, derive: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """W8A8 relative output error of every Linear of the module preset, on the cached activation rows.

    One pass over the float weights, no forward pass (:mod:`llavaq.algorithms.sensitivity`); with
    ``weight_method="gptq"`` the Linears carry their GPTQ weights. Linears without cached rows (a cache made
    with ``activation_sample_tokens=0``) are left out.
    """
    ordered = arch.quantized_linears(recipe.modules)
    quantized = set(ordered)
    errors: dict[str, float] = {}
    for st in arch.stages():
        names = [n for n in ordered if st.owns(n)]
        if not names:
            continue
        record = cache.read_stage(st.name)
        weights = arch.stage_tensors(st)
        plan = plan_stage(arch, st, record, recipe, derive, quantized, weights)
        apply_smoothing(weights, plan)
        codes = gptq_stage(arch, st, record, plan, weights, names, recipe, scale_dtype or GRID_DTYPE) \
            if recipe.weight_method == "gptq" else {}
        rows_key = arch.shared_inputs(st)  # Linears that share an input share one copy of its rows
        smooth = input_smoothing(plan)
        for name in names:
            rows = record.get(f"float.{rows_key[name]}.rows")
            if rows is None or not rows.numel():
                continue
            scale, shift = smooth.get(name, (None, None))
            act = plan.acts[name]
            errors[name] = w8a8_relative_error(rows, weights[name + ".weight"], weights.get(name + ".bias"),
                                               act.input_scale, act.input_offset, scale, shift, codes.get(name))
    return errors


def check_float_linears(arch: LlavaArch, names: tuple[str, ...]) -> None:
    """One-line error for a ``--float_linears`` name that is not a Linear of the model."""
    unknown = [n for n in names if n not in arch.linear_names]
    if unknown:
        raise LlavaqError(f"--float_linears: no Linear named {unknown[0]!r} in this model "
                          f"(names look like {arch.linear_names[0]!r})")


def fused_groups(arch: LlavaArch) -> list[tuple[str, ...]]:
    """The Linears that read one input and that vLLM runs as one fused Linear (q/k/v -> ``qkv_proj``, gate/up ->
    ``gate_up_proj``; CLIP's and SigLIP's q/k/v too): one quantization scheme per group, or vLLM refuses the file."""
    return [g.linears for st in arch.stages() for g in arch.smooth_groups(st) if len(g.linears) > 1]


def whole_fused_groups(arch: LlavaArch, names: set[str]) -> list[str]:
    """The Linears to keep float beside ``names`` so that no fused group is split (in ``linear_names`` order)."""
    extra = {n for g in fused_groups(arch) if names & set(g) for n in g} - names
    return [n for n in arch.linear_names if n in extra]


def resolve_float_linears(
    arch: LlavaArch, cache: SessionCache, recipe: QuantRecipe, *, derive: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> tuple[QuantRecipe, dict[str, float]]:
    """The recipe with ``float_linears`` = the explicit names ∪ the ``keep_float`` most sensitive Linears, each
    with its whole fused group (:func:`fused_groups`: vLLM refuses a q/k/v or gate/up group of mixed
    schemes), in every format, so that every format of one recipe is one model.

    Idempotent (the top-N are chosen over the whole preset, so resolving twice adds nothing). Returns
    the measured errors too (empty when ``keep_float`` is 0).
    """
    check_float_linears(arch, recipe.float_linears)
    recipe.check_quantizes(len(arch.quantized_linears(recipe.modules, recipe.float_linears)))
    errors = linear_errors(arch, cache, recipe, derive=derive, scale_dtype=scale_dtype) if recipe.keep_float else {}
    if recipe.keep_float and not errors:
        raise CacheError("--keep_float needs the cached activation rows, and this cache has none "
                         "(calibrated with activation_sample_tokens=0)")
    picked = set(recipe.float_linears) | set(most_sensitive(errors, recipe.keep_float))
    keep = picked | set(whole_fused_groups(arch, picked))
    if keep == set(recipe.float_linears):
        return recipe, errors
    if keep >= set(arch.quantized_linears(recipe.modules)):
        raise LlavaqError("--float_linears / --keep_float keep every quantizable Linear in float once each is kept "
                          "with its fused group (q/k/v, gate/up): nothing would be quantized; keep fewer")
    return recipe.replace(float_linears=tuple(n for n in arch.linear_names if n in keep)), errors


def fused_siblings(arch: LlavaArch, recipe: QuantRecipe, errors: dict[str, float],
                   asked: tuple[str, ...] = ()) -> list[str]:
    """The Linears kept float only because a fused sibling of theirs was asked for (``asked``: the explicit
    ``--float_linears`` before resolution) or chosen by ``--keep_float``."""
    picked = set(asked) | set(most_sensitive(errors, recipe.keep_float) if recipe.keep_float else ())
    return whole_fused_groups(arch, picked)
