"""``llavaq inspect PATH``: audit an output directory (any format) or a session cache."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from llavaq.cli import render
from llavaq.cli.app import err, out
from llavaq.errors import OutputError


def inspect(
    path: Path = typer.Argument(..., help="An output directory (any format) or a session cache."),
    other: Path = typer.Argument(None, help="A second output directory: do both carry the same quantized model? "
                                            "(exit 0 if so, 1 if not)"),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Audit a quantized model or session cache: modules, scales, consistency checks; or compare two outputs."""
    if other is not None:
        compare(path, other, json_out)
    from llavaq.inspect import OUTLIER_FACTOR, inspect_path  # torch

    try:
        rep = inspect_path(path)
    except OutputError as e:
        if not Path(path).is_dir():
            raise
        rep = {"kind": "output", "path": str(path), "problems": [e.message], "ok": False}
        if json_out:
            print(json.dumps(rep))
        render.inspect_error_line(err, rep)
        raise typer.Exit(1) from None
    if json_out:
        print(json.dumps(rep, default=str))
    else:
        render.inspect_report(rep, out, OUTLIER_FACTOR)
    if not rep["ok"]:
        render.inspect_error_line(err, rep)
        raise typer.Exit(1)


def compare(a: Path, b: Path, json_out: bool) -> None:
    """``inspect A B``: do two outputs (any formats) carry the same quantized model? Exit 0 if so, 1 if not."""
    from llavaq.compare import compare_outputs  # torch

    res = compare_outputs(a, b)
    if json_out:
        print(json.dumps(res.to_dict(), default=str))
    else:
        render.comparison(res, out)
    raise typer.Exit(0 if res.same_model else 1)
