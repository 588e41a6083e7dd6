"""Issue #29: ``verify --report`` / ``quantize --recipe auto --report`` HTML pages, the demo's side-by-side table,
and the page rendered in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from llavaq.errors import LlavaqError
from llavaq.report import build_page, compare_rows, require_matplotlib, write_text_atomic
from llavaq.report.compare import main as compare_main
from llavaq.report.compare import markdown
from llavaq.report.files import static_range
from llavaq.testing import write_test_images

pytest.importorskip("matplotlib", reason="matplotlib missing: pip install llavaq[report]")

HELDOUT = "The cat sat on the table next to a cup of coffee. A rocket stands on the launch pad under a blue sky. " * 3
LM = "language_model.model.layers"


def _layers(n: int = 12) -> list[dict]:
    names = [f"{LM}.{i // 3}.self_attn.{p}_proj" for i, p in zip(range(n), "qkv" * n, strict=False)]
    return [{"name": nm, "mse": 1e-5 * (i + 1), "rel_mse": 1e-4 * (i + 1), "clip_fraction": 0.0}
            for i, nm in enumerate(names)]


def _report(**over) -> dict:
    layers = _layers()
    layers[4]["rel_mse"] = 0.01234  # the worst Linear
    rep = {"model_path": "m", "quantized": "out", "format": "msmodelslim", "mode": "static",
           "prompts": [{"prompt": "What is in the picture?", "image": "cat.jpg", "answer": "a cat", "answer_tokens": 3,
                        "cosine": 0.99, "top1": 1.0, "top1_all": 1.0, "kl": 0.001, "positions_all": 9},
                       {"prompt": "Where is the rocket?", "image": None, "answer": "on a pad", "answer_tokens": 4,
                        "cosine": 0.98, "top1": 0.75, "top1_all": 0.9, "kl": 0.002, "positions_all": 8}],
           "ppl_fp": 20.0, "ppl_q": 21.0, "ppl_increase_percent": 5.0, "text_tokens": 100, "text_top1": 0.9,
           "text_kl": 0.01, "text_cosine": 0.99, "top1": 0.91, "kl": 0.01, "cosine": 0.99, "worst_layers": layers,
           "quantized_linears": 12, "seconds": 1.0, "image_top1": 0.857, "image_kl": 0.02, "image_positions": 3,
           "text_prompt_top1": 0.75, "text_prompt_kl": 0.002, "text_prompt_positions": 4}
    return {**rep, **over}


def _tuning() -> dict:
    def row(name, stage, t, i, meets):
        return {"candidate": name, "calibration": "minmax", "stage": stage, "recipe": {}, "status": "scored",
                "score": {"ppl_increase": 0.5, "text_top1": t, "text_kl": 0.01, "image_top1": i, "image_kl": 0.02},
                "float_errors": {}, "float_linears": [], "seconds": 1.0, "meets": meets,
                "failed": [] if meets else ["x"]}

    return {"target": {"max_ppl_increase": 1.0, "min_top1": 0.95}, "chosen": "hadamard, gptq", "met": True,
            "seconds": 60.0, "notes": ["m2 not calibrated"],
            "candidates": [row("none, rtn", "screen", 0.90, 0.80, None),
                           row("m1 α=0.5, rtn", "full", 0.93, 0.96, False),
                           row("hadamard, gptq", "full", 0.97, 0.961, True)]}


def _svgs(html: str) -> list[str]:
    return re.findall(r"<svg.*?</svg>", html, flags=re.S)


# ------------------------------------------------------------------------------------------- pure page builder
def test_page_shows_the_numbers_the_worst_linear_and_every_chart():
    ranges = [{"name": f"{LM}.0.self_attn.q_proj", "lo": -2.0, "hi": 3.0, "float_lo": -2.5, "float_hi": 3.5},
              {"name": f"{LM}.0.mlp.gate_proj", "lo": -40.0, "hi": 60.0}]
    html = build_page(_report(), record={"quantized_modules": [e["name"] for e in _layers()]}, ranges=ranges,
                      tuning=_tuning())
    assert html.startswith("<!DOCTYPE html>") and not re.search(r"(src|href)=[\"']?(https?:|//)", html)
    assert "+5.00 %" in html and "20.0000 → 21.0000" in html and "0.8570 / 0.02000" in html  # Δppl, image answers
    worst = f"{LM}.1.self_attn.k_proj"  # layers[4]
    assert f"<td class=l>{worst}</td><td>1.234e-02</td>" in html  # the worst row of the table, first
    assert html.index(worst) < html.index(f"{LM}.3.self_attn.v_proj</td>")  # next worst (1.2e-3) after it
    svgs = _svgs(html)
    assert len(svgs) == 3  # per-Linear error, activation ranges, candidates
    assert "lm.1.self_attn.k_proj" in svgs[0]  # the worst Linear is labelled on its chart
    assert "lm.0.mlp.gate_proj" in svgs[1]  # the widest range is labelled
    assert "chosen: hadamard, gptq" in svgs[2] and len(re.findall(r">[123]</text>", svgs[2])) >= 3  # numbered
    assert "<td class=l>3</td><td class=l>hadamard, gptq ◀ chosen</td>" in html and "m2 not calibrated" in html
    assert min(len(re.findall(r"<path", s)) for s in svgs) > 10


def test_page_without_verify_or_tuning_has_only_what_it_was_given():
    html = build_page(None, ranges=[{"name": "vision_tower.x", "lo": -1.0, "hi": 1.0}])
    assert len(_svgs(html)) == 1 and "Summary" not in html and "candidates" not in html
    assert "no float ranges" in html
    html = build_page(_report(worst_layers=[], prompts=[]))
    assert not _svgs(html) and "Per-Linear" not in html and "Summary" in html


def test_static_range_is_the_int8_codes_times_the_scale():
    assert static_range(0.5, 0.0) == (-64.0, 63.5)
    assert static_range(0.1, -28.0) == pytest.approx((-10.0, 15.5))


def test_missing_matplotlib_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(LlavaqError, match=r"^HTML reports need matplotlib: pip install llavaq\[report\]$"):
        require_matplotlib()


def test_write_is_atomic_and_refuses_a_missing_folder(tmp_path):
    p = write_text_atomic(tmp_path / "r.html", "<html></html>")
    assert p.read_text() == "<html></html>" and sorted(f.name for f in tmp_path.iterdir()) == ["r.html"]
    umask = os.umask(0o022)
    try:
        assert write_text_atomic(tmp_path / "s.html", "x").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    finally:
        os.umask(umask)
    with pytest.raises(LlavaqError, match="does not exist"):
        write_text_atomic(tmp_path / "nope" / "r.html", "x")
    with pytest.raises(LlavaqError, match="is a directory"):
        write_text_atomic(tmp_path, "x")


# ------------------------------------------------------------------------------------------- side-by-side table
def test_compare_rows_put_text_and_image_answers_apart(tmp_path, capsys):
    a, b = _report(), _report(ppl_increase_percent=0.53, image_top1=0.961, text_prompt_top1=1.0)
    b["prompts"] = [dict(p, top1=1.0) for p in b["prompts"]]
    rows = compare_rows([a, b])
    assert rows[0] == ["perplexity Δ", "+5.00 %", "+0.53 %"]
    assert ["image answers: top-1", "0.857", "0.961"] in rows and ["text answers: top-1", "0.750", "1.000"] in rows
    assert rows[-2] == ["image: cat.jpg What is in the picture?", "top-1 1.00", "top-1 1.00"]
    assert rows[-1] == ["text: Where is the rocket?", "top-1 0.75", "top-1 1.00"]
    md = markdown(["msModelSlim", "auto"], rows)
    assert md.splitlines()[0] == "| | msModelSlim | auto |" and "| perplexity Δ | +5.00 % | +0.53 % |" in md
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert compare_main([f"ms={tmp_path / 'a.json'}", f"auto={tmp_path / 'b.json'}", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown(["ms", "auto"], rows)
    (tmp_path / "bad.json").write_text("{")
    assert compare_main([str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "invalid JSON" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------- the CLI, tiny model
def _cli(*args) -> tuple[int, str, str]:
    from llavaq.cli import main

    o, e = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["llavaq", *map(str, args)]
    try:
        with redirect_stdout(o), redirect_stderr(e):
            main()
        code = 0
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else 1
    finally:
        sys.argv = argv
    return code, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    write_test_images(d / "images", sizes=((50, 40), (36, 44)), seed=11)
    (d / "prompts.json").write_text(json.dumps([{"image": "img_00.jpg", "question": "What is in the picture?"},
                                                {"question": "Where is the rocket?"}]))
    (d / "heldout.txt").write_text(HELDOUT)
    return d


@pytest.fixture(scope="module")
def verify_page(quantized, tiny_model, eval_set, tmp_path_factory):
    """``llavaq verify --json --report page.html`` on the tiny model's msModelSlim-recipe output."""
    page = tmp_path_factory.mktemp("page") / "report.html"
    code, out, err = _cli("verify", "--model_path", tiny_model, "--quantized", quantized[1].save_directory,
                          "--prompts", eval_set / "prompts.json", "--images", eval_set / "images",
                          "--text", eval_set / "heldout.txt", "--json", "--report", page)
    assert code == 0, err
    return page, json.loads(out)


def test_verify_report_page_has_every_linear_and_the_cache_ranges(verify_page):
    page, rep = verify_page
    html = page.read_text()
    assert len(rep["worst_layers"]) == 10 and rep["quantized_linears"] == 26  # --json still lists the worst 10
    worst = rep["worst_layers"][0]
    assert f"<td class=l>{worst['name']}</td><td>{worst['rel_mse']:.3e}</td>" in html
    assert "(all 26)" in html and f"{rep['ppl_increase_percent']:+.2f} %" in html
    layer_svg, range_svg = _svgs(html)
    assert len(re.findall(r"<path", layer_svg)) > 26  # a marker (and a stem) per Linear
    assert "float range (calibration)" in range_svg  # the record's session cache is still there
    assert [f.name for f in page.parent.iterdir()] == ["report.html"]


def test_compare_verifies_outputs_with_one_float_reference_like_verify(verify_page, quantized, tiny_model, eval_set,
                                                                        tmp_path, capsys):
    page, rep = verify_page
    (tmp_path / "v.json").write_text(json.dumps(rep))
    out = quantized[1].save_directory
    assert compare_main([f"verify={tmp_path / 'v.json'}", f"again={out}", f"page={out}", "--model_path",
                         str(tiny_model), "--prompts", str(eval_set / "prompts.json"), "--images",
                         str(eval_set / "images"), "--text", str(eval_set / "heldout.txt"), "--markdown",
                         "--report", str(tmp_path / "p.html")]) == 0
    rows = [[c.strip() for c in r.strip(" |").split(" | ")][1:] for r in capsys.readouterr().out.splitlines()[2:]]
    assert rows[0] == ["m2, rtn"] * 3  # the recipe, from the output's record
    assert len(rows) == 10 and all(r[0] == r[1] == r[2] for r in rows[1:])  # the same numbers, float side shared
    assert f"{rep['worst_layers'][0]['rel_mse']:.3e}" in (tmp_path / "p.html").read_text()
    assert compare_main([f"x={out}"]) == 2 and "--model_path is needed" in capsys.readouterr().err


def test_report_to_a_missing_folder_fails_before_verifying(quantized, tiny_model, tmp_path):
    code, _, err = _cli("verify", "--model_path", tiny_model, "--quantized", quantized[1].save_directory,
                        "--report", tmp_path / "no" / "r.html")
    assert code != 0 and err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err


def test_auto_report_has_the_candidate_scatter(tiny_model, calib_dir, eval_set, tmp_path, monkeypatch):
    from llavaq import tuning

    monkeypatch.setattr(tuning, "CALIBRATIONS", tuple(c for c in tuning.CALIBRATIONS if c.name == "minmax"))
    monkeypatch.setattr(tuning, "CANDIDATES", tuple(c for c in tuning.CANDIDATES
                                                    if c.name in ("none, rtn", "m1 α=0.5, rtn")))
    page = tmp_path / "auto.html"
    code, _, err = _cli("quantize", "--model_path", tiny_model, "--calib_images", calib_dir, "--save_directory",
                        tmp_path / "out", "--recipe", "auto", "--max_ppl_increase", "1e9", "--min_top1", "0",
                        "--cache_dir", tmp_path / "cache", "--device_type", "cpu", "--eval_prompts",
                        eval_set / "prompts.json", "--eval_images", eval_set / "images", "--eval_text",
                        eval_set / "heldout.txt", "--report", page)
    assert code == 0, err
    doc = json.loads((tmp_path / "out" / "llavaq_tuning.json").read_text())
    html = page.read_text()
    svgs = _svgs(html)
    assert len(svgs) == 3 and f"chosen: {doc['chosen']}" in svgs[2]
    assert f"{doc['chosen']} ◀ chosen</td>" in html
    code, _, err = _cli("quantize", "--model_path", tiny_model, "--calib_images", calib_dir, "--save_directory",
                        tmp_path / "o2", "--report", page)
    assert code != 0 and "--report applies to --recipe auto only" in err


# ------------------------------------------------------------------------------------------- a real browser
def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _chromium(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_browser_draws_the_page(verify_page, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium; CI installs it)")
    import numpy as np
    from PIL import Image

    page, rep = verify_page
    png = tmp_path / "shot.png"
    run = _chromium(browser, tmp_path, f"--screenshot={png}", "--window-size=1280,2400", page.as_uri())
    assert png.is_file(), run.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    assert img.shape == (2400, 1280) and img.std() > 20  # not a blank page
    assert (img < 128).mean() > 0.005  # ink: text, markers, axes
    dom = _chromium(browser, tmp_path, "--dump-dom", page.as_uri()).stdout
    svgs = _svgs(dom)
    assert len(svgs) == 2 and all(len(re.findall(r"<path", s)) > 26 for s in svgs)
    assert "Per-Linear W8A8 error" in dom and "Per-tensor static activation ranges" in dom
    assert rep["worst_layers"][0]["name"] in dom
