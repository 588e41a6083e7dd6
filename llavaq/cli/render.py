"""Every rich table and status line the CLI prints: export, calibration, tuning, verify and inspect reports.

The library computes (results, reports, ``inspect`` dictionaries); this module only shows them.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _num(x: Any, fmt: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, fmt)


def error_line(console: Console, message: str) -> None:
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------- calibrate / export
def calibration_lines(console: Console, cal: Any) -> None:
    """Whether the calibration ran or was reused, and where its session cache is."""
    state = "reused cached calibration" if cal.reused else f"calibrated in {cal.seconds:.1f}s"
    console.print(f"[green]✓[/] {state}: {cal.num_samples} sample(s), {escape(cal.images_summary)}", soft_wrap=True)
    console.print(f"  session cache: {escape(str(cal.cache.path))}", soft_wrap=True, highlight=False)


def range_drivers_line(console: Console, summary: str) -> None:
    """What set the calibrated activation ranges (``llavaq.calib.coverage.range_drivers``), indented."""
    console.print("  " + summary, soft_wrap=True)


def export_table(res: Any, gptq_line: str | None, peak_rss_mib: float | None) -> Table:
    """An ``api.ExportResult`` as a two-column table."""
    t = Table(title=f"llavaq → {res.save_directory}", show_header=False)
    t.add_row("format", res.format + (" (derived from cached float statistics)" if res.derived else ""))
    t.add_row("quantized Linears (W8A8)", str(res.quantized))
    t.add_row("float Linears", str(res.float_modules))
    for name, e in res.kept_float.items():
        t.add_row("  kept float", name + (f" (W8A8 rel. error {e:.1e})" if e is not None else ""))
    fused = getattr(res, "fused_float", [])
    if fused:
        t.add_row("  note", f"{len(fused)} of these kept float with a chosen Linear of their fused group (q/k/v, "
                            "gate/up: vLLM runs each group as one Linear of one scheme)")
    if gptq_line:
        t.add_row("weights", gptq_line)
    t.add_row("tensors", str(res.num_tensors))
    t.add_row("output size", f"{res.bytes_written / 2**20:.1f} MiB in {len(res.files)} files")
    t.add_row("export time", f"{res.seconds:.1f}s")
    if peak_rss_mib is not None:
        t.add_row("peak RSS", f"{peak_rss_mib:.0f} MiB")
    return t


# ---------------------------------------------------------------------------------- quantize --recipe auto
def tuning_table(doc: dict[str, Any]) -> Table:
    """The candidates of a ``llavaq_tuning.json`` document (``quantize --recipe auto`` and ``inspect``)."""
    tgt = doc.get("target", {})
    t = Table(title=f"llavaq tuning: target Δppl ≤ {tgt.get('max_ppl_increase', float('nan')):g} %, top-1 ≥ "
                    f"{tgt.get('min_top1', float('nan')):g} on held-out text and on image answers, each",
              box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("candidate", "stage", "Δppl\n%", "text\ntop-1", "text\nKL", "image\ntop-1", "image\nKL",
                "float\nLinears", "time\ns", "target"):
        t.add_column(col, justify="left" if col in ("candidate", "stage", "target") else "right",
                     no_wrap=col not in ("candidate", "stage"))
    chosen = doc.get("chosen")
    for r in doc.get("candidates", []):
        s = r.get("score") or {}
        is_chosen = r["candidate"] == chosen and r["stage"] != "screen" and bool(s)
        name = f"[bold green]{escape(r['candidate'])} ◀[/]" if is_chosen else escape(r["candidate"])
        if not s:
            verdict = escape(r.get("status", ""))
        else:
            verdict = ("[green]meets[/]" if r["meets"] else "[red]misses[/]") if r.get("meets") is not None \
                else "(misses)" if r.get("failed") else "(meets)"
        t.add_row(name, r["stage"] + (" (resumed)" if r.get("status") == "resumed" else ""),
                  _num(s.get("ppl_increase"), "+.2f"), _num(s.get("text_top1"), ".4f"),
                  _num(s.get("text_kl"), ".4f"), _num(s.get("image_top1"), ".4f"), _num(s.get("image_kl"), ".4f"),
                  str(len(r.get("float_linears") or [])) if s else "–", f"{r.get('seconds', 0):.0f}" if s else "–",
                  verdict)
    return t


def tuning_run(err: Console, out: Console, res: Any, table_path: str) -> None:
    """A ``TuningResult``: its calibrations, the candidate table, the notes and the scoring count."""
    for c in res.calibrations:
        state = "reused" if c.reused else f"calibrated in {c.seconds:.1f}s"
        err.print(f"[green]✓[/] {escape(c.label)}: {state}", soft_wrap=True)
        err.print(f"  session cache: {escape(c.cache)}", soft_wrap=True, highlight=False)
    out.print(tuning_table(res.table()))
    for note in res.notes:
        err.print(f"  note: {escape(note)}", soft_wrap=True, highlight=False)
    resumed = sum(r.status == "resumed" for r in res.rows)
    again = f", {resumed} read back from the session cache" if resumed else ""
    err.print(f"{res.verify_calls} scoring(s) run{again}; table saved as {escape(table_path)}", soft_wrap=True,
              highlight=False)


# ---------------------------------------------------------------------------------- verify
def verify_report(report: Any, console: Console) -> None:
    """A ``FidelityReport``: per prompt, overall, worst Linears, and what drives the activation ranges."""
    acts = "float activations (weight-only reference)" if report.mode == "weight_only" \
        else f"{report.mode} int8 activations"
    t = Table(title=f"llavaq verify: {report.quantized} ({report.format}, {acts}, "
                    f"{report.quantized_linears} W8A8 Linears emulated)")
    for c in ("prompt", "answer (FP, greedy)", "cosine", "top-1 answer", "top-1 all", "KL(FP‖Q)"):
        t.add_column(c, overflow="fold")
    for r in report.prompts:
        label = (f"[{r.image}] " if r.image else "[text] ") + r.prompt
        t.add_row(label[:60], r.answer[:50], f"{r.cosine:.5f}", f"{r.top1:.3f}", f"{r.top1_all:.3f}", f"{r.kl:.5f}")
    if report.prompts:
        console.print(t)
    console.print(_verify_overall(report))
    w = Table(title="worst quantized Linears (emulated output vs float Linear, same input)")
    for c in ("Linear", "rel. MSE", "MSE", "saturated"):
        w.add_column(c)
    for e in report.worst_layers:
        w.add_row(e.name, f"{e.rel_mse:.2e}", f"{e.mse:.2e}", f"{e.clip_fraction:.2e}")
    console.print(w)
    if report.range_drivers:
        console.print(report.range_drivers.get("summary", ""))


def _verify_overall(report: Any) -> Table:
    s = Table(title="overall", show_header=False)
    if report.ppl_fp is not None:
        s.add_row("perplexity FP → Q", f"{report.ppl_fp:.4f} → {report.ppl_q:.4f} ({report.ppl_increase:+.2f}%) "
                                       f"on {report.text_tokens} held-out tokens")
        s.add_row("held-out text top-1 / KL", f"{report.text_top1:.4f} / {report.text_kl:.5f}")
    if report.image_top1 is not None:
        s.add_row("image-prompt answers top-1 / KL", f"{report.image_top1:.4f} / {report.image_kl:.5f} "
                                                    f"({report.image_positions} positions)")
    if report.text_prompt_top1 is not None:
        s.add_row("text-prompt answers top-1 / KL", f"{report.text_prompt_top1:.4f} / {report.text_prompt_kl:.5f} "
                                                   f"({report.text_prompt_positions} positions)")
    s.add_row("top-1 agreement (all scored positions)", f"{report.top1:.4f}")
    s.add_row("KL(FP‖Q) per position", f"{report.kl:.5f}")
    s.add_row("mean logits cosine", f"{report.cosine:.5f}")
    s.add_row("time", f"{report.seconds:.1f}s")
    return s


# ---------------------------------------------------------------------------------- inspect
def inspect_report(rep: dict[str, Any], console: Console, outlier_factor: float) -> None:
    """An ``llavaq.inspect.inspect_path`` report: head, quantized Linears, smoothing, tuning, verdict."""
    console.print(_inspect_head(rep))
    console.print(_inspect_layers(rep["layers"]))
    if rep.get("smoothing"):
        console.print(_smoothing_table(rep["smoothing"], outlier_factor))
        searched = [g for g in rep["smoothing"] if "m2_threshold" in g]
        if searched:
            console.print(_m2_table(searched))
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


def inspect_error_line(console: Console, rep: dict[str, Any]) -> None:
    """The one ``error:`` line of an inconsistent output: the first problem, and how many more."""
    more = len(rep["problems"]) - 1
    msg = " ".join(rep["problems"][0].split()) + (f" (and {more} more problem(s))" if more else "")
    error_line(console, msg)


_RECIPE_KEYS = ("anti_outlier", "alpha", "act_method", "modules", "m2_search", "weight_method", "float_dtype",
                "w_bit", "a_bit", "group_size", "w_sym")


def _inspect_head(rep: dict[str, Any]) -> Table:
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
        head.add_row("recipe", ", ".join(f"{k}={r[k]}" for k in _RECIPE_KEYS if k in r)
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
    r = rep.get("recipe") if isinstance(rep.get("recipe"), dict) else {}
    head.add_row(f"quantized Linears (W{r.get('w_bit', 8)}A{r.get('a_bit', 8)})", str(len(rep["quantized"])))
    if "float_modules" in rep:
        fm = rep["float_modules"]
        head.add_row("float modules", f"{len(fm)}: " + ", ".join(sorted({_short(m) for m in fm})))
    return head


def _inspect_layers(layers: list[dict[str, Any]]) -> Table:
    t = Table(title="quantized Linears")
    has_gptq = any("weight_error_gptq" in row for row in layers)
    weight_only = any(row.get("input_scale") == "float" for row in layers)
    cols = ["Linear", "w_scale min", "w_scale max", "input_scale", "input_offset", "clip ratio", "outliers"]
    extra = (["bits", "group", "zero pt", "‖ΔW‖²/‖W‖²"] if weight_only else []) + (
        ["weight error rtn → gptq"] if has_gptq else [])
    for col in cols + extra:
        t.add_column(col, justify="left" if col == "Linear" else "right", no_wrap=col == "Linear")
    for row in layers:
        oc = row.get("outlier_channels")
        cells = [_display(row["name"]), _num(row.get("weight_scale_min")), _num(row.get("weight_scale_max")),
                 _num(row.get("input_scale")), _num(row.get("input_offset"), "g"),
                 _num(row.get("clip_ratio"), ".3f"),
                 "–" if oc is None else f"{len(oc)}" + (f" {oc[:4]}" if oc else "")]
        if weight_only:
            cells += [str(row.get("bits", 8)), str(row.get("group_size") or "channel"),
                      "yes" if row.get("zero_point") else "no", _num(row.get("weight_error"), ".2e")]
        if has_gptq:
            cells.append(f"{_num(row.get('weight_error_rtn'), '.2e')} → {_num(row.get('weight_error_gptq'), '.2e')}")
        t.add_row(*cells)
    return t


def _smoothing_table(groups: list[dict[str, Any]], outlier_factor: float) -> Table:
    s = Table(title="smoothing (per group)")
    cols = ("group", "channels", "scale min", "scale max", "scale mean", "shift",
            f"outliers (>{outlier_factor:g}×median)")
    for col in cols:
        s.add_column(col, justify="left" if col == "group" else "right")
    for g in groups:
        oc = g.get("outlier_channels")
        s.add_row(g["group"], str(g["channels"]), _num(g["scale_min"]), _num(g["scale_max"]),
                  _num(g["scale_mean"]), "yes" if g["shift"] else "no",
                  "–" if oc is None else f"{len(oc)}" + (f" {oc[:8]}" if oc else ""))
    return s


def _m2_table(searched: list[dict[str, Any]]) -> Table:
    s = Table(title="m2 range search (per group)")
    for col in ("group", "threshold", "block loss", "screened (int8 block equiv.) / grid", "float forwards"):
        s.add_column(col, justify="left" if col == "group" else "right")
    for g in searched:
        s.add_row(g["group"], _num(g["m2_threshold"]), _num(g.get("m2_loss", float("nan"))),
                  (f"{g['m2_screened']:.0f}" if "m2_screened" in g else "–") + f" / {g.get('m2_grid', 0):.0f}",
                  f"{g.get('m2_evals', 0):.0f}")
    return s


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


def comparison(res: Any, console: Console, n: int = 10) -> None:
    """``inspect A B``: the verdict, the Linears that differ and the largest differences."""
    console.print(f"A: {escape(res.a)} ({res.formats[0]})\nB: {escape(res.b)} ({res.formats[1]})", highlight=False)
    for line in res.structure[:n]:
        console.print(f"[red]differs:[/] {escape(line)}", highlight=False)
    bad = [d for d in res.linears if not d.same]
    if bad:
        t = Table(title=f"{len(bad)} of {len(res.linears)} quantized Linears differ")
        for c in ("Linear", "codes differing", "max step", "max Δws rel", "max Δ(W_q·ws) rel", "notes"):
            t.add_column(c, justify="left" if c in ("Linear", "notes") else "right", overflow="fold")
        for d in sorted(bad, key=lambda d: -d.code_fraction)[:n]:
            t.add_row(escape(d.name), f"{d.code_fraction:.3%}", str(d.max_code_step), f"{d.scale_rel:.2e}",
                      f"{d.weight_rel:.2e}", escape("; ".join(d.notes)))
        console.print(t)
    rows = res.largest(n)
    if rows:
        t = Table(title="largest differences")
        for c in ("tensor", "what", "value", "within rounding"):
            t.add_column(c, justify="right" if c == "value" else "left", overflow="fold")
        for name, what, v, ok in rows:
            t.add_row(escape(name), what, f"{v:.3g}", "yes" if ok else "[red]no[/]")
        console.print(t)
    lossy = sum(1 for f in res.floats if f.rounded and f.max_rel)
    lossless = len(res.rounded) - lossy
    rounded = (f"; {lossy} float tensor(s) differ only by the documented rounding" if lossy else "") + (
        f"; {lossless} float tensor(s) stored in a lower precision, with equal values" if lossless else "")
    console.print(f"[green]same model[/]: identical int8 codes and scales{rounded}" if res.same_model else
                  f"[red]different models[/] ({len(bad)} Linear(s), {len(res.structure)} structural, "
                  f"{sum(not f.same for f in res.floats)} float tensor(s))", highlight=False)
