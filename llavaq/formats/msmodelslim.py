"""msModelSlim's output formats: ``ascendV1`` (default) and ``safe_tensor`` (``--mindie_format``).

Files: ``quant_model_weight_w8a8.safetensors`` (or ``-0000i-of-0000N`` shards + index json),
``quant_model_description.json`` (``"version": "1.0.0"`` first) or, for MindIE,
``quant_model_description_w8a8.json`` plus ``quantize`` / ``vision_config.quantize`` /
``quantization_config`` edits in config.json; tokenizer/processor/generation files copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llavaq import __version__
from llavaq.files import RECORD_FILE
from llavaq.formats.base import ExportContext, TensorStream, copy_model_files, register_format, write_json
from llavaq.formats.sharding import TensorSpec, write_safetensors
from llavaq.quant.state import quantized_tensor_specs

WEIGHT_PREFIX = "quant_model_weight_w8a8"
RECORD = RECORD_FILE


def quantization_config(ctx: ExportContext) -> dict[str, Any]:
    r = ctx.recipe
    return {
        "group_size": 0,
        "act_method": r.act_method,
        "anti_method": r.anti_outlier if r.anti_outlier != "none" else "",
        "is_lowbit": False,
        "mm_tensor": False,
        "w_sym": True,
        "open_outlier": True,
        "is_dynamic": False,
        "w_bit": r.w_bit,
        "a_bit": r.a_bit,
        "dev_type": ctx.device_type,
    }


def write_record(out_dir: Path, ctx: ExportContext, fmt: str, extra: dict[str, Any] | None = None) -> None:
    """``llavaq_record.json``: tool, format, recipe, whether the params were derived, module lists."""
    rec = {
        "tool": "llavaq",
        "version": __version__,
        "format": fmt,
        "model_path": str(Path(ctx.model_path).resolve()),
        "recipe": ctx.recipe.to_dict(),
        "derived_from_cache": ctx.derived,
        **({"derivation": derivation_note(ctx.recipe)} if ctx.derived else {}),
        "float_dtype": str(ctx.float_dtype or ctx.arch.ckpt.torch_dtype).replace("torch.", ""),
        "quantized_modules": ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears),
        **ctx.extra_record,
        **(extra or {}),
    }
    write_json(out_dir / RECORD, rec)


def derivation_note(recipe) -> str:
    """How a derived export got its smoothing and activation ranges (no forward pass)."""
    smooth = (f"SmoothQuant (m1, alpha={recipe.alpha}) scales from the cached float per-channel min/max"
              if recipe.anti_outlier == "m1" else "no smoothing")
    return f"{smooth}; activation ranges = min-max of the cached float statistics; no forward pass"


class _MsModelSlimBase:
    name = "msmodelslim"
    description = "msModelSlim ascendV1: quant_model_weight_w8a8.safetensors + quant_model_description.json"
    mindie = False

    @staticmethod
    def default_float_dtype(checkpoint_dtype: torch.dtype, device_kind: str) -> torch.dtype:
        """As msModelSlim on that device: its CPU run loads the model in float32 (so float tensors and
        weight scales are written float32), its NPU run in the checkpoint dtype."""
        return checkpoint_dtype if device_kind == "npu" else torch.float32

    @property
    def description_file(self) -> str:
        return "quant_model_description_w8a8.json" if self.mindie else "quant_model_description.json"

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        desc: dict[str, str] = {} if self.mindie else {"version": "1.0.0"}
        desc["model_quant_type"] = "W8A8"

        def named():
            for name, t, tag in tensors:
                desc[name] = tag
                yield name, t

        specs = None
        if ctx.planned_stream == "quantized":  # the stream is iter_quantized_tensors: lay the file out up front
            specs = [TensorSpec(*s) for s in quantized_tensor_specs(ctx.arch, ctx.recipe, float_dtype=ctx.float_dtype)]
        weight_map = write_safetensors(out_dir, WEIGHT_PREFIX, named(), ctx.part_file_size, specs=specs)
        write_json(out_dir / self.description_file, desc)
        cfg = dict(ctx.arch.ckpt.config_dict)
        cfg["torch_dtype"] = str(ctx.arch.ckpt.torch_dtype).replace("torch.", "")
        if self.mindie:
            cfg["quantize"] = "w8a8"
            vc = dict(cfg.get("vision_config") or {})
            vc["quantize"] = "w8a8"
            cfg["vision_config"] = vc
            cfg["quantization_config"] = quantization_config(ctx)
        copy_model_files(ctx.model_path, out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=4, ensure_ascii=False))
        # msModelSlim writes its json files owner-only (0600) and weights read-only (0400).
        for f in out_dir.glob("*.json"):
            if f.name != RECORD:
                f.chmod(0o600)
        write_record(out_dir, ctx, self.name)
        return {"tensors": len(weight_map), "files": sorted(set(weight_map.values()))}

    def detect(self, path: Path) -> bool:
        return (path / self.description_file).is_file()


@register_format("msmodelslim")
class MsModelSlimFormat(_MsModelSlimBase):
    pass


@register_format("mindie")
class MindIEFormat(_MsModelSlimBase):
    description = "msModelSlim safe_tensor (MindIE): quant_model_description_w8a8.json + config.json quantize keys"
    mindie = True
