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
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Audit a quantized model or session cache: modules, scales, consistency checks."""
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
