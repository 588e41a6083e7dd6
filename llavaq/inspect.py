"""``llavaq inspect PATH``: audit a quantized output (any format) or a session cache.

Reports the model, recipe, quantized/float module lists and a per-Linear table (weight-scale range,
input scale/offset, clipping ratio when cache statistics are at hand), smoothing statistics and
outlier channels (cache), then runs the consistency checks of
:meth:`llavaq.formats.reader.QuantizedModelView.check`. Exit code 0 when consistent, 1 with a
one-line ``error:`` naming the first problem tensor/file otherwise. ``--json`` prints only JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from llavaq.calib.cache import SessionCache
from llavaq.errors import LlavaqError, OutputError
from llavaq.files import RECORD_FILE, TUNING_FILE
from llavaq.formats import get_format
from llavaq.formats.reader import read_quantized
from llavaq.model.families import TEXT_FAMILIES, VISION_FAMILIES
from llavaq.model.loading import open_model
from llavaq.tuning import tuning_table

RECORD_NAME = RECORD_FILE
OUTLIER_FACTOR = 6.0  # a channel is an outlier when its float |x|max exceeds 6× the median channel's


def _f(x: Any) -> Any:
    """JSON-safe number: non-finite floats become strings ("nan", "inf")."""
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else [_f(v) for v in x.tolist()]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def outlier_channels(mn: torch.Tensor, mx: torch.Tensor, factor: float = OUTLIER_FACTOR) -> list[int]:
    """Channels whose float absmax exceeds ``factor`` × the median channel absmax."""
    amax = torch.maximum(mn.abs(), mx.abs()).float()
    med = amax.median()
    return [int(i) for i in (amax > factor * med).nonzero().flatten()] if med > 0 else []


def gptq_summary(errors: dict[str, dict[str, float]]) -> str:
    """One line: how much GPTQ lowered the Linears' output error on the calibration inputs vs rounding to nearest."""
    ratios = sorted(e["gptq"] / e["rtn"] for e in errors.values() if e.get("rtn"))
    if not ratios:
        return "GPTQ (no Linear measured)"
    med = ratios[len(ratios) // 2]
    return (f"GPTQ: output error on the calibration inputs {(1 - med) * 100:.0f} % below round-to-nearest "
            f"(median of {len(ratios)} Linears; {(1 - ratios[-1]) * 100:.0f}–{(1 - ratios[0]) * 100:.0f} %)")


# ---------------------------------------------------------------------------------- cache statistics
def cache_statistics(cache_path: Path) -> dict[str, Any]:
    """Per-Linear activation params, clipping ratios and outliers, and per-group smoothing stats.

    Clipping ratio = calibrated range ``x_max − x_min`` / the float model's full range of the same
    (smoothed) input over all samples; < 1 means the observer clipped outliers.
    """
    cache = SessionCache.load(cache_path)
    man = cache.manifest
    records = {st: cache.read_stage(st) for st in man.get("stages_done", [])}
    try:
        arch = open_model(man.get("model_path", ""))
    except (LlavaqError, OSError):
        arch = None  # model moved: smoothing can't be mapped to its Linears, report raw stats
    group_of: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    first_of: dict[str, str] = {}
    if arch is not None:
        for st in arch.stages():
            rec = records.get(st.name, {})
            for g in arch.smooth_groups(st):
                if f"smooth.{g.name}.scale" in rec:
                    for lin in g.linears:
                        group_of[lin] = (rec[f"smooth.{g.name}.scale"], rec.get(f"smooth.{g.name}.shift"))
                first_of[g.name] = g.linears[0]
    linears: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    for stage, rec in records.items():
        for key in rec:
            if key.startswith("act.") and key.endswith(".input_scale"):
                lin = key[len("act."): -len(".input_scale")]
                d: dict[str, Any] = {"stage": stage}
                for k in ("input_scale", "input_offset", "x_min", "x_max"):
                    d[k] = float(rec[f"act.{lin}.{k}"].item())
                mn, mx = rec.get(f"float.{lin}.min"), rec.get(f"float.{lin}.max")
                if mn is not None and mx is not None:
                    d["outlier_channels"] = outlier_channels(mn, mx)
                    sm = group_of.get(lin)
                    if sm is not None or arch is not None:
                        if sm is not None:
                            z = sm[1] if sm[1] is not None else torch.zeros_like(sm[0])
                            lo, hi = float(((mn - z) / sm[0]).min()), float(((mx - z) / sm[0]).max())
                        else:
                            lo, hi = float(mn.min()), float(mx.max())
                        lo, hi = min(lo, 0.0), max(hi, 0.0)
                        d["float_range"] = [lo, hi]
                        rng = max(d["x_max"], 0.0) - min(d["x_min"], 0.0)
                        d["clip_ratio"] = rng / (hi - lo) if hi > lo else None
                linears[lin] = d
            elif key.startswith("smooth.") and key.endswith(".scale"):
                gname = key[len("smooth."): -len(".scale")]
                s = rec[key].float()
                g = {"group": gname, "stage": stage, "channels": s.numel(), "scale_min": float(s.min()),
                     "scale_max": float(s.max()), "scale_mean": float(s.mean()),
                     "shift": f"smooth.{gname}.shift" in rec}
                if f"m2.{gname}.threshold" in rec:  # what the m2 search found (caches since llavaq 0.1.0)
                    g.update({f"m2_{k}": float(rec[f"m2.{gname}.{k}"])
                              for k in ("threshold", "loss", "evals", "screened", "grid") if f"m2.{gname}.{k}" in rec})
                first = first_of.get(gname)
                if first and f"float.{first}.min" in rec:
                    g["outlier_channels"] = outlier_channels(rec[f"float.{first}.min"], rec[f"float.{first}.max"])
                groups.append(g)
    moments = {k[len("hess."): -len(".cov")]: rec[k].numel() * rec[k].element_size()
               for rec in records.values() for k in rec if k.startswith("hess.") and k.endswith(".cov")}
    problems = []
    if not cache.complete:
        problems.append(f"{cache.path / 'manifest.json'}: calibration is incomplete "
                        f"({len(records)} stage(s) done); run calibrate to resume")
    for lin, d in linears.items():
        if not all(math.isfinite(d[k]) for k in ("input_scale", "input_offset", "x_min", "x_max")):
            problems.append(f"{cache.stage_file(d['stage']).name}: act.{lin} has NaN/Inf")
        elif d["input_offset"] != round(d["input_offset"]) or not -128 <= d["input_offset"] <= 127:
            problems.append(f"{cache.stage_file(d['stage']).name}: act.{lin}.input_offset is not an int8 value")
    return {"manifest": man, "linears": linears, "groups": groups, "problems": problems,
            "model_found": arch is not None, "input_moments": {"inputs": len(moments), "bytes": sum(moments.values())}}


def architecture(config: dict[str, Any] | None) -> str | None:
    """"Mistral + CLIP" from a LLaVA config.json (None when it is not one llavaq describes)."""
    if not isinstance(config, dict):
        return None
    text = TEXT_FAMILIES.get((config.get("text_config") or {}).get("model_type", "llama"))
    vision = VISION_FAMILIES.get((config.get("vision_config") or {}).get("model_type", "clip_vision_model"))
    return f"{text.name} + {vision.name}" if text and vision else None


# ---------------------------------------------------------------------------------- reports
def inspect_output(path: Path) -> dict[str, Any]:
    view = read_quantized(path)
    rec = view.record or {}
    stats = None
    cache = rec.get("cache")
    if cache and (Path(cache) / "manifest.json").is_file():
        try:
            stats = cache_statistics(Path(cache))
        except LlavaqError:
            stats = None
    layers = []
    gptq = rec.get("gptq") if isinstance(rec.get("gptq"), dict) else None
    gptq_errors = (gptq or {}).get("error") or {}
    problems: list[str] = view.check() + _rotation_problems(view, rec)
    for name in view.quantized:
        try:
            lv = view.linear(name)
        except LlavaqError as e:
            if not problems:
                problems.append(e.message)
            continue
        ws = lv.weight_scale.float()
        row = {"name": name, "weight_scale_min": _f(float(ws.min())), "weight_scale_max": _f(float(ws.max())),
               "input_scale": _f(float(lv.input_scale.item())), "input_offset": _f(float(lv.input_offset.item()))}
        err = gptq_errors.get(name)
        if err:
            row["weight_error_rtn"], row["weight_error_gptq"] = _f(err["rtn"]), _f(err["gptq"])
        if lv.activation != "static":  # per-token scales computed at run time, or float inputs (weight-only)
            row["input_scale"] = row["input_offset"] = "per-token" if lv.activation == "dynamic" else "float"
        row["activation"] = lv.activation
        cs = (stats or {}).get("linears", {}).get(name) if stats else None
        if cs and not rec.get("derived_from_cache"):
            if "clip_ratio" in cs:
                row["clip_ratio"] = _f(cs["clip_ratio"])
            if "outlier_channels" in cs:
                row["outlier_channels"] = cs["outlier_channels"]
        layers.append(row)
    cfg = view.config or {}
    model = rec.get("model_path") or cfg.get("_name_or_path") or "?"
    tuning = _tuning_table(path, problems)
    return {
        "kind": "output",
        "path": str(path),
        "format": view.format,
        "format_description": get_format(view.format).description,
        "written_by": _written_by(view, path),
        "model": model,
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


# ---------------------------------------------------------------------------------- rendering
def _num(x: Any, fmt: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, fmt)


def _render(rep: dict[str, Any], console: Console) -> None:
    head = Table(title=f"llavaq inspect {rep['path']}", show_header=False)
    if rep["kind"] == "output":
        head.add_row("format", f"{rep['format']} — {rep['format_description']}")
        head.add_row("written by", rep["written_by"])
    else:
        head.add_row("session cache", "complete" if rep["complete"] else
                     f"INCOMPLETE ({len(rep['stages_done'])} stages done)")
        head.add_row("forward passes", str(rep["forward_passes"]))
        cal = rep.get("calibration") or {}
        head.add_row("calibration", f"{cal.get('num_samples')} sample(s): {', '.join(cal.get('images', []))}")
    head.add_row("model", str(rep["model"]) + (f" ({rep['architecture']})" if rep.get("architecture") else ""))
    r = rep.get("recipe")
    if isinstance(r, dict):
        keys = ("anti_outlier", "alpha", "act_method", "modules", "m2_search", "weight_method", "float_dtype", "w_bit",
                "a_bit")
        head.add_row("recipe", ", ".join(f"{k}={r[k]}" for k in keys if k in r)
                     + (" (derived from cached float statistics)" if rep.get("derived_from_cache") else ""))
        if r.get("rotation", "none") != "none":
            head.add_row("rotation", _rotation_line(r, rep.get("rotation")))
    if rep.get("gptq_summary"):
        g = rep.get("gptq") or {}
        head.add_row("weights", f"{rep['gptq_summary']}; damp {g.get('damp')}, block {g.get('block_size')}, "
                                f"act_order {g.get('act_order')}")
    im = rep.get("input_moments")
    if im and im.get("inputs"):
        head.add_row("input moments (GPTQ)", f"{im['inputs']} Linear inputs, {im['bytes'] / 2**20:.1f} MiB")
    head.add_row("quantized Linears (W8A8)", str(len(rep["quantized"])))
    if "float_modules" in rep:
        fm = rep["float_modules"]
        head.add_row("float modules", f"{len(fm)}: " + ", ".join(sorted({_short(m) for m in fm})))
    console.print(head)
    t = Table(title="quantized Linears")
    has_gptq = any("weight_error_gptq" in row for row in rep["layers"])
    cols = ["Linear", "w_scale min", "w_scale max", "input_scale", "input_offset", "clip ratio", "outliers"]
    for col in cols + (["weight error rtn → gptq"] if has_gptq else []):
        t.add_column(col, justify="left" if col == "Linear" else "right", no_wrap=col == "Linear")
    for row in rep["layers"]:
        oc = row.get("outlier_channels")
        cells = [_display(row["name"]), _num(row.get("weight_scale_min")), _num(row.get("weight_scale_max")),
                 _num(row.get("input_scale")), _num(row.get("input_offset"), "g"),
                 _num(row.get("clip_ratio"), ".3f"),
                 "–" if oc is None else f"{len(oc)}" + (f" {oc[:4]}" if oc else "")]
        if has_gptq:
            cells.append(f"{_num(row.get('weight_error_rtn'), '.2e')} → {_num(row.get('weight_error_gptq'), '.2e')}")
        t.add_row(*cells)
    console.print(t)
    if rep.get("smoothing"):
        s = Table(title="smoothing (per group)")
        cols = ("group", "channels", "scale min", "scale max", "scale mean", "shift",
                f"outliers (>{OUTLIER_FACTOR:g}×median)")
        for col in cols:
            s.add_column(col, justify="left" if col == "group" else "right")
        for g in rep["smoothing"]:
            oc = g.get("outlier_channels")
            s.add_row(g["group"], str(g["channels"]), _num(g["scale_min"]), _num(g["scale_max"]),
                      _num(g["scale_mean"]), "yes" if g["shift"] else "no",
                      "–" if oc is None else f"{len(oc)}" + (f" {oc[:8]}" if oc else ""))
        console.print(s)
        searched = [g for g in rep["smoothing"] if "m2_threshold" in g]
        if searched:
            s = Table(title="m2 range search (per group)")
            for col in ("group", "threshold", "block loss", "screened (int8 block equiv.) / grid", "float forwards"):
                s.add_column(col, justify="left" if col == "group" else "right")
            for g in searched:
                s.add_row(g["group"], _num(g["m2_threshold"]), _num(g.get("m2_loss", float("nan"))),
                          (f"{g['m2_screened']:.0f}" if "m2_screened" in g else "–") + f" / {g.get('m2_grid', 0):.0f}",
                          f"{g.get('m2_evals', 0):.0f}")
            console.print(s)
    if rep.get("tuning"):
        console.print(tuning_table(rep["tuning"]))
        tu = rep["tuning"]
        console.print(f"chosen: {tu.get('chosen')} — target " + ("met" if tu.get("met") else
                      "missed: " + "; ".join(tu.get("missed") or [])), highlight=False, soft_wrap=True)
    if rep["ok"]:
        console.print("[green]✓[/] consistent: every tensor present with the right dtype/shape, deq_scale = "
                      "input_scale·weight_scale, no NaN/Inf" if rep["kind"] == "output" else
                      "[green]✓[/] cache consistent")
    else:
        console.print(f"[red]✗[/] {len(rep['problems'])} problem(s):")
        for p in rep["problems"][:20]:
            console.print(f"  - {p}", highlight=False, soft_wrap=True)


def _rotation_line(recipe: dict[str, Any], info: dict[str, Any] | None) -> str:
    line = f"{recipe['rotation']} (seed {recipe.get('rotation_seed', 0)})"
    if info:
        res, head = info.get("residual") or {}, info.get("head") or {}
        line += (f": residual stream {res.get('size')} = {res.get('construction')}, per head {head.get('size')} = "
                 f"{head.get('construction')}; language model only (CLIP tower and projector linear_1 unrotated)"
                 + ("; embeddings untied" if info.get("untied_embeddings") else ""))
    return line


_ABBREV = (("vision_tower.vision_model.encoder.layers.", "vision."), ("language_model.model.layers.", "text."),
           ("multi_modal_projector.", "projector."))


def _display(name: str) -> str:
    for long, short in _ABBREV:
        if name.startswith(long):
            return short + name[len(long):]
    return name


def _short(module: str) -> str:
    """A module name with layer numbers folded: ``language_model.model.layers.*.mlp.down_proj``."""
    return ".".join("*" if p.isdigit() else p for p in module.split("."))


def run_inspect(path: str | Path, json_out: bool = False, console: Console | None = None) -> int:
    """Print the report (rich tables, or JSON only with ``json_out``); return 0 if consistent else 1."""
    console = console or Console()
    try:
        rep = inspect_path(path)
    except OutputError as e:
        if not Path(path).is_dir():
            raise
        rep = {"kind": "output", "path": str(path), "problems": [e.message], "ok": False}
        if json_out:
            print(json.dumps(rep))
        _error_line(rep)
        return 1
    if json_out:
        print(json.dumps(rep, default=str))
    else:
        _render(rep, console)
    if not rep["ok"]:
        _error_line(rep)
        return 1
    return 0


def _error_line(rep: dict[str, Any]) -> None:
    more = len(rep["problems"]) - 1
    msg = " ".join(rep["problems"][0].split()) + (f" (and {more} more problem(s))" if more else "")
    Console(stderr=True).print(f"[red]error:[/] {msg}", highlight=False, soft_wrap=True)
