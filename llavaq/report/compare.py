"""Two (or more) ``llavaq verify --json`` reports side by side: the table ``make demo`` ends with.

``python -m llavaq.report.compare "msModelSlim's recipe=a.json" "--recipe auto=b.json" [--markdown]``
prints one table (held-out text, answers to image prompts and answers to text prompts apart); ``--markdown``
prints it as a Markdown table instead (the README's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llavaq.errors import LlavaqError


def _f(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def compare_rows(reports: list[dict[str, Any]]) -> list[list[str]]:
    """[label, value per report] rows: perplexity, held-out text, image answers, text answers, each prompt."""
    rows = [["perplexity Δ", *(_f(r.get("ppl_increase_percent"), "+.2f") + " %" for r in reports)],
            ["held-out text: top-1", *(_f(r.get("text_top1"), ".3f") for r in reports)],
            ["held-out text: KL", *(_f(r.get("text_kl"), ".4f") for r in reports)],
            ["image answers: top-1", *(_f(r.get("image_top1"), ".3f") for r in reports)],
            ["image answers: KL", *(_f(r.get("image_kl"), ".4f") for r in reports)],
            ["text answers: top-1", *(_f(r.get("text_prompt_top1"), ".3f") for r in reports)],
            ["text answers: KL", *(_f(r.get("text_prompt_kl"), ".4f") for r in reports)]]
    first = reports[0].get("prompts", []) if reports else []
    for kind, want_image in (("image", True), ("text", False)):
        for i, p in enumerate(first):
            if bool(p.get("image")) != want_image:
                continue
            label = f"{kind}: {(p['image'] + ' ') if p.get('image') else ''}{p['prompt']}"
            vals = []
            for r in reports:
                q = (r.get("prompts") or [])[i] if i < len(r.get("prompts") or []) else None
                same = q is not None and q.get("prompt") == p["prompt"] and q.get("image") == p.get("image")
                vals.append(f"top-1 {q['top1']:.2f}" if same else "–")
            rows.append([label[:60], *vals])
    return rows


def markdown(names: list[str], rows: list[list[str]]) -> str:
    head = "| | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    return head + "".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |\n" for r in rows)


def rich_table(names: list[str], rows: list[list[str]], title: str):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("", overflow="fold")
    for n in names:
        t.add_column(n, justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def _load(arg: str) -> tuple[str, dict[str, Any]]:
    name, sep, path = arg.rpartition("=")
    p = Path(path)
    if not p.is_file():
        raise LlavaqError(f"verify report {p} does not exist")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaqError(f"{p}: invalid JSON ({e.__class__.__name__}); expected `llavaq verify --json` output") \
            from None
    if not isinstance(doc, dict) or "prompts" not in doc:
        raise LlavaqError(f"{p}: not a `llavaq verify --json` report")
    return (name if sep else p.stem), doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llavaq.report.compare", description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="NAME=verify.json (verify --json output), in column order")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--title", default="the same model, two W8A8 recipes (verify, integer-exact emulation)")
    args = ap.parse_args(argv)
    try:
        loaded = [_load(a) for a in args.reports]
    except LlavaqError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code
    names, reports = [n for n, _ in loaded], [r for _, r in loaded]
    rows = compare_rows(reports)
    if args.markdown:
        print(markdown(names, rows), end="")
    else:
        from rich.console import Console

        Console().print(rich_table(names, rows, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
