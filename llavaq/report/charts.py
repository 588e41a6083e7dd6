"""The report's charts: matplotlib figures rendered to inline SVG strings (text kept as ``<text>`` elements).

matplotlib is the optional extra ``report`` (``pip install llavaq[report]``); it is imported here only, lazily.
Every function is pure: numbers in, an ``<svg>`` string out.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

from llavaq.errors import LlavaqError

#: component of a Linear -> colour (vision tower, projector, language model)
COLOURS = {"vision": "#4c78a8", "projector": "#f58518", "language": "#54a24b"}
PREFIXES = (("language_model.model.layers.", "lm."), ("vision_tower.vision_model.encoder.layers.", "vis."),
            ("multi_modal_projector.", "proj."), ("language_model.", "lm."), ("vision_tower.", "vis."))


def short_name(name: str) -> str:
    """``language_model.model.layers.3.self_attn.q_proj`` -> ``lm.3.self_attn.q_proj`` (chart labels)."""
    for long, short in PREFIXES:
        if name.startswith(long):
            return short + name[len(long):]
    return name


def component(name: str) -> str:
    if name.startswith("vision_tower"):
        return "vision"
    return "projector" if name.startswith("multi_modal_projector") else "language"


def natural_key(name: str) -> list[Any]:
    """Model order for names without a module list: layer numbers compared as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def require_matplotlib() -> None:
    """A one-line error when the optional extra is missing (checked before any long work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LlavaqError("HTML reports need matplotlib: pip install llavaq[report]") from None


def _figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot()


def to_svg(fig) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), text as text, ids stable between runs."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "llavaq", "font.size": 9}):
        fig.tight_layout()
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    return re.sub(r"\s*<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S)


def layer_error_chart(layers: Sequence[dict[str, Any]], order: Sequence[str] | None = None, label: int = 6) -> str:
    """Relative output MSE of each quantized Linear (log scale) in model order; the ``label`` worst named."""
    index = {n: i for i, n in enumerate(order or [])}
    rows = sorted(layers, key=lambda e: (index.get(e["name"], len(index)), natural_key(e["name"])))
    fig, ax = _figure(12, 4.2)
    for comp, colour in COLOURS.items():
        pts = [(i, e["rel_mse"]) for i, e in enumerate(rows) if component(e["name"]) == comp and e["rel_mse"] > 0]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, color=colour, label=comp)
            ax.vlines([p[0] for p in pts], min(p[1] for p in pts) * 0.5, [p[1] for p in pts], color=colour,
                      linewidth=0.6, alpha=0.5)
    worst = sorted(range(len(rows)), key=lambda i: rows[i]["rel_mse"], reverse=True)[:label]
    for rank, i in enumerate(worst):  # labels fanned out in the headroom above the points
        ax.annotate(short_name(rows[i]["name"]), (i, rows[i]["rel_mse"]), xytext=(8, 6 + 11 * rank),
                    textcoords="offset points", fontsize=8, color="#b00020",
                    arrowprops={"arrowstyle": "-", "color": "#b00020", "linewidth": 0.5})
    top = max((e["rel_mse"] for e in rows), default=0.0)
    if top > 0:
        ax.set_yscale("log")
        ax.set_ylim(top=top * 10 ** (0.35 * min(label, len(rows)) + 0.3))
    ax.set_xlabel(f"quantized Linear, in model order ({len(rows)})")
    ax.set_ylabel("relative output MSE (emulated int8 vs float)")
    ax.set_title("Per-Linear W8A8 error")
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return to_svg(fig)


def range_chart(ranges: Sequence[dict[str, Any]], label: int = 5) -> str:
    """Each quantized Linear's static int8 input range (bar) and, where the cache has it, the float range seen."""
    fig, ax = _figure(12, 4.2)
    xs = list(range(len(ranges)))
    has_float = [i for i, r in enumerate(ranges) if r.get("float_lo") is not None]
    if has_float:
        ax.vlines(has_float, [ranges[i]["float_lo"] for i in has_float], [ranges[i]["float_hi"] for i in has_float],
                  color="#bbbbbb", linewidth=5, label="float range (calibration)")
    for comp, colour in COLOURS.items():
        idx = [i for i in xs if component(ranges[i]["name"]) == comp]
        if idx:
            ax.vlines(idx, [ranges[i]["lo"] for i in idx], [ranges[i]["hi"] for i in idx], color=colour,
                      linewidth=2, label=f"{comp}: int8 range")
    widest = sorted(xs, key=lambda i: ranges[i]["hi"] - ranges[i]["lo"], reverse=True)[:label]
    for rank, i in enumerate(widest):
        ax.annotate(short_name(ranges[i]["name"]), (i, ranges[i]["hi"]), xytext=(5, 3 + 9 * (rank % 3)),
                    textcoords="offset points", fontsize=8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel(f"quantized Linear, in model order ({len(ranges)})")
    ax.set_ylabel("input activation range")
    ax.set_title("Per-tensor static activation ranges")
    ax.legend(loc="upper left", fontsize=8)
    return to_svg(fig)


def scored_candidates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The tuning document's candidates with both a text and an image top-1 (the scatter's points, in order)."""
    return [r for r in doc.get("candidates", []) if (r.get("score") or {}).get("text_top1") is not None
            and (r.get("score") or {}).get("image_top1") is not None]


def candidate_scatter(doc: dict[str, Any]) -> str:
    """Every scored candidate of a tuning document: held-out text top-1 vs image-answer top-1, the target
    region shaded, the choice starred. Screening scores (on a subset) are hollow; each point is numbered by its
    rank among the scored candidates (:func:`scored_candidates`), as in the page's table."""
    fig, ax = _figure(9, 6)
    target = doc.get("target") or {}
    t = target.get("min_top1")
    rows = scored_candidates(doc)
    xs = [r["score"]["text_top1"] for r in rows] + ([t] if t is not None else [])
    ys = [r["score"]["image_top1"] for r in rows] + ([t] if t is not None else [])
    lo = min(xs + ys, default=0.0)
    lo = max(0.0, math.floor((lo - 0.02) * 50) / 50)
    if t is not None:
        ax.axvline(t, color="#b00020", linestyle="--", linewidth=1)
        ax.axhline(t, color="#b00020", linestyle="--", linewidth=1)
        ax.fill_between([t, 1.005], t, 1.005, color="#54a24b", alpha=0.12, label=f"target: top-1 ≥ {t:g} (each)")
    for n, r in enumerate(rows, 1):  # numbered as in the page's candidate table
        s, full = r["score"], r["stage"] != "screen"
        ok = r.get("meets") if r.get("meets") is not None else not r.get("failed")
        colour = "#54a24b" if ok else "#e45756"
        ax.scatter([s["text_top1"]], [s["image_top1"]], s=40, color=colour if full else "none", edgecolors=colour)
        ax.annotate(str(n), (s["text_top1"], s["image_top1"]), xytext=(4, 3 + 7 * (n % 2)),
                    textcoords="offset points", fontsize=7, color="#444444")
    chosen = next((r for r in rows if r["candidate"] == doc.get("chosen") and r["stage"] != "screen"), None)
    if chosen is not None:
        s = chosen["score"]
        ax.scatter([s["text_top1"]], [s["image_top1"]], s=260, marker="*", color="#ffbf00", edgecolors="black",
                   zorder=5, label=f"chosen: {chosen['candidate']}")
    ax.set_xlim(lo, 1.005)
    ax.set_ylim(lo, 1.005)
    ax.set_xlabel("top-1 agreement, held-out text")
    ax.set_ylabel("top-1 agreement, answers to image prompts")
    ax.set_title(f"--recipe auto: {len(rows)} candidate scores (green: meets the target on its data)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return to_svg(fig)
