"""The tuning table (rich), as ``quantize --recipe auto`` and ``inspect`` print it."""

from __future__ import annotations

from typing import Any

from llavaq.tuning.selection import fmt_value as _fmt


def tuning_table(doc: dict[str, Any]):
    """The candidates of a ``llavaq_tuning.json`` document as a rich table (used by the CLI and ``inspect``)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

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
                  _fmt(s.get("ppl_increase"), "+.2f"), _fmt(s.get("text_top1")), _fmt(s.get("text_kl")),
                  _fmt(s.get("image_top1")), _fmt(s.get("image_kl")),
                  str(len(r.get("float_linears") or [])) if s else "–", f"{r.get('seconds', 0):.0f}" if s else "–",
                  verdict)
    return t
