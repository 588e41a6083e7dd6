"""Issue 23: the layer-streamed ``verify`` reports exactly the numbers of the whole-model ``verify`` it replaced.

``data/verify_before_streaming.json`` holds every number of the reports the whole-model implementation
(float model in fp32 + a deep copy with emulated Linears) gave on these inputs, frozen on commit a021edf
with ``LLAVAQ_FREEZE_VERIFY=1``. Each case also freezes the sha256 of the output it verified: when an export
changes, the case says so instead of comparing numbers of another model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from llavaq import api
from llavaq.recipe import QuantRecipe
from llavaq.testing import write_test_images
from llavaq.verify import verify

FROZEN = Path(__file__).parent / "data" / "verify_before_streaming.json"
FREEZE = os.environ.get("LLAVAQ_FREEZE_VERIFY") == "1"
REL = 1e-6
HELDOUT = ("A rocket stands on the launch pad under a blue sky. The cat sat on the table next to a cup of "
           "coffee, and the quick brown fox jumps over the lazy dog. ") * 8


@pytest.fixture(scope="module")
def frozen_eval(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_frozen")
    write_test_images(d / "images", sizes=((50, 40), (36, 44)), seed=5)
    (d / "prompts.json").write_text(json.dumps([{"image": "img_00.jpg", "question": "What is in the picture?"},
                                                {"image": "img_01.png", "question": "How many colours?"},
                                                {"question": "Where is the rocket?"}]))
    (d / "heldout.txt").write_text(HELDOUT)
    return d


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _numbers(rep) -> dict:
    d = rep.to_dict()
    for k in ("model_path", "quantized", "seconds", "range_drivers"):
        d.pop(k)
    return d


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and (math.isclose(got, want, rel_tol=REL, abs_tol=1e-12)
                                           or (math.isnan(got) and math.isnan(want))), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _check(case: str, out: Path, reports: dict) -> None:
    frozen = json.loads(FROZEN.read_text()) if FROZEN.is_file() else {}
    got = {"output_sha256": _digest(out), "reports": {k: _numbers(r) for k, r in reports.items()}}
    if FREEZE:
        frozen[case] = json.loads(json.dumps(got))
        FROZEN.write_text(json.dumps(frozen, indent=1, sort_keys=True) + "\n")
        return
    want = frozen[case]
    assert got["output_sha256"] == want["output_sha256"], f"{case}: the export changed; frozen numbers are of another"
    _assert_close(json.loads(json.dumps(got["reports"])), want["reports"], case)


def _export(model: Path, calib: Path, out: Path, cache: Path, **recipe) -> Path:
    _, res = api.quantize(model, calib, out, cache_dir=cache, device_type="cpu", recipe=QuantRecipe(**recipe))
    return Path(res.save_directory)


def _kw(e: Path) -> dict:
    return dict(images=e / "images", prompts=e / "prompts.json", text=e / "heldout.txt", answer_tokens=4,
                ppl_window=64)


def test_tiny_gqa_reports_equal_the_whole_model_verify(tiny_model, calib_dir, frozen_eval, tmp_path):
    out = _export(tiny_model, calib_dir, tmp_path / "out", tmp_path / "cache")
    reports = {m: verify(tiny_model, out, mode=m, **_kw(frozen_eval)) for m in ("static", "dynamic", "weight_only")}
    _check("tiny_gqa", out, reports)


def test_rotated_smooth_vo_tied_reports_equal_the_whole_model_verify(tiny_model_tied, calib_dir, frozen_eval,
                                                                     tmp_path):
    out = _export(tiny_model_tied, calib_dir, tmp_path / "out", tmp_path / "cache", rotation="hadamard",
                  smooth_vo=True, anti_outlier="m1", alpha=0.5)
    _check("tiny_tied_rotated_vo", out, {"static": verify(tiny_model_tied, out, **_kw(frozen_eval))})


def test_demo_model_report_equals_the_whole_model_verify(demo_build, calib_dir, tmp_path):
    out = _export(demo_build[0], calib_dir, tmp_path / "out", tmp_path / "cache")
    _check("demo", out, {"static": verify(demo_build[0], out, answer_tokens=8, max_text_tokens=512)})
