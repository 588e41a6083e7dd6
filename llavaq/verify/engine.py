"""``llavaq verify --engine vllm``: the held-out text's perplexity and top-1 agreement measured through vLLM.

llavaq never imports vLLM. It runs ``llavaq/runners/vllm_runner.py`` with the python of a vLLM venv (``make
vllm-env`` builds ``.venv-vllm``; ``--vllm_python`` or ``LLAVAQ_VLLM_PYTHON`` names it), which loads the export
with ``vllm.LLM`` and returns, for every held-out window that ``verify`` scores (:func:`perplexity_windows`), each
token's NLL from ``prompt_logprobs`` and vLLM's top-1 token. The float model runs here, as in ``verify``; the
report is the same :class:`FidelityReport` with the quantized side measured by vLLM: ``ppl_q`` and ``text_top1``
(FP's argmax == vLLM's top-1). vLLM returns the top-1 only, not the whole distribution, so KL and cosine are NaN.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llavaq.calib.samples import load_processor
from llavaq.errors import LlavaqError
from llavaq.model.loading import open_model
from llavaq.verify.data import load_heldout_text
from llavaq.verify.metrics import FidelityReport, perplexity_windows
from llavaq.verify.outputs import read_quantized_output
from llavaq.verify.streamed import float_window_logits, tmp_root

ENGINES = ("emulation", "vllm")
RUNNER = Path(__file__).parent.parent / "runners" / "vllm_runner.py"
#: environment for the runner: one process (no engine subprocess), a small KV cache, no hub access
#: (a max_model_len a job names may pass the config's by one: the scored window's extra generated token)
RUNNER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
              "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
              "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONWARNINGS": "ignore"}


def default_vllm_python() -> Path:
    """``LLAVAQ_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the current directory."""
    return Path(os.environ.get("LLAVAQ_VLLM_PYTHON") or Path.cwd() / ".venv-vllm" / "bin" / "python")


def find_vllm_python(explicit: str | Path | None = None) -> Path:
    py = Path(explicit) if explicit else default_vllm_python()
    if not py.is_file():
        raise LlavaqError(f"vLLM python not found at {py}: build the vLLM venv (`make vllm-env`) and pass "
                          "--vllm_python or set LLAVAQ_VLLM_PYTHON")
    return py


def run_vllm_jobs(jobs: list[dict], work: str | Path, *, python: str | Path | None = None, generate: int = 8,
                  timeout: float | None = None) -> list[dict]:
    """Run ``jobs`` (see the runner's docstring) in ONE vLLM process; return each job's result object.

    A job that vLLM could not load or run comes back with an ``error`` key.
    """
    py = Path(os.path.abspath(find_vllm_python(python)))  # not resolve(): a venv's python is a symlink
    work = Path(work)
    jobs = [{**j, "out": j.get("out") or str(work / f"job{i}.json")} for i, j in enumerate(jobs)]
    (work / "jobs.json").write_text(json.dumps(jobs))
    cmd = [str(py), str(RUNNER), "--jobs", str(work / "jobs.json"), "--generate", str(generate)]
    env = {**os.environ, **RUNNER_ENV}
    env.pop("PYTHONPATH", None)  # the runner must not see llavaq's pins (transformers 4.37.2)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(work))
    except subprocess.TimeoutExpired as e:
        raise LlavaqError(f"vLLM runner timed out after {timeout:g} s") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise LlavaqError(f"vLLM runner failed (exit {proc.returncode}): {tail[0][:500]}")
    out = []
    for j in jobs:
        path = Path(j["out"])
        out.append(json.loads(path.read_text()) if path.is_file() else {"error": "no result written"})
    return out


def save_windows(windows: list[torch.Tensor], path: str | Path) -> Path:
    save_file({f"w{i}": w.contiguous() for i, w in enumerate(windows)}, str(path))
    return Path(path)


def text_scores(result: dict, float_logits: list[torch.Tensor], windows: list[torch.Tensor]) -> dict:
    """The quantized side's perplexity and top-1 agreement from a runner result, against float logits (one
    [len-1, vocab] tensor per window, or the emulation's)."""
    if "error" in result:
        raise LlavaqError(f"vLLM could not run the export: {result['error'].splitlines()[0][:500]}")
    nll = sum(sum(x) for x in result["nll"])
    n = sum(len(x) for x in result["nll"])
    expected = sum(w.numel() - 1 for w in windows)
    if n != expected:
        raise LlavaqError(f"vLLM scored {n} positions, expected {expected}")
    agree = sum(int((lf.argmax(-1) == torch.tensor(t)).sum()) for lf, t in zip(float_logits, result["top1"],
                                                                                  strict=True))
    return {"ppl": math.exp(nll / n), "top1": agree / n, "tokens": n}


@torch.no_grad()
def verify_vllm(model_path: str | Path, quantized_dir: str | Path, *, text: str | Path | None = None,
                vllm_python: str | Path | None = None, ppl_window: int = 256, max_text_tokens: int = 4096,
                ) -> FidelityReport:
    """``verify``'s held-out text numbers with the quantized side run by vLLM (see the module docstring)."""
    t0 = time.perf_counter()
    py = find_vllm_python(vllm_python)
    q = read_quantized_output(quantized_dir)
    if q.format != "compressed-tensors":
        raise LlavaqError(f"--engine vllm runs compressed-tensors outputs; {quantized_dir} is {q.format} "
                          "(export with --format compressed-tensors)")
    heldout = load_heldout_text(text)
    if heldout is None:
        raise LlavaqError("--engine vllm scores held-out text: pass --text (the shipped held-out set is not installed)")
    windows = perplexity_windows(load_processor(model_path).tokenizer, heldout, ppl_window, max_text_tokens)
    if not windows:
        raise LlavaqError("held-out text is too short for perplexity (needs at least 2 tokens)")
    with tempfile.TemporaryDirectory(prefix="llavaq-vllm-") as tmp:
        # prompt_logprobs needs one generated token after the window: room for it past a full-length window
        job = {"name": "verify", "model": str(Path(quantized_dir).resolve()),
               "max_model_len": max(w.numel() for w in windows) + 1,
               "windows": str(save_windows(windows, Path(tmp) / "windows.safetensors"))}
        result = run_vllm_jobs([job], tmp, python=py)[0]
    lfs = float_window_logits(open_model(model_path), windows, Path(tmp_root()))
    nll_f = sum(float(F.cross_entropy(lf, w[1:], reduction="sum")) for lf, w in zip(lfs, windows, strict=True))
    s = text_scores(result, lfs, windows)
    nan = float("nan")
    return FidelityReport(
        model_path=str(model_path), quantized=str(quantized_dir), format=q.format,
        mode=f"vllm {result.get('vllm', '?')} (held-out text only)", prompts=[], ppl_fp=math.exp(nll_f / s["tokens"]),
        ppl_q=s["ppl"], text_tokens=s["tokens"], text_top1=s["top1"], text_kl=nan, text_cosine=nan, top1=s["top1"],
        kl=nan, cosine=nan, worst_layers=[], quantized_linears=len(q.linears), seconds=time.perf_counter() - t0)
