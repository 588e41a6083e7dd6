"""``fakequant``: a plain Hugging Face checkpoint of the quantized model's float equivalent.

Quantized Linears carry their dequantized weights ``W_q·ws`` (formed in float32 from the int8 codes and the
float32 weight scales every format shares, then cast once to the output's float dtype); smoothing is folded
into norms/weights/biases; everything else is the float model. ``LlavaForConditionalGeneration.from_pretrained(dir)``
loads it unmodified, which reproduces the quantized model's *weights*; the static activation quantization is
recorded so ``verify`` / ``inspect`` can re-apply it:

- ``llavaq_record.json`` → ``"activation_quant"``: ``{linear: {"input_scale": s, "input_offset": o}}``
  (exact float32 values as JSON numbers; ``x_q = clamp(round(x/s + o), −128, 127)``);
- ``llavaq_quant_params.st``: the same plus each Linear's ``weight_scale`` [out,1] (float32, as in every
  format) in safetensors layout, so readers recover ``W_q = round(W/ws)`` bit-exactly. The extension is not
  ``.safetensors`` on purpose: loaders that glob ``*.safetensors`` must not pick it up.

Weight-only recipes (W8A16 / W4A16): the weight is ``(W_q − weight_offset)·weight_scale`` per group, and
``llavaq_quant_params.st`` holds ``weight_scale`` and ``weight_offset`` ``[out, G]``; no activation parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llavaq.errors import OutputError
from llavaq.formats.base import (
    RECORD,
    ExportContext,
    OutputFormat,
    TensorStream,
    copy_model_files,
    register_format,
)
from llavaq.formats.hf import HF_PREFIX, output_dtype, write_hf_config, write_hf_safetensors
from llavaq.formats.msmodelslim import write_record
from llavaq.formats.names import to_internal
from llavaq.formats.reader import FLOATS, QuantizedLinearView, QuantizedModelView
from llavaq.formats.tensorfiles import TensorFiles
from llavaq.quant.weight_only import dequantize_groups, expand_groups

PARAMS_FILE = "llavaq_quant_params.st"
#: a Linear's scales and offsets, stored in ``PARAMS_FILE``
SCALE_PARAMS = ("weight_scale", "input_scale", "input_offset")


def dequantize_weight(w_q: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W_q·ws`` formed in float32, cast once to ``dtype`` (default: the scale's dtype)."""
    return (w_q.float() * weight_scale.float()).to(dtype or weight_scale.dtype)


class FakeQuantView(QuantizedModelView):
    """A fakequant output: ``W_q = round(W/ws)`` recovered from the dequantized weight and ``PARAMS_FILE``."""

    linear_params = ("weight",)
    required_params = ("weight",)

    def _open(self) -> tuple[TensorFiles, list[str]]:
        files = TensorFiles(self.path, HF_PREFIX, rename=to_internal)
        pf = self.path / PARAMS_FILE
        if not pf.is_file():
            raise OutputError(f"{pf} is missing: the fakequant output has no weight scales")
        try:
            self.params = load_file(str(pf))
        except Exception:
            raise OutputError(f"{pf}: corrupted safetensors file") from None
        return files, [n[: -len(".weight_scale")] for n in self.params if n.endswith(".weight_scale")]

    def _p(self, module: str, suffix: str) -> torch.Tensor:
        name = f"{module}.{suffix}"
        if suffix in ("weight", "bias"):
            return super()._p(module, suffix)
        if name not in self.params:
            raise OutputError(f"{self.path / PARAMS_FILE}: {name} is missing")
        return self.params[name]

    @property
    def weight_only(self) -> bool:
        return any(n.endswith(".weight_offset") for n in self.params)

    def _weight_only_linear(self, name: str) -> QuantizedLinearView:
        """W_q = round(W/s + o) per group, recovered from the stored (W_q − o)·s."""
        ws, wo = self._p(name, "weight_scale"), self._p(name, "weight_offset")
        w = self._p(name, "weight").float()
        bits = int(((self.record or {}).get("recipe") or {}).get("w_bit", 8))
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        cols = w.shape[1]
        q = torch.clamp(torch.round(w / expand_groups(ws.float(), cols) + expand_groups(wo.float(), cols)), lo, hi)
        return QuantizedLinearView(name, q.to(torch.int8), ws, torch.ones(1), torch.zeros(1), self._bias(name),
                                   ws[:, 0].float(), None, "none", weight_offset=wo, bits=bits)

    def linear(self, name: str) -> QuantizedLinearView:
        """W_q recovered from the stored W_q·ws (checked to round-trip exactly by :meth:`check`)."""
        if self.weight_only:
            return self._weight_only_linear(name)
        ws = self._p(name, "weight_scale")
        s = self._p(name, "input_scale").float().reshape(1)
        w = torch.clamp(torch.round(self._p(name, "weight").float() / ws.float()), -128, 127).to(torch.int8)
        o = self._p(name, "input_offset").float().reshape(1)
        deq = (s * ws.float()).squeeze(1).float()
        return QuantizedLinearView(name, w, ws, s, o, self._bias(name), deq, None)

    @property
    def activation_quant(self) -> dict:
        acts = (self.record or {}).get("activation_quant")
        return acts if isinstance(acts, dict) else {}

    def _check_layout(self) -> list[str]:
        acts = (self.record or {}).get("activation_quant")
        return [] if isinstance(acts, dict) else [f"{RECORD}: activation_quant is missing"]

    def _missing(self, m: str) -> str | None:
        missing = [s for s in self.required_params if f"{m}.{s}" not in self.files]
        missing += [s for s in (("weight_scale", "weight_offset") if self.weight_only else SCALE_PARAMS)
                    if f"{m}.{s}" not in self.params]
        if missing:
            return f"{m}.{missing[0]} is missing ({PARAMS_FILE if missing[0] != 'weight' else 'weights'})"
        return ""

    def _src(self, n: str) -> str:
        return f"{PARAMS_FILE}: {n}" if n in self.params else self._where(n)

    def _check_linear(self, m: str) -> list[str]:
        p = super()._check_linear(m)
        if self.weight_only:
            return p
        rec = self.activation_quant.get(m)
        lv_s, lv_o = self.params[f"{m}.input_scale"], self.params[f"{m}.input_offset"]
        if rec is None or rec.get("input_scale") != lv_s.item() or rec.get("input_offset") != lv_o.item():
            p.append(f"{RECORD}: activation_quant[{m}] does not match {PARAMS_FILE}")
        return p

    def _check_weight(self, p: list[str], m: str, lv: QuantizedLinearView) -> str | None:
        wn = f"{m}.weight"
        wd = self.files.tensor(wn)
        if wd.dtype not in FLOATS or wd.dim() != 2:
            return f"{self._where(wn)} must be a float matrix, is {wd.dtype} {list(wd.shape)}"
        if not torch.isfinite(wd).all():
            return f"{self._where(wn)} has NaN/Inf"
        if lv.activation == "none":
            if not torch.equal(dequantize_groups(lv.weight, lv.weight_scale, lv.weight_offset).to(wd.dtype), wd):
                p.append(f"{self._where(wn)} is not (W_q − weight_offset)·weight_scale for int{lv.bits} codes W_q")
            return None
        if not torch.equal(dequantize_weight(lv.weight, lv.weight_scale, wd.dtype), wd) or (
                wd.float() / lv.weight_scale.float()).abs().max() > 127.5:
            p.append(f"{self._where(wn)} is not W_q·weight_scale for an int8 W_q")
        return None

    def _check_input(self, p: list[str], m: str, lv: QuantizedLinearView, ok: bool) -> bool:
        if lv.activation == "none":
            return ok
        return self._check_static_input(p, m, self.params[f"{m}.input_scale"], self.params[f"{m}.input_offset"], ok)


@register_format("fakequant")
class FakeQuantFormat(OutputFormat):
    name = "fakequant"
    description = "plain HF checkpoint with dequantized weights (W_q·ws) + recorded activation quant params"
    view = FakeQuantView

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        qset = set(ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears))
        acts: dict[str, dict[str, float]] = {}
        params: dict[str, torch.Tensor] = {}
        dtype = output_dtype(ctx)

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
                elif suffix == "weight_scale" and ctx.recipe.weight_only:
                    params[name] = t.contiguous()
                elif suffix == "weight_offset" and ctx.recipe.weight_only:  # after its scale
                    params[name] = t.contiguous()
                    w = dequantize_groups(pending.pop(module), params[module + ".weight_scale"], t)
                    yield module + ".weight", w.to(dtype).contiguous()
                elif suffix == "weight_scale":
                    params[name] = t.contiguous()
                    yield module + ".weight", dequantize_weight(pending.pop(module), t, dtype).contiguous()
                elif suffix in ("input_scale", "input_offset"):
                    params[name] = t.float().reshape(1).contiguous()
                    acts.setdefault(module, {})[suffix] = float(t.float().reshape(1).item())

        weight_map = write_hf_safetensors(out_dir, convert(), ctx)
        save_file(params, str(out_dir / PARAMS_FILE), metadata={"format": "llavaq-quant-params"})
        write_hf_config(out_dir, ctx)
        copy_model_files(ctx.model_path, out_dir)
        write_record(out_dir, ctx, self.name, {
            "weights": (f"dequantized (W_q - weight_offset)*weight_scale ({ctx.recipe.quant_type}, group_size "
                        f"{ctx.recipe.group_size})" if ctx.recipe.weight_only else
                        "dequantized W_q*ws (int8 per-channel symmetric)") + "; scales in " + PARAMS_FILE,
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
