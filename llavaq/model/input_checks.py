"""What a float model directory must be before anything is built from it (issue 24).

- :func:`weight_files`: exactly the files ``model.safetensors.index.json`` names, or the single
  ``model.safetensors``; any other ``*.safetensors`` is refused (it would silently override tensors).
- :func:`quantized_kind`: an already-quantized model (ours, msModelSlim's / MindIE's, compressed-tensors,
  llm-compressor's, fakequant, any ``quantization_config``) is named and refused as ``--model_path``.
- :func:`check_config`: layer counts, sizes and eps positive, finite and sane; text/vision configs present.
- :func:`check_layers`: the weights' layer indices agree with the config (no extra layer).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from llavaq.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_LAYERS = 1024
MAX_SIZE = 1 << 20
MAX_VOCAB = 1 << 24
_INT_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "image_size", "patch_size", "max_position_embeddings")
_EPS_KEYS = ("rms_norm_eps", "layer_norm_eps")
_LAYERS = {"text_config": re.compile(r"^language_model\.model\.layers\.(\d+)\."),
           "vision_config": re.compile(r"^vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")}
_QUANT_SUFFIXES = (".weight_scale", ".input_scale", ".deq_scale", ".quant_bias", ".weight_zero_point",
                   ".input_offset", ".weight_offset")


def weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files to read (and the index's tensor -> file map, if sharded); refuses stray files."""
    present = sorted(p.name for p in path.glob("*.safetensors"))
    index_file = path / INDEX
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ModelError(f"{index_file}: invalid JSON") from None
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise ModelError(f"{index_file}: no weight_map of tensor names to file names")
        named = sorted(set(wmap.values()))
        for f in named:
            if Path(f).name != f or f in (".", "..") or not f.endswith(".safetensors"):
                raise ModelError(f"{index_file}: weight_map names {f!r}, which is not a .safetensors file in "
                                 f"{path}; llavaq reads only files inside the model directory")
            if not (path / f).is_file():
                raise ModelError(f"{path / f} is missing (named by {INDEX})")
        stray = [f for f in present if f not in named]
        why = f"not named by {INDEX}"
    else:
        wmap, named = None, [SINGLE] if (path / SINGLE).is_file() else []
        stray = [f for f in present if f != SINGLE]
        why = f"a second weight file beside {SINGLE}" if named else f"no {SINGLE} and no {INDEX}"
        if not named and len(stray) > 1:
            why = f"several weight files but no {INDEX} to say which to read"
    if stray:
        raise ModelError(f"{path / stray[0]}: {why}; llavaq reads only the files the index names (or the single "
                         f"{SINGLE}): move {'it' if len(stray) == 1 else f'it and {len(stray) - 1} other(s)'} out "
                         "of the model directory")
    return [path / f for f in named], wmap


def quantized_kind(path: Path, config: dict[str, Any]) -> str | None:
    """What an already-quantized model directory is (``None`` for a float model)."""
    record = path / "llavaq_record.json"
    if record.is_file():
        try:
            fmt = json.loads(record.read_text()).get("format", "W8A8")
        except (OSError, ValueError, AttributeError):
            fmt = "W8A8"
        return f"a quantized llavaq output ({fmt} format, llavaq_record.json)"
    for qt in ("w8a8", "w8a16", "w4a16"):
        if (path / f"quant_model_description_{qt}.json").is_file():
            return f"a MindIE {qt.upper()} quantized model (quant_model_description_{qt}.json)"
    if (path / "quant_model_description.json").is_file():
        return "an msModelSlim quantized model (quant_model_description.json)"
    if (path / "llavaq_quant_params.st").is_file():
        return "a llavaq fakequant output (llavaq_quant_params.st)"
    qc = config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        tool = " (llm-compressor / compressed-tensors)" if method == "compressed-tensors" else ""
        return f"a quantized model: config.json has a quantization_config, quant_method {method!r}{tool}"
    if (path / "recipe.yaml").is_file():
        return "an llm-compressor output (recipe.yaml)"
    return None


def quantized_tensor(names: list[str], int_names: list[str]) -> str | None:
    """A tensor that only a quantized model has (a scale/offset next to a weight, or an int8 weight)."""
    for n in names:
        if n.endswith(_QUANT_SUFFIXES):
            return n
    return next((n for n in int_names if n.endswith(".weight")), None)


def _sane_int(cfg_path: Path, where: str, key: str, v: Any) -> None:
    limit = MAX_LAYERS if key == "num_hidden_layers" else MAX_VOCAB if key == "vocab_size" else \
        1 << 24 if key == "max_position_embeddings" else MAX_SIZE
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
        raise ModelError(f"{cfg_path}: {where}{key} is {v!r}; it must be an integer in [1, {limit}]")


def check_config(cfg_path: Path, cfg: dict[str, Any]) -> None:
    """Refuse (one line) a config whose numbers no real LLaVA has, before any model is built."""
    if cfg.get("model_type") != "llava":
        return  # not a LLaVA at all: the architecture check (model.llava) says what it is
    for sub in ("text_config", "vision_config"):
        if sub not in cfg:
            raise ModelError(f"{cfg_path}: no {sub}; a LLaVA config.json has text_config and vision_config")
        if not isinstance(cfg[sub], dict):
            raise ModelError(f"{cfg_path}: {sub} must be a JSON object")
    for where, d in (("", cfg), ("text_config.", cfg["text_config"]), ("vision_config.", cfg["vision_config"])):
        for key in _INT_KEYS:
            if key in d and d[key] is not None and not (where == "" and key != "num_hidden_layers"):
                _sane_int(cfg_path, where, key, d[key])
        for key in _EPS_KEYS:
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
                                  or not 0 < v < 1):
                raise ModelError(f"{cfg_path}: {where}{key} is {v!r}; it must be a number in (0, 1)")


def check_layers(cfg_path: Path, cfg: dict[str, Any], names: list[str]) -> None:
    """No layer in the weights beyond the config's ``num_hidden_layers`` (it would be silently ignored); a missing
    layer is named by the model's own missing-tensor check."""
    for sub, pattern in _LAYERS.items():
        n = cfg[sub].get("num_hidden_layers") if isinstance(cfg.get(sub), dict) else None
        found = {int(m.group(1)) for name in names if (m := pattern.match(name))}
        if not found or not isinstance(n, int):
            continue  # another layout (the architecture check names it) or the library default
        if max(found) >= n:
            raise ModelError(f"{cfg_path}: the weights have {sub.split('_')[0]} layer {max(found)}, but "
                             f"{sub}.num_hidden_layers is {n}; weights and config.json disagree")
