"""Two (or more) W8A8 outputs of one model side by side: the table ``make demo`` ends with.

``python -m llavaq.report.compare --model_path M "msModelSlim's recipe=OUT_A" "--recipe auto=OUT_B"
[--report page.html] [--markdown]`` verifies each output (the float model's answers and logits computed once
for all) and prints one table: held-out text, answers to image prompts and answers to text prompts apart.
A ``NAME=FILE.json`` (``llavaq verify --json`` output) is read instead of verified. ``--report`` writes the
last output's HTML page; ``--markdown`` prints the table as Markdown (the README's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llavaq.errors import LlavaqError
from llavaq.report.files import RECORD, check_report_target, read_json, write_report
from llavaq.verify import verify


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


def recipe_line(output_dir: Path) -> str:
    """What an output's ``llavaq_record.json`` says it is: ``--recipe auto``'s choice, or the recipe's smoothing
    and weights (``m2, rtn``)."""

    rec = read_json(output_dir / RECORD) if output_dir.is_dir() else None
    if not rec:
        return "–"
    if (rec.get("tuning") or {}).get("chosen"):
        return str(rec["tuning"]["chosen"])
    r = rec.get("recipe") or {}
    return ", ".join(str(x) for x in (r.get("anti_outlier"), r.get("weight_method")) if x is not None) or "–"


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


def verify_outputs(model_path: str | Path, outputs: list[Path], report_last: bool = False,
                   **evaluation: Any) -> list[dict[str, Any]]:
    """``verify`` of each output directory (``evaluation``: verify's images / prompts / text; default the shipped
    held-out set), the float side computed once; per-Linear errors measured only for the last one when
    ``report_last`` (its page shows them)."""

    reference: dict = {}
    return [verify(model_path, out, float_reference=reference, worst=1 << 30,
                   layer_errors=report_last and i == len(outputs) - 1, **evaluation).to_dict()
            for i, out in enumerate(outputs)]


def _load(arg: str, model_path: str | None) -> tuple[str, dict[str, Any] | Path]:
    """``NAME=PATH``: a verify JSON file (read) or an output directory (returned, to be verified)."""
    name, sep, path = arg.rpartition("=")
    p = Path(path)
    name = name if sep else p.name
    if p.is_dir():
        if model_path is None:
            raise LlavaqError(f"{p} is an output directory: --model_path is needed to verify it")
        return name, p
    if not p.is_file():
        raise LlavaqError(f"{p} does not exist (a verify --json file or an output directory)")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaqError(f"{p}: invalid JSON ({e.__class__.__name__}); expected `llavaq verify --json` output") \
            from None
    if not isinstance(doc, dict) or "prompts" not in doc:
        raise LlavaqError(f"{p}: not a `llavaq verify --json` report")
    return name, doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llavaq.report.compare", description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="NAME=OUTPUT_DIR or NAME=verify.json, in column order")
    ap.add_argument("--model_path", help="the float model (to verify output directories)")
    ap.add_argument("--report", help="write the last output directory's HTML page here")
    for flag in ("images", "prompts", "text"):
        ap.add_argument(f"--{flag}", help=f"as verify --{flag} (default: the shipped held-out set)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--title", default="the same model, W8A8 recipes side by side (verify, integer-exact emulation)")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except LlavaqError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code


def _run(args: argparse.Namespace) -> int:

    loaded = [_load(a, args.model_path) for a in args.reports]
    dirs = [v for _, v in loaded if isinstance(v, Path)]
    if args.report is not None:
        if not dirs or not isinstance(loaded[-1][1], Path):
            raise LlavaqError("--report needs the last NAME=PATH to be an output directory")
        check_report_target(args.report)
    evaluation = {k: getattr(args, k) for k in ("images", "prompts", "text")}
    verified = iter(verify_outputs(args.model_path, dirs, args.report is not None, **evaluation) if dirs else [])
    names = [n for n, _ in loaded]
    reports = [next(verified) if isinstance(v, Path) else v for _, v in loaded]
    rows = compare_rows(reports)
    if dirs:
        rows.insert(0, ["recipe", *(recipe_line(Path(r["quantized"])) for r in reports)])
    if args.markdown:
        print(markdown(names, rows), end="")
    else:
        from rich.console import Console

        Console().print(rich_table(names, rows, args.title))
    if args.report is not None:
        print(f"report: {write_report(args.report, reports[-1])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
