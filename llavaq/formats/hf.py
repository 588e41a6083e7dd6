"""Shared pieces of the Hugging Face-style outputs (``compressed-tensors``, ``fakequant``).

Weights go to ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` +
``model.safetensors.index.json`` (the same shard rule as msModelSlim's writer), with the
``{"format": "pt"}`` safetensors metadata transformers requires; ``config.json`` is the original
one with ``torch_dtype`` set to the dtype of the float tensors written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from llavaq.formats.base import ExportContext
from llavaq.formats.sharding import write_safetensors

HF_PREFIX = "model"
HF_INDEX = "model.safetensors.index.json"
HF_METADATA = {"format": "pt"}


def output_dtype(ctx: ExportContext) -> torch.dtype:
    return ctx.float_dtype or ctx.arch.ckpt.torch_dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_hf_safetensors(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], ctx: ExportContext
                         ) -> dict[str, str]:
    return write_safetensors(out_dir, HF_PREFIX, tensors, ctx.part_file_size, index_name=HF_INDEX,
                             metadata=HF_METADATA, read_only=False)


def write_hf_config(out_dir: Path, ctx: ExportContext, quantization_config: dict[str, Any] | None = None) -> None:
    cfg = dict(ctx.arch.ckpt.config_dict)
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = dtype_name(output_dtype(ctx))
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
