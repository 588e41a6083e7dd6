"""The quantized model as the ordered stream of tensors every format writes (``iter_quantized_tensors``), its
layout without values (``quantized_tensor_specs``), and the dequantized float stream (``iter_float_tensors``).

Every tensor is formed in float32 (:mod:`llavaq.quant.state` folds the smoothing and picks the codes); the one
rounding a format may add is the cast of a float tensor to its storage dtype, done here, once (issue 30).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llavaq.calib.cache import SessionCache
from llavaq.model.llava import EMBED, LM_HEAD, LlavaArch
from llavaq.quant.kernel import pack_deq_scale, quantize_linear
from llavaq.quant.state import FLOAT, GRID_DTYPE, W8A8, ModuleTensors, dequantized, iter_modules
from llavaq.quant.weight_only import dequantize_groups, quantize_groups, weight_only_grid, weight_only_specs
from llavaq.recipe import QuantRecipe

__all__ = ["holds_exactly", "iter_float_tensors", "iter_quantized_tensors", "quantized_tensor_specs",
           "storage_dtype", "weight_only_tensors"]


#: elements compared at a time by :func:`holds_exactly` (a 2.5 GB embedding table needs no float32 twin)
COMPARE_CHUNK = 1 << 22


def holds_exactly(t: torch.Tensor, dtype: torch.dtype, chunk: int = COMPARE_CHUNK) -> bool:
    """Whether every value of ``t`` survives a cast to ``dtype`` unchanged (compared a chunk at a time)."""
    if t.dtype == dtype:
        return True
    flat = t.reshape(-1)
    return all(torch.equal(flat[i:i + chunk].to(dtype).to(t.dtype), flat[i:i + chunk])
               for i in range(0, flat.numel(), chunk))


def storage_dtype(t: torch.Tensor, dtype: torch.dtype, exact: bool) -> torch.dtype:
    """The dtype a float tensor is stored in: ``dtype``, or with ``exact`` float32 where ``dtype`` cannot hold
    the float32 value exactly (a norm weight times its smoothing scale, a bias with a folded shift, a rotated
    table), so that only tensors the recipe left unchanged keep the checkpoint's lower precision (issue 30)."""
    if exact and t.dtype == torch.float32 and not holds_exactly(t, dtype):
        return torch.float32
    return dtype


def _handed_out(t: torch.Tensor, dtype: torch.dtype, fresh: bool, exact: bool = False) -> torch.Tensor:
    """``t`` in ``dtype`` (see :func:`storage_dtype`), contiguous, owned by the consumer: copied only if nothing
    else made it a new tensor (a 152000-entry Qwen2 embedding table is 2.5 GB in float32: no second copy of it)."""
    out = t.to(storage_dtype(t, dtype, exact)).contiguous()
    return out if fresh or out is not t else out.clone()


def weight_only_tensors(m: ModuleTensors, recipe: QuantRecipe, grid: torch.Tensor, out_dtype: torch.dtype,
                        report: dict[str, float] | None = None, exact: bool = False
                        ) -> Iterator[tuple[str, torch.Tensor, str]]:
    """msModelSlim's tensors of a weight-only Linear: weight (int8 codes [out, in], int4 unpacked as its MindIE
    ``safe_tensor`` save stores them), bias, weight_scale and weight_offset per group (``[out, G]``, ``grid`` dtype),
    tagged ``W8A16`` / ``W4A16``."""
    w, b = m.tensors[m.module + ".weight"], m.tensors.get(m.module + ".bias")
    ws, wo = weight_only_grid(w, recipe.w_bit, recipe.group_size, recipe.w_sym, grid)
    q = quantize_groups(w, ws.float(), wo.float(), recipe.w_bit) if m.codes is None else m.codes
    if report is not None:  # ‖W − Ŵ‖² / ‖W‖²
        report[m.module] = float((dequantize_groups(q, ws, wo) - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
    tag = recipe.quant_type
    yield m.module + ".weight", q.to(torch.int8).contiguous(), tag
    if b is not None:
        yield m.module + ".bias", b.to(storage_dtype(b, out_dtype, exact)), FLOAT
    yield m.module + ".weight_scale", ws, tag
    yield m.module + ".weight_offset", wo, tag


def iter_quantized_tensors(
    arch: LlavaArch,
    cache: SessionCache,
    recipe: QuantRecipe,
    *,
    derive: bool = False,
    float_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype | None = None,
    gptq_report: dict[str, dict[str, float]] | None = None,
    gptq_device: torch.device | None = None,
    weight_report: dict[str, float] | None = None,
    exact_floats: bool = False,
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(name, tensor, "W8A8"|"FLOAT")`` in msModelSlim's save order (``named_modules`` order); GPTQ
    runs on ``gptq_device`` (default the CPU); ``weight_report`` gets each weight-only Linear's relative weight error.

    Every tensor is formed in float32; weight scales (and the int8 codes on their grid) in ``scale_dtype``
    (default :data:`GRID_DTYPE`), the same for every format. The one rounding a format may add is the cast of
    a float tensor (norms, embeddings, float Linears, biases) to ``float_dtype`` (default: the checkpoint
    dtype), done once, here, on the float32 value. With ``exact_floats`` a float tensor that ``float_dtype`` cannot
    hold exactly (one the recipe changed: smoothed norms, biases with a folded shift, rotated tables) stays
    float32 instead (:func:`storage_dtype`): the HF formats' ``--float_dtype auto``.
    """
    out_dtype = float_dtype or arch.ckpt.torch_dtype
    grid = scale_dtype or GRID_DTYPE
    for m in iter_modules(arch, cache, recipe, derive=derive, scale_dtype=grid, gptq_report=gptq_report,
                          gptq_device=gptq_device):
        if m.act is not None and recipe.weight_only:
            yield from weight_only_tensors(m, recipe, grid, out_dtype, weight_report, exact_floats)
            continue
        if m.act is not None:
            w, b = m.tensors[m.module + ".weight"], m.tensors.get(m.module + ".bias")
            lq = quantize_linear(w, b, m.act.input_scale, m.act.input_offset, grid, m.codes)
            yield m.module + ".weight", lq.weight, W8A8
            if lq.bias is not None:
                yield m.module + ".bias", lq.bias.to(storage_dtype(lq.bias, out_dtype, exact_floats)), FLOAT
            yield m.module + ".weight_scale", lq.weight_scale, W8A8
            yield m.module + ".weight_offset", torch.zeros_like(lq.weight_scale), W8A8
            yield m.module + ".input_scale", lq.input_scale, W8A8
            yield m.module + ".input_offset", lq.input_offset, W8A8
            yield m.module + ".quant_bias", lq.quant_bias, W8A8
            yield m.module + ".deq_scale", pack_deq_scale(lq.deq_scale, arch.ckpt.torch_dtype), W8A8
            continue
        for name, t in m.tensors.items():
            yield name, _handed_out(t, out_dtype, m.fresh, exact_floats), FLOAT


def quantized_tensor_specs(
    arch: LlavaArch, recipe: QuantRecipe, *, float_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype | None = None,
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor :func:`iter_quantized_tensors` yields, in order, without values.

    Lets the streaming writer lay the safetensors file out before the first tensor is computed; the
    writer checks each arriving tensor against this plan.
    """
    ckpt = arch.ckpt
    out_dtype = float_dtype or ckpt.torch_dtype
    grid = scale_dtype or GRID_DTYPE
    quantized = set(arch.quantized_linears(recipe.modules, recipe.float_linears))
    deq_dtype = torch.float32 if ckpt.torch_dtype == torch.bfloat16 else torch.int64
    specs = []
    for module, _cls, params in arch.parameter_order(m2_wrapped=recipe.anti_outlier == "m2"):
        if module in quantized and recipe.weight_only:
            specs += weight_only_specs(module, ckpt.shape(module + ".weight"), "bias" in params, recipe.group_size,
                                       out_dtype, grid)
            continue
        if module in quantized:
            shape = ckpt.shape(module + ".weight")
            out = shape[0]
            specs.append((module + ".weight", torch.int8, shape))
            if "bias" in params:
                specs.append((module + ".bias", out_dtype, (out,)))
            specs += [
                (module + ".weight_scale", grid, (out, 1)),
                (module + ".weight_offset", grid, (out, 1)),
                (module + ".input_scale", torch.float32, (1,)),
                (module + ".input_offset", torch.float32, (1,)),
                (module + ".quant_bias", torch.int32, (out,)),
                (module + ".deq_scale", deq_dtype, (out,)),
            ]
            continue
        for p in params:
            name = f"{module}.{p}"
            src = EMBED if name == LM_HEAD and arch.tied_embeddings else name
            specs.append((name, out_dtype, ckpt.shape(src)))
    return specs


def iter_float_tensors(
    arch: LlavaArch,
    cache: SessionCache,
    recipe: QuantRecipe,
    *,
    dequantize: bool = True,
    derive: bool = False,
    float_dtype: torch.dtype | None = None,
    scale_dtype: torch.dtype | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float tensors with smoothing folded; quantized weights dequantized (``W_q·ws``, in float32 on
    the ``scale_dtype`` grid, then cast once to ``float_dtype``) if asked.

    With ``dequantize=False`` this is the smoothed float model, which must compute what the original
    does (smoothing is an exact re-parametrisation up to float rounding).
    """
    out_dtype = float_dtype or arch.ckpt.torch_dtype
    for m in iter_modules(arch, cache, recipe if dequantize else recipe.replace(weight_method="rtn"),
                          derive=derive, scale_dtype=scale_dtype or GRID_DTYPE):
        for name, t in m.tensors.items():
            if dequantize and m.act is not None and name == m.module + ".weight":
                t = dequantized(t, recipe, scale_dtype or GRID_DTYPE, m.codes)
            yield name, _handed_out(t, out_dtype, m.fresh)
