"""``compressed-tensors`` (vLLM's int8 W8A8 static format), written from the msModelSlim tensor stream.

Per quantized Linear ``L`` (HF names, e.g. ``language_model.model.layers.0.self_attn.q_proj``):

=========================  =====================  ==========================================
tensor                     dtype / shape           value
=========================  =====================  ==========================================
``L.weight``               int8 [out, in]          ``W_q`` (same as msModelSlim's)
``L.weight_scale``         model dtype [out, 1]    ``ws`` (per-channel, symmetric: no zero point)
``L.input_scale``          float32 [1]             msModelSlim's ``input_scale``
``L.input_zero_point``     int8 [1]                msModelSlim's ``input_offset`` (integer-valued)
``L.bias`` (if any)        model dtype [out]       float bias, smoothing shift folded in
=========================  =====================  ==========================================

compressed-tensors quantizes ``q = clamp(round(x/scale + zp), −128, 127)`` and dequantizes
``(q − zp)·scale``; msModelSlim's ``x_q = clamp(round(x/input_scale + input_offset))`` is the same
expression, so ``zp = input_offset`` exactly. ``input_scale`` stays float32 (vLLM's parameter is
float32; rounding it to fp16 would move the quantization grid). ``weight_offset``, ``quant_bias`` and
``deq_scale`` are msModelSlim kernel parameters and are not written (the library drops all-zero zero
points of symmetric weights itself). Every other tensor is the float model's (smoothing folded).
``config.json`` gets a ``quantization_config`` that ``compressed_tensors.QuantizationConfig`` parses
(the library's own ``model_dump`` of it); float Linears are listed in ``ignore``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llavaq.errors import OutputError
from llavaq.formats.base import ExportContext, TensorStream, checkpoint_float_dtype, copy_model_files, register_format
from llavaq.formats.hf import HF_INDEX, write_hf_config, write_hf_safetensors
from llavaq.formats.msmodelslim import write_record

DROPPED = ("weight_offset", "quant_bias", "deq_scale")


def _args(symmetric: bool, strategy: str) -> dict[str, Any]:
    # Every field of compressed_tensors 0.8.1 QuantizationArgs.model_dump(), in its order.
    return {"num_bits": 8, "type": "int", "symmetric": symmetric, "group_size": None, "strategy": strategy,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def compressed_tensors_config(quantized: list[str], float_linears: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` we emit: int8 W8A8 static, channel-wise weights, per-tensor inputs."""
    del quantized  # targets are by class ("Linear"); float Linears are excluded through ``ignore``
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _args(True, "channel"),
                "input_activations": _args(False, "tensor"),
                "output_activations": None,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": "int-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(float_linears),
    }


@register_format("compressed-tensors")
class CompressedTensorsFormat:
    name = "compressed-tensors"
    description = "compressed-tensors int-quantized W8A8 static (vLLM): model.safetensors + quantization_config"
    default_float_dtype = staticmethod(checkpoint_float_dtype)

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        quantized = ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears)
        qset = set(quantized)

        def convert():
            for name, t, _tag in tensors:
                module, _, suffix = name.rpartition(".")
                if module not in qset:
                    yield name, t
                elif suffix in DROPPED:
                    continue
                elif suffix == "input_offset":
                    zp = t.float().reshape(1)
                    if not (torch.equal(zp, zp.round()) and -128 <= zp.item() <= 127):
                        raise OutputError(f"{name} = {zp.item()} is not an int8 zero point")
                    yield module + ".input_zero_point", zp.to(torch.int8)
                elif suffix == "input_scale":
                    yield name, t.float().reshape(1)
                else:
                    yield name, t

        weight_map = write_hf_safetensors(out_dir, convert(), ctx)
        float_linears = [n for n in ctx.arch.linear_names if n not in qset]
        write_hf_config(out_dir, ctx, compressed_tensors_config(quantized, float_linears))
        copy_model_files(ctx.model_path, out_dir)
        write_record(out_dir, ctx, self.name)
        return {"tensors": len(weight_map), "files": sorted(set(weight_map.values()))}

    def detect(self, path: Path) -> bool:
        cfg = _read_config(path)
        qc = cfg.get("quantization_config") if cfg else None
        return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" and (
            (path / "model.safetensors").is_file() or (path / HF_INDEX).is_file())


def _read_config(path: Path) -> dict | None:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None
