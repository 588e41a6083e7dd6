"""One self-contained HTML page from what ``verify`` and ``--recipe auto`` report (pure: dicts in, a string out).

Inputs are the public documents: ``FidelityReport.to_dict()`` (``llavaq verify --json``), the output's
``llavaq_record.json``, its ``llavaq_tuning.json`` and the per-Linear activation ranges of
:func:`llavaq.report.files.activation_ranges`. Charts are inline SVG (:mod:`llavaq.report.charts`); the page
loads nothing from the network.
"""

from __future__ import annotations

from html import escape
from typing import Any

from llavaq import __version__
from llavaq.report import charts

WORST_ROWS = 10
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1240px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f4f4f4}
td.l,th.l{text-align:left} .cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:150px}
.card .v{font-size:20px;font-weight:600} .card .k{font-size:12px;color:#666}
.ok{color:#2e7d32} .bad{color:#b00020} .chosen{background:#fff6d5;font-weight:600} svg{max-width:100%;height:auto}
"""


def fmt(x: Any, spec: str = ".4f") -> str:
    """A number for the page; missing values as an en dash."""
    if x is None or isinstance(x, str):
        return "–" if x is None else escape(x)
    return format(x, spec)


def _card(key: str, value: str, cls: str = "") -> str:
    return f'<div class="card"><div class="v {cls}">{value}</div><div class="k">{escape(key)}</div></div>'


def _table(header: list[str], rows: list[list[str]], left: int = 1, row_class: list[str] | None = None) -> str:
    """An HTML table; cells are already escaped; the first ``left`` columns left-aligned."""
    def cell(tag: str, i: int, v: str) -> str:
        return f'<{tag}{" class=l" if i < left else ""}>{v}</{tag}>'

    head = "".join(cell("th", i, escape(h)) for i, h in enumerate(header))
    body = "".join(f'<tr{" class=" + row_class[n] if row_class and row_class[n] else ""}>'
                   + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for n, r in enumerate(rows))
    return f"<table><tr>{head}</tr>{body}</table>"


def summary_section(rep: dict[str, Any]) -> str:
    """Δppl, held-out text / image-answer / text-answer top-1 and KL, pooled numbers, and the prompts."""
    inc = rep.get("ppl_increase_percent")
    cards = [_card("perplexity FP → Q", f"{fmt(rep.get('ppl_fp'))} → {fmt(rep.get('ppl_q'))}"),
             _card("Δ perplexity", f"{fmt(inc, '+.2f')} %"),
             _card("held-out text top-1 / KL", f"{fmt(rep.get('text_top1'))} / {fmt(rep.get('text_kl'), '.5f')}"),
             _card("image answers top-1 / KL", f"{fmt(rep.get('image_top1'))} / {fmt(rep.get('image_kl'), '.5f')}"),
             _card("text answers top-1 / KL",
                   f"{fmt(rep.get('text_prompt_top1'))} / {fmt(rep.get('text_prompt_kl'), '.5f')}"),
             _card("all positions top-1 / KL", f"{fmt(rep.get('top1'))} / {fmt(rep.get('kl'), '.5f')}"),
             _card("mean logits cosine", fmt(rep.get("cosine"), ".5f")),
             _card("W8A8 Linears emulated", str(rep.get("quantized_linears", "–")))]
    rows = [[escape(("[" + p["image"] + "] ") if p.get("image") else "[text] ") + escape(p["prompt"]),
             escape(p["answer"]), str(p["answer_tokens"]), fmt(p["top1"], ".3f"), fmt(p["kl"], ".5f"),
             fmt(p["cosine"], ".5f")] for p in rep.get("prompts", [])]
    prompts = _table(["prompt", "answer (float model, greedy)", "tokens", "top-1", "KL(FP‖Q)", "cosine"], rows, 2) \
        if rows else ""
    return f'<h2>Summary</h2><div class="cards">{"".join(cards)}</div>{prompts}'


def layer_section(rep: dict[str, Any], order: list[str] | None) -> str:
    layers = rep.get("worst_layers") or []
    if not layers:
        return ""
    worst = sorted(layers, key=lambda e: e["rel_mse"], reverse=True)[:WORST_ROWS]
    rows = [[escape(e["name"]), fmt(e["rel_mse"], ".3e"), fmt(e["mse"], ".3e"), fmt(e["clip_fraction"], ".2e")]
            for e in worst]
    n, total = len(layers), rep.get("quantized_linears", len(layers))
    shown = f"all {n}" if n >= total else f"the {n} worst of {total} (verify --report measures all)"
    return (f"<h2>Per-Linear error</h2><p class=meta>Output of each quantized Linear, emulated int8 kernel vs the "
            f"float Linear on the same input, over the evaluation data ({shown}).</p>"
            f"{charts.layer_error_chart(layers, order)}"
            + _table(["worst Linears", "rel. MSE", "MSE", "saturated"], rows))


def range_section(ranges: list[dict[str, Any]] | None) -> str:
    if not ranges:
        return ""
    note = "with the float range each input took during calibration (grey)" \
        if any(r.get("float_lo") is not None for r in ranges) else "(no session cache at hand: no float ranges)"
    return (f"<h2>Activation ranges</h2><p class=meta>The static int8 range of each quantized Linear's input "
            f"(<code>(code − offset) · scale</code> for codes −128…127, after smoothing), {note}.</p>"
            + charts.range_chart(ranges))


def tuning_section(doc: dict[str, Any] | None) -> str:
    """``--recipe auto``: the candidates' scatter and table, the target and the choice."""
    if not doc:
        return ""
    tgt = doc.get("target") or {}
    rows, classes = [], []
    number = {id(r): str(n) for n, r in enumerate(charts.scored_candidates(doc), 1)}
    for r in doc.get("candidates", []):
        s = r.get("score") or {}
        chosen = r["candidate"] == doc.get("chosen") and r["stage"] != "screen" and bool(s)
        verdict = escape(r.get("status", "")) if not s else \
            ('<span class="bad">misses</span>' if r.get("failed") else '<span class="ok">meets</span>')
        rows.append([number.get(id(r), ""), escape(r["candidate"]) + (" ◀ chosen" if chosen else ""),
                     escape(r["stage"]),
                     fmt(s.get("ppl_increase"), "+.2f"), fmt(s.get("text_top1")), fmt(s.get("text_kl")),
                     fmt(s.get("image_top1")), fmt(s.get("image_kl")),
                     str(len(r.get("float_linears") or [])) if s else "–", verdict])
        classes.append("chosen" if chosen else "")
    met = '<span class="ok">met</span>' if doc.get("met") else '<span class="bad">missed</span>'
    notes = "".join(f"<li>{escape(n)}</li>" for n in doc.get("notes", []))
    return (f"<h2>--recipe auto: candidates</h2><p class=meta>Target Δppl ≤ {fmt(tgt.get('max_ppl_increase'), 'g')}"
            f" %, top-1 ≥ {fmt(tgt.get('min_top1'), 'g')} on held-out text and on image answers, each: {met}; "
            f"chosen: <b>{escape(str(doc.get('chosen')))}</b>; {fmt(doc.get('seconds'), '.0f')} s.</p>"
            + charts.candidate_scatter(doc)
            + _table(["#", "candidate", "stage", "Δppl %", "text top-1", "text KL", "image top-1", "image KL",
                      "float Linears", "target"], rows, 3, classes)
            + (f"<ul class=meta>{notes}</ul>" if notes else ""))


def build_page(verify: dict[str, Any] | None = None, *, record: dict[str, Any] | None = None,
               ranges: list[dict[str, Any]] | None = None, tuning: dict[str, Any] | None = None,
               title: str | None = None) -> str:
    """The HTML page: summary, per-Linear errors, activation ranges, and the tuning candidates when given."""

    record = record or {}
    src = verify or {}
    out = src.get("quantized") or record.get("save_directory") or ""
    title = title or f"llavaq report: {out}"
    recipe = record.get("recipe") or {}
    meta = [f"model {escape(str(src.get('model_path') or record.get('model_path') or '?'))}",
            f"format {escape(str(src.get('format') or record.get('format') or '?'))}"]
    if src.get("mode"):
        meta.append(f"{escape(src['mode'])} int8 activations")
    if recipe:
        meta.append("recipe " + escape(", ".join(f"{k}={recipe[k]}" for k in ("anti_outlier", "alpha", "act_method",
                                                                               "weight_method", "rotation")
                                                 if k in recipe)))
    body = [f"<h1>{escape(title)}</h1><p class=meta>{' · '.join(meta)} · llavaq {escape(__version__)}</p>"]
    if verify:
        body += [summary_section(verify), layer_section(verify, record.get("quantized_modules"))]
    body += [range_section(ranges), tuning_section(tuning)]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>\n")
