"""``llavaq inspect PATH``: audit a quantized output (any format) or a session cache.

Reports the model, recipe, quantized/float module lists and a per-Linear table (weight-scale range,
input scale/offset, clipping ratio when cache statistics are at hand), smoothing statistics and
outlier channels (cache), then runs the consistency checks of
:meth:`llavaq.formats.QuantizedModelView.check`. Exit code 0 when consistent, 1 with a
one-line ``error:`` naming the first problem tensor/file otherwise. ``--json`` prints only JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from llavaq.cache_stats import OUTLIER_FACTOR, cache_statistics, outlier_channels
from llavaq.errors import LlavaqError, OutputError
from llavaq.files import RECORD_FILE, TUNING_FILE
from llavaq.formats import get_format, read_quantized
from llavaq.model.families import TEXT_FAMILIES, VISION_FAMILIES

__all__ = ["OUTLIER_FACTOR", "architecture", "cache_statistics", "gptq_summary", "inspect_cache", "inspect_output",
           "inspect_path", "outlier_channels"]

RECORD_NAME = RECORD_FILE


def _f(x: Any) -> Any:
    """JSON-safe number: non-finite floats become strings ("nan", "inf")."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else [_f(v) for v in x.tolist()]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def gptq_summary(errors: dict[str, dict[str, float]]) -> str:
    """One line: how much GPTQ lowered the Linears' output error on the calibration inputs vs rounding to nearest."""
    ratios = sorted(e["gptq"] / e["rtn"] for e in errors.values() if e.get("rtn"))
    if not ratios:
        return "GPTQ (no Linear measured)"
    med = ratios[len(ratios) // 2]
    return (f"GPTQ: output error on the calibration inputs {(1 - med) * 100:.0f} % below round-to-nearest "
            f"(median of {len(ratios)} Linears; {(1 - ratios[-1]) * 100:.0f}–{(1 - ratios[0]) * 100:.0f} %)")


def architecture(config: dict[str, Any] | None) -> str | None:
    """"Mistral + CLIP" from a LLaVA config.json (None when it is not one llavaq describes)."""
    if not isinstance(config, dict):
        return None
    text = TEXT_FAMILIES.get((config.get("text_config") or {}).get("model_type", "llama"))
    vision = VISION_FAMILIES.get((config.get("vision_config") or {}).get("model_type", "clip_vision_model"))
    return f"{text.name} + {vision.name}" if text and vision else None


# ---------------------------------------------------------------------------------- reports
def inspect_output(path: Path) -> dict[str, Any]:
    """The report of a quantized output directory (any format): recipe, per-Linear table, problems."""
    view = read_quantized(path)
    rec = view.record or {}
    cache = rec.get("cache")
    stats = _record_cache_statistics(cache)
    gptq = rec.get("gptq") if isinstance(rec.get("gptq"), dict) else None
    gptq_errors = (gptq or {}).get("error") or {}
    wo_errors = (rec.get("weight_only") or {}).get("weight_error") or {} if isinstance(rec.get("weight_only"), dict) \
        else {}
    problems: list[str] = view.check() + _rotation_problems(view, rec)
    layers = []
    for name in view.quantized:
        try:
            lv = view.linear(name)
        except LlavaqError as e:
            if not problems:
                problems.append(e.message)
            continue
        cs = (stats or {}).get("linears", {}).get(name) if stats and not rec.get("derived_from_cache") else None
        layers.append(_layer_row(lv, gptq_errors.get(name), cs, wo_errors.get(name)))
    cfg = view.config or {}
    tuning = _tuning_table(path, problems)
    return {
        "kind": "output",
        "path": str(path),
        "format": view.format,
        "format_description": get_format(view.format).description,
        "written_by": _written_by(view, path),
        "model": rec.get("model_path") or cfg.get("_name_or_path") or "?",
        "architecture": architecture(cfg),
        "recipe": rec.get("recipe") or cfg.get("quantization_config"),
        "rotation": rec.get("rotation"),
        "derived_from_cache": rec.get("derived_from_cache"),
        "weight_method": (rec.get("recipe") or {}).get("weight_method", "rtn") if rec else None,
        "gptq": {k: v for k, v in gptq.items() if k != "error"} if gptq else None,
        "gptq_summary": gptq_summary(gptq_errors) if gptq_errors else None,
        "files": sorted(p.name for p in path.iterdir() if p.is_file()),
        "quantized": list(view.quantized),
        "float_modules": view.float_modules,
        "layers": layers,
        "smoothing": (stats or {}).get("groups", []),
        "cache": cache,
        "tuning": tuning,
        "problems": problems,
        "ok": not problems,
    }


def _record_cache_statistics(cache: str | None) -> dict[str, Any] | None:
    """The statistics of the cache an output's record points to, when it is still there and readable."""
    if not cache or not (Path(cache) / "manifest.json").is_file():
        return None
    try:
        return cache_statistics(Path(cache))
    except LlavaqError:
        return None


def _layer_row(lv: Any, err: dict[str, float] | None, cs: dict[str, Any] | None, weight_error: float | None = None
               ) -> dict[str, Any]:
    """One quantized Linear's row: scales, bits and group size, GPTQ error, weight-only weight error, and the
    cache's clipping ratio / outliers (``cs``)."""
    ws = lv.weight_scale.float()
    row = {"name": lv.name, "weight_scale_min": _f(float(ws.min())), "weight_scale_max": _f(float(ws.max())),
           "input_scale": _f(float(lv.input_scale.item())), "input_offset": _f(float(lv.input_offset.item())),
           "bits": lv.bits, "group_size": lv.group_size, "zero_point": lv.weight_offset is not None and bool(
               (lv.weight_offset != 0).any())}
    if weight_error is not None:
        row["weight_error"] = _f(weight_error)
    if err:
        row["weight_error_rtn"], row["weight_error_gptq"] = _f(err["rtn"]), _f(err["gptq"])
    if lv.activation != "static":  # per-token scales computed at run time, or float inputs (weight-only)
        row["input_scale"] = row["input_offset"] = "per-token" if lv.activation == "dynamic" else "float"
    row["activation"] = lv.activation
    if cs:
        if "clip_ratio" in cs:
            row["clip_ratio"] = _f(cs["clip_ratio"])
        if "outlier_channels" in cs:
            row["outlier_channels"] = cs["outlier_channels"]
    return row


def _written_by(view, path: Path) -> str:
    rec = view.record or {}
    if rec.get("version"):
        return "llavaq " + rec["version"]
    if view.format in ("msmodelslim", "mindie"):
        return "msModelSlim (no llavaq_record.json)"
    qc = (view.config or {}).get("quantization_config") or {}
    if (path / "recipe.yaml").is_file():
        return f"llm-compressor (recipe.yaml; compressed-tensors {qc.get('version', '?')}; no llavaq_record.json)"
    return "another tool (no llavaq_record.json)"


def _rotation_problems(view, rec: dict[str, Any]) -> list[str]:
    """A rotated output must load untied: its lm_head (E·diag(γ)·Q) is not its embedding (E·Q)."""
    if (rec.get("recipe") or {}).get("rotation", "none") == "none":
        return []
    cfg = view.config or {}
    problems = []
    for where, c in (("", cfg), ("text_config.", cfg.get("text_config") or {})):
        if c.get("tie_word_embeddings") is True:
            problems.append(f"config.json: {where}tie_word_embeddings is true in a rotated output (its lm_head "
                            "is not its embedding: loaders would tie them)")
    head = "language_model.lm_head.weight"
    if head not in view.float_names:
        problems.append(f"{RECORD_NAME}: rotated output without {head}")
    return problems


def _tuning_table(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """``llavaq_tuning.json`` (written by ``quantize --recipe auto``), if the output has one."""
    f = path / TUNING_FILE
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        problems.append(f"{f}: unreadable tuning table")
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list):
        problems.append(f"{f}: not a llavaq tuning table")
        return None
    return doc


def inspect_cache(path: Path) -> dict[str, Any]:
    stats = cache_statistics(path)
    man = stats["manifest"]
    layers = [{"name": n, **{k: _f(v) for k, v in d.items() if k not in ("stage",)}}
              for n, d in stats["linears"].items()]
    return {
        "kind": "cache",
        "path": str(path),
        "model": man.get("model_path"),
        "architecture": _model_architecture(man.get("model_path")),
        "fingerprint": man.get("fingerprint"),
        "calibration": man.get("calibration"),
        "recipe": man.get("recipe"),
        "complete": bool(man.get("complete")),
        "stages_done": man.get("stages_done", []),
        "forward_passes": man.get("forward_passes"),
        "quantized": [row["name"] for row in layers],
        "layers": layers,
        "smoothing": [{k: _f(v) for k, v in g.items()} for g in stats["groups"]],
        "input_moments": stats["input_moments"],
        "problems": stats["problems"],
        "ok": not stats["problems"],
    }


def _model_architecture(model_path: str | None) -> str | None:
    try:
        return architecture(json.loads((Path(model_path) / "config.json").read_text())) if model_path else None
    except (OSError, ValueError):
        return None


def inspect_path(path: str | Path) -> dict[str, Any]:
    """The report for an output directory (any format) or a session cache directory."""
    path = Path(path)
    if not path.exists():
        raise OutputError(f"{path} does not exist")
    if not path.is_dir():
        raise OutputError(f"{path} is a file; give an output directory or a session cache directory")
    if (path / "manifest.json").is_file():
        return inspect_cache(path)
    return inspect_output(path)
