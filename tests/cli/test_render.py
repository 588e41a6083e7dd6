"""cli/render.py shows the library's numbers as they are (formatted, nothing recomputed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from llavaq.cli import render


def text(renderable) -> str:
    console = Console(record=True, width=250, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_tuning_table_numbers_and_chosen_row():
    doc = {"target": {"max_ppl_increase": 1.5, "min_top1": 0.9}, "chosen": "m1-a0.5",
           "candidates": [
               {"candidate": "m1-a0.5", "stage": "full", "meets": True, "seconds": 12.4, "float_linears": ["a", "b"],
                "score": {"ppl_increase": 0.4213, "text_top1": 0.95123, "text_kl": 0.01234, "image_top1": 0.9,
                          "image_kl": None}},
               {"candidate": "m2", "stage": "screen", "status": "skipped (time budget)", "score": None}]}
    out = text(render.tuning_table(doc))
    assert "target Δppl ≤ 1.5 %, top-1 ≥ 0.9" in out
    row = next(ln for ln in out.splitlines() if "m1-a0.5" in ln)
    assert "◀" in row and "+0.42" in row and "0.9512" in row and "0.0123" in row and "0.9000" in row
    assert row.split()[-3:] == ["2", "12", "meets"]  # float Linears, seconds, verdict
    skipped = next(ln for ln in out.splitlines() if ln.strip().startswith("m2"))
    assert "skipped (time budget)" in skipped and "◀" not in skipped and skipped.count("–") == 7


def test_export_table_rows():
    res = SimpleNamespace(save_directory=Path("out"), format="msmodelslim", derived=True, quantized=154,
                          float_modules=70, kept_float={"text.0.mlp.up_proj": 2.5e-3, "text.1.mlp.up_proj": None},
                          num_tensors=812, bytes_written=3 * 2**20, files=["a", "b"], seconds=4.25)
    out = text(render.export_table(res, "GPTQ: 30 % below", 1234.4))
    assert "msmodelslim (derived from cached float statistics)" in out
    assert "154" in out and "70" in out and "812" in out
    assert "text.0.mlp.up_proj (W8A8 rel. error 2.5e-03)" in out and "text.1.mlp.up_proj" in out
    assert "3.0 MiB in 2 files" in out and "4.2s" in out and "1234 MiB" in out and "GPTQ: 30 % below" in out
    assert "peak RSS" not in text(render.export_table(res, None, None))
