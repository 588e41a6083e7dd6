"""llavaq/verify/engine.py without vLLM: reading a runner result, and the one-line errors."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from llavaq.errors import LlavaqError
from llavaq.verify.engine import find_vllm_python, text_scores


def test_text_scores_from_a_runner_result():
    windows = [torch.tensor([1, 5, 6, 7]), torch.tensor([1, 8, 9])]
    # float logits whose argmax is 2 everywhere but the last position
    lf = [torch.zeros(3, 10), torch.zeros(2, 10)]
    for x in lf:
        x[:, 2] = 1.0
    lf[1][1, 2], lf[1][1, 4] = 0.0, 1.0
    result = {"nll": [[0.5, 1.0, 1.5], [2.0, 0.0]], "top1": [[2, 2, 3], [2, 4]]}
    s = text_scores(result, lf, windows)
    assert s["tokens"] == 5 and s["top1"] == pytest.approx(4 / 5)
    assert s["ppl"] == pytest.approx(math.exp(5.0 / 5))
    with pytest.raises(LlavaqError, match="scored 4 positions, expected 5"):
        text_scores({"nll": [[0.5, 1.0], [2.0, 0.0]], "top1": [[2, 2], [2, 4]]}, lf, windows)
    with pytest.raises(LlavaqError, match="vLLM could not run the export: ValueError: bad"):
        text_scores({"error": "ValueError: bad\\nmore"}, lf, windows)


def test_missing_vllm_python_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVAQ_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(LlavaqError, match="make vllm-env"):
        find_vllm_python()


def test_cli_engine_errors_are_one_line(quantized, tiny_model, tmp_path):
    _, res = quantized
    base = [sys.executable, "-m", "llavaq", "verify", "--model_path", str(tiny_model), "--quantized",
            str(res.save_directory)]
    for extra, msg in ((["--engine", "trt"], "--engine must be one of emulation, vllm"),
                       (["--engine", "vllm", "--vllm_python", str(tmp_path / "python")], "vLLM python not found")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and msg in proc.stderr + proc.stdout, proc.stderr
        assert "Traceback" not in proc.stderr
