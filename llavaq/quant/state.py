"""The quantized model, module by module (``iter_modules``), built from the float checkpoint + session cache
(:mod:`llavaq.quant.tensor_stream` turns it into the tensors the formats write).

No forward pass happens here: float weights are re-read from the checkpoint one layer at a time,
the cached smoothing is folded in with the same operations calibration used, and each quantized
Linear gets its int8 weight and integer-kernel parameters:

``W_q = clamp(round(W/ws), −127, 127)``, ``deq_scale = input_scale·ws``,
``quant_bias = round(b/deq_scale − input_offset·ΣW_q)``, so that
``y = deq_scale·(x_q·W_qᵀ + quant_bias)`` with ``x_q = clamp(round(x/input_scale + input_offset))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llavaq.algorithms.gptq import GPTQOptions, gptq_codes_shared, prepare_hessian, weighted_error
from llavaq.algorithms.hessian import InputMoments, smoothed_hessian
from llavaq.algorithms.smoothing import expand_heads, fold_pair, fold_scale, fold_shift
from llavaq.algorithms.smoothquant import smoothquant_group
from llavaq.calib.cache import SessionCache
from llavaq.errors import CacheError
from llavaq.model.llava import LM_HEAD, LlavaArch, SmoothGroup, Stage
from llavaq.quant.int8 import activation_qparams, quantize_weight, weight_qparams
from llavaq.quant.kernel import LinearQuant, pack_deq_scale, quantize_linear, unpack_deq_scale  # noqa: F401  re-exported
from llavaq.quant.weight_only import (
    code_range,
    dequantize_groups,
    quantize_groups,
    weight_only_grid,
)
from llavaq.recipe import QuantRecipe

W8A8, FLOAT = "W8A8", "FLOAT"  # (weight-only Linears are tagged with the recipe's quant_type: W8A16, W4A16)
#: the dtype of the weight scales (the int8 grid) when none is given: what every format's default export uses on a
#: CPU (:func:`weight_grid_dtype`)
GRID_DTYPE = torch.float32


def weight_grid_dtype(float_dtype: str, checkpoint_dtype: torch.dtype, device_kind: str) -> torch.dtype:
    """The dtype weight scales are formed and stored in, which fixes the int8 codes: the same for EVERY format.

    ``--float_dtype`` when given, else msModelSlim's on that device (its CPU run works in float32, its NPU run
    in the checkpoint dtype). Never the format's float dtype: a compressed-tensors file whose scales followed
    its float16 float tensors would carry other int8 codes than the msModelSlim file of the same recipe
    (issue 30); every format can carry float32 scales (vLLM and transformers upcast them).
    """
    if float_dtype != "auto":
        return getattr(torch, float_dtype)
    return checkpoint_dtype if device_kind == "npu" else GRID_DTYPE


@dataclass
class ActivationParams:
    input_scale: torch.Tensor
    input_offset: torch.Tensor
    derived: bool = False


@dataclass
class StagePlan:
    """The smoothing and activation parameters to apply to one stage."""

    #: the recipe's smoothing groups of the stage, in folding order (norm groups, then Linear -> Linear)
    groups: list[SmoothGroup] = field(default_factory=list)
    #: group name -> (scale, shift) per smoothing channel (a KV channel for GQA attention outputs)
    smooth: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    acts: dict[str, ActivationParams] = field(default_factory=dict)


def group_input_smoothing(g: SmoothGroup, scale: torch.Tensor, shift: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A group's (scale, shift) per input column of its Linears (GQA: repeated for every query head)."""
    if g.heads is None:
        return scale, shift
    return expand_heads(scale, g.heads), None if shift is None else expand_heads(shift, g.heads)


def plan_stage(
    arch: LlavaArch, stage: Stage, record: dict[str, torch.Tensor], recipe: QuantRecipe, derive: bool,
    quantized: set[str], weights: dict[str, torch.Tensor],
) -> StagePlan:
    """Smoothing + activation params for a stage: as calibrated, or derived from float statistics."""
    groups = arch.smoothing_groups(stage, recipe.modules, recipe.smooth_vo)
    plan = StagePlan(groups)
    if not derive:
        for g in groups:
            if f"smooth.{g.name}.scale" in record:
                plan.smooth[g.name] = (record[f"smooth.{g.name}.scale"], record.get(f"smooth.{g.name}.shift"))
        for name in quantized:
            if stage.owns(name):
                plan.acts[name] = ActivationParams(record[f"act.{name}.input_scale"],
                                                   record[f"act.{name}.input_offset"])
        return plan
    # derived: smoothing and min-max ranges from the cached float per-channel statistics
    group_of: dict[str, SmoothGroup] = {}
    for g in groups:
        for n in g.linears:
            group_of[n] = g
        if recipe.anti_outlier == "m1":
            key = g.linears[0]
            plan.smooth[g.name] = smoothquant_group(
                g, record[f"float.{key}.min"], record[f"float.{key}.max"],
                [weights[n + ".weight"] for n in g.linears], recipe.alpha, record.get(f"float.{key}.rows"),
                stat=recipe.smooth_stat,
            )
    for name in quantized:
        if not stage.owns(name):
            continue
        mn, mx = record[f"float.{name}.min"], record[f"float.{name}.max"]
        g = group_of.get(name)
        if g is not None and g.name in plan.smooth:
            scale, shift = group_input_smoothing(g, *plan.smooth[g.name])
            z = shift if shift is not None else torch.zeros_like(scale)
            lo, hi = ((mn - z) / scale).min(), ((mx - z) / scale).max()
        else:
            lo, hi = mn.min(), mx.max()
        s, o = activation_qparams(lo.reshape(1), hi.reshape(1))
        plan.acts[name] = ActivationParams(s, o, derived=True)
    return plan


def input_smoothing(plan: StagePlan) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Linear -> the (scale, shift) per input column its input is smoothed with under ``plan`` (Linears of
    smoothed groups only)."""
    out = {}
    for g in plan.groups:
        if g.name in plan.smooth:
            out.update({n: group_input_smoothing(g, *plan.smooth[g.name]) for n in g.linears})
    return out


def gptq_stage(
    arch: LlavaArch, stage: Stage, record: dict[str, torch.Tensor], plan: StagePlan,
    weights: dict[str, torch.Tensor], names: list[str], recipe: QuantRecipe, scale_dtype: torch.dtype,
    report: dict[str, dict[str, float]] | None = None, device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """GPTQ int8 codes of a stage's quantized Linears (smoothing already folded into ``weights``).

    Each input's Hessian is derived from the cached moments under the plan's smoothing and factorised once
    for the Linears that share it, which GPTQ then processes as one stacked matrix, on ``device`` (default
    the CPU). ``report`` gets each Linear's relative output error on the calibration inputs with
    round-to-nearest and with GPTQ (``tr(ΔW·H·ΔWᵀ)/tr(W·H·Wᵀ)``).
    """
    options = GPTQOptions(recipe.gptq_damp, recipe.gptq_block_size, recipe.gptq_act_order)
    shared = arch.shared_inputs(stage)
    smoothing = input_smoothing(plan)
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(shared[name], []).append(name)
    hessians, codes, scales = {}, {}, {}
    for key, group in groups.items():
        parts = [record.get(f"hess.{key}.{k}") for k in ("n", "mean", "cov")]
        if any(t is None for t in parts):
            raise CacheError(f"the session cache has no input moments for {key}; calibrate with "
                             "--weight_method gptq to record them")
        scale, shift = smoothing.get(group[0], (None, None))
        hessians[key] = h = smoothed_hessian(InputMoments.from_tensors(*parts), scale, shift)
        ws = [weights[n + ".weight"] for n in group]
        scales.update({n: weight_grid(w, recipe, scale_dtype) for n, w in zip(group, ws, strict=True)})
        offsets = [scales[n][1] for n in group] if recipe.weight_only and not recipe.w_sym else None
        got = gptq_codes_shared(ws, [scales[n][0] for n in group], prepare_hessian(h, options, device=device),
                                options, offsets, code_range(recipe.w_bit) if recipe.weight_only else (-127, 127))
        codes.update(zip(group, got, strict=True))
    for name in names if report is not None else ():
        w, h = weights[name + ".weight"], hessians[shared[name]]
        report[name] = {"rtn": weighted_error(w, dequantized(w, recipe, scale_dtype), h),
                        "gptq": weighted_error(w, dequantized(w, recipe, scale_dtype, codes[name]), h)}
    return {n: codes[n] for n in names}


def weight_grid(w: torch.Tensor, recipe: QuantRecipe, scale_dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A quantized Linear's weight grid in float32: W8A8's per-row ``absmax/127`` (offset None) or the recipe's
    weight-only (scale, offset) per group, both on ``scale_dtype`` values."""
    if not recipe.weight_only:
        return weight_qparams(w).to(scale_dtype).float(), None
    ws, wo = weight_only_grid(w, recipe.w_bit, recipe.group_size, recipe.w_sym, scale_dtype)
    return ws.float(), wo.float()


def dequantized(w: torch.Tensor, recipe: QuantRecipe, scale_dtype: torch.dtype, codes: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The float32 weight the exported codes stand for: round-to-nearest, or the given ``codes``, on the grid."""
    ws, wo = weight_grid(w, recipe, scale_dtype)
    if wo is None:
        return (quantize_weight(w, ws) if codes is None else codes).float() * ws
    return dequantize_groups(quantize_groups(w, ws, wo, recipe.w_bit) if codes is None else codes, ws, wo)


def apply_smoothing(weights: dict[str, torch.Tensor], plan: StagePlan) -> None:
    """Fold the plan's smoothing into a stage's float tensors, in calibration's operation order."""
    for g in plan.groups:
        if g.name not in plan.smooth:
            continue
        scale, shift = plan.smooth[g.name]
        if g.from_linear:
            dst = g.linears[0]
            fold_pair(weights[g.norm + ".weight"], weights.get(g.norm + ".bias"), weights[dst + ".weight"],
                      weights.get(dst + ".bias"), scale, shift, g.heads)
            continue
        ws = [weights[n + ".weight"] for n in g.linears]
        if shift is not None:
            fold_shift(ws, [weights.get(n + ".bias") for n in g.linears], shift)
        fold_scale(weights[g.norm + ".weight"], weights.get(g.norm + ".bias") if g.shift else None, ws, scale, shift)


@dataclass
class ModuleTensors:
    """One module's parameters, smoothing folded, with its activation params if it is quantized."""

    module: str
    params: list[str]
    tensors: dict[str, torch.Tensor]  # full parameter name -> float32 tensor
    act: ActivationParams | None
    codes: torch.Tensor | None = None  # int8 weight codes chosen by GPTQ (None: round to nearest)
    #: the tensors were read for this module alone (not a stage's shared weights): handed out without a copy
    fresh: bool = False


def iter_modules(
    arch: LlavaArch, cache: SessionCache, recipe: QuantRecipe, *, derive: bool = False,
    scale_dtype: torch.dtype | None = None, gptq_report: dict[str, dict[str, float]] | None = None,
    gptq_device: torch.device | None = None,
) -> Iterator[ModuleTensors]:
    """Walk modules in ``named_modules`` order, re-reading each layer once and folding its smoothing.

    With ``recipe.weight_method == "gptq"`` each quantized Linear also gets its GPTQ codes on the grid of
    ``scale_dtype`` weight scales (default :data:`GRID_DTYPE`).
    """
    ckpt = arch.ckpt
    quantized = set(arch.quantized_linears(recipe.modules, recipe.float_linears))
    stages = arch.stages()
    cur_stage: Stage | None = None
    weights: dict[str, torch.Tensor] = {}
    plan = StagePlan()
    codes: dict[str, torch.Tensor] = {}
    for module, _cls, params in arch.parameter_order(m2_wrapped=recipe.anti_outlier == "m2"):
        st = next((s for s in stages if s.owns(module)), None)
        if st is not None and st is not cur_stage:
            weights = arch.stage_tensors(st)
            record = cache.read_stage(st.name)
            plan = plan_stage(arch, st, record, recipe, derive, quantized, weights)
            apply_smoothing(weights, plan)
            names = [n for n in arch.linear_names if n in quantized and st.owns(n)]
            codes = gptq_stage(arch, st, record, plan, weights, names, recipe, scale_dtype or GRID_DTYPE,
                               gptq_report, gptq_device) if recipe.weight_method == "gptq" and names else {}
            cur_stage = st
        tensors = {}
        for p in params:
            name = f"{module}.{p}"
            if st is not None:
                tensors[name] = weights[name]
            elif name == LM_HEAD and arch.tied_embeddings:
                tensors[name] = arch.lm_head_weight()
            else:
                tensors[name] = ckpt.tensor(name)
        yield ModuleTensors(module, params, tensors, plan.acts.get(module) if module in quantized else None,
                            codes.get(module), fresh=st is None)
