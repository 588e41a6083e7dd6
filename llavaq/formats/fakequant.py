"""``fakequant``: a plain Hugging Face checkpoint of the quantized model's float equivalent.

Quantized Linears carry their dequantized weights ``W_q·ws`` (computed exactly in float32, then
stored in the model dtype); smoothing is folded into norms/weights/biases; everything else is the
float model. ``LlavaForConditionalGeneration.from_pretrained(dir)`` loads it unmodified, which
reproduces the quantized model's *weights*; the static activation quantization is recorded so
``verify`` / ``inspect`` can re-apply it:

- ``llavaq_record.json`` → ``"activation_quant"``: ``{linear: {"input_scale": s, "input_offset": o}}``
  (exact float32 values as JSON numbers; ``x_q = clamp(round(x/s + o), −128, 127)``);
- ``llavaq_quant_params.st``: the same plus each Linear's ``weight_scale`` [out,1] in safetensors
  layout, so readers recover ``W_q = round(W/ws)`` bit-exactly. The extension is not
  ``.safetensors`` on purpose: loaders that glob ``*.safetensors`` must not pick it up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llavaq.formats.base import ExportContext, TensorStream, checkpoint_float_dtype, copy_model_files, register_format
from llavaq.formats.hf import write_hf_config, write_hf_safetensors
from llavaq.formats.msmodelslim import RECORD, write_record

PARAMS_FILE = "llavaq_quant_params.st"


def dequantize_weight(w_q: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``W_q·ws`` (exact in float32: 8-bit × ≤24-bit mantissas), cast to the scale's dtype."""
    return (w_q.float() * weight_scale.float()).to(weight_scale.dtype)


@register_format("fakequant")
class FakeQuantFormat:
    name = "fakequant"
    description = "plain HF checkpoint with dequantized weights (W_q·ws) + recorded activation quant params"
    default_float_dtype = staticmethod(checkpoint_float_dtype)

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        qset = set(ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears))
        acts: dict[str, dict[str, float]] = {}
        params: dict[str, torch.Tensor] = {}

        def convert():
            pending: dict[str, torch.Tensor] = {}
            for name, t, _tag in tensors:
                module, _, suffix = name.rpartition(".")
                if module not in qset:
                    yield name, t
                elif suffix == "weight":
                    pending[module] = t
                elif suffix == "bias":
                    yield name, t
                elif suffix == "weight_scale":
                    params[name] = t.contiguous()
                    yield module + ".weight", dequantize_weight(pending.pop(module), t).contiguous()
                elif suffix in ("input_scale", "input_offset"):
                    params[name] = t.float().reshape(1).contiguous()
                    acts.setdefault(module, {})[suffix] = float(t.float().reshape(1).item())

        weight_map = write_hf_safetensors(out_dir, convert(), ctx)
        save_file(params, str(out_dir / PARAMS_FILE), metadata={"format": "llavaq-quant-params"})
        write_hf_config(out_dir, ctx)
        copy_model_files(ctx.model_path, out_dir)
        write_record(out_dir, ctx, self.name, {
            "weights": "dequantized W_q*ws (int8 per-channel symmetric); scales in " + PARAMS_FILE,
            "activation_quant": acts,
        })
        return {"tensors": len(weight_map), "files": sorted(set(weight_map.values()))}

    def detect(self, path: Path) -> bool:
        if (path / PARAMS_FILE).is_file():
            return True
        try:
            return json.loads((path / RECORD).read_text()).get("format") == self.name
        except (OSError, ValueError, AttributeError):
            return False
