"""Issue 30 / 26: the same exports read by every client: `verify`'s emulation, vLLM (CPU), the newest transformers.

    python benchmarks/format_clients.py --model MODEL --exports DIR [DIR ...] --out RESULTS.json \\
        [--vllm_python .venv-vllm/bin/python] [--interop_python .venv-interop/bin/python] [--no_vllm]

For the float model and each compressed-tensors export: held-out perplexity (``llavaq/data/eval/heldout.txt``) in
``verify``'s 256-token windows and in one full-context window (the paragraph), read by

* ``verify``'s integer-exact emulation (float32; the float model: transformers 4.37.2 in float32);
* vLLM, ``LLM(dtype="float32")`` (and ``dtype="float16"`` for ``--vllm_float16`` exports), ``prompt_logprobs``
  (``llavaq/runners/vllm_runner.py``),
  with its top-1 token compared with the emulation's (the float model's: with transformers 4.37.2's);
* the newest transformers + compressed-tensors, ``from_pretrained`` in float32 and in the checkpoint dtype
  (``tests/interop/interop_runner.py``).

Every client runs in its own venv as a subprocess; llavaq imports none of them.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def ours(model: Path, export: Path | None, windows: list[torch.Tensor], fp=None) -> tuple[float, list[torch.Tensor]]:
    """(perplexity, argmax per window) of the emulation of ``export`` (None: the float model)."""
    from llavaq.verify import build_quantized_model, read_quantized_output

    m = fp if export is None else build_quantized_model(fp, read_quantized_output(export), mode="static")
    nll, n, top = 0.0, 0, []
    for w in windows:
        lq = m(input_ids=w.unsqueeze(0)).logits[0, :-1].double()
        nll += float(F.cross_entropy(lq, w[1:], reduction="sum"))
        n += w.numel() - 1
        top.append(lq.argmax(-1))
    return math.exp(nll / n), top


def vllm_side(dirs: list[Path], wfile: Path, splits: dict[str, range], python: str, work: Path,
              fp16: list[Path]) -> dict:
    from llavaq.verify.engine import run_vllm_jobs

    jobs = [{"name": f"{d.name}:{dt}", "model": str(d.resolve()), "dtype": dt, "windows": str(wfile)}
            for d in dirs for dt in (("float32", "float16") if d in fp16 else ("float32",))]
    t0 = time.perf_counter()
    res = run_vllm_jobs(jobs, work, python=python, timeout=3000)
    out = {"seconds": time.perf_counter() - t0}
    for j, r in zip(jobs, res, strict=True):
        if "error" in r:
            out[j["name"]] = {"error": r["error"].splitlines()[0][:300]}
            continue
        row = {"vllm": r["vllm"], "quantization": r.get("quantization")}
        for key, idx in splits.items():
            nll = sum(sum(r["nll"][i]) for i in idx)
            n = sum(len(r["nll"][i]) for i in idx)
            row[f"ppl_{key}"] = math.exp(nll / n)
        row["top1_ids"] = r["top1"]
        out[j["name"]] = row
    return out


def transformers_side(dirs: list[Path], files: dict[str, Path], python: str, work: Path) -> dict:
    jobs = [{"name": f"{d.name}:{dt}:{key}", "model": str(d.resolve()), "dtype": dt, "windows": str(f)}
            for d in dirs for dt in ("float32", "auto") for key, f in files.items()]
    (work / "tjobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([python, str(ROOT / "tests" / "interop" / "interop_runner.py"), "--jobs",
                           str(work / "tjobs.json")], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict = {}
    for j, r in zip(jobs, res, strict=True):
        d, dt, key = j["name"].split(":")
        row = out.setdefault(f"{d}:{dt}", {"transformers": r.get("transformers")})
        if r.get("tokens"):
            row[f"ppl_{key}"] = math.exp(r["nll_sum"] / r["tokens"])
            row["missing_or_unexpected"] = len(r.get("missing_keys", [])) + len(r.get("unexpected_keys", []))
        else:
            row[f"error_{key}"] = str(r.get("error", r))[:300]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--exports", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--interop_python", default=str(ROOT / ".venv-interop" / "bin" / "python"))
    ap.add_argument("--no_vllm", action="store_true")
    ap.add_argument("--vllm_float16", type=Path, nargs="*", default=[], help="exports vLLM also runs in float16")
    ap.add_argument("--no_transformers", action="store_true")
    a = ap.parse_args(argv)

    from llavaq.calib.samples import load_processor
    from llavaq.verify import load_float_model, load_heldout_text, perplexity_windows
    from llavaq.verify.engine import save_windows

    tok = load_processor(a.model).tokenizer
    text = load_heldout_text(None)
    w256, wfull = perplexity_windows(tok, text, 256), perplexity_windows(tok, text, 4096)
    windows = w256 + wfull
    splits = {"256": range(len(w256)), "full": range(len(w256), len(windows))}
    dirs = [a.model, *a.exports]
    results: dict = {"tokens_256": sum(w.numel() - 1 for w in w256), "tokens_full": sum(w.numel() - 1 for w in wfull)}
    fp = load_float_model(a.model)
    tops = {}
    for d in dirs:
        export = None if d == a.model else d
        row = {}
        for key, idx in splits.items():
            row[f"ppl_{key}"], top = ours(a.model, export, [windows[i] for i in idx], fp)
            tops.setdefault(d.name, []).extend(top)
        results[f"{d.name}:verify"] = row
        print(d.name, row, flush=True)
    with tempfile.TemporaryDirectory(prefix="llavaq-clients-") as td:
        work = Path(td)
        wfile = save_windows(windows, work / "windows.safetensors")
        files = {"256": save_windows(w256, work / "w256.safetensors"),
                 "full": save_windows(wfull, work / "wfull.safetensors")}
        if not a.no_vllm:
            v = vllm_side(dirs, wfile, splits, a.vllm_python, work, a.vllm_float16)
            for name, row in v.items():
                ids = row.pop("top1_ids", None) if isinstance(row, dict) else None
                if ids is not None:
                    ref = tops[name.split(":")[0]]
                    agree = sum(int((t == torch.tensor(i)).sum()) for t, i in zip(ref, ids, strict=True))
                    row["top1_vs_ours"] = agree / sum(len(i) for i in ids)
                results[f"{name}" if ":" in name else name] = row
                print(name, row, flush=True)
        if not a.no_transformers:
            for name, row in transformers_side(dirs, files, a.interop_python, work).items():
                results[f"{name}:transformers" if ":" in name else name] = row
                print(name, row, flush=True)
    a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
