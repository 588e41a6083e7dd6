"""The compressed-tensors export run by the newest transformers vs `llavaq verify`'s emulation: perplexity.

    python benchmarks/interop_ppl.py --model demo/llava-smollm2-demo --export demo/out-ct \\
        [--interop_python .venv-interop/bin/python] [--markdown docs/BENCHMARKS.md]

The export (``llavaq quantize --format compressed-tensors``) is loaded with plain
``LlavaForConditionalGeneration.from_pretrained`` by ``tests/interop/interop_runner.py`` in the interop venv
(``make interop-env``), in float32 and in the checkpoint dtype, and scored on the held-out text
(``llavaq/data/eval/heldout.txt``) in exactly ``verify``'s 256-token windows
(:func:`llavaq.verify.perplexity_windows`); llavaq's side is ``verify``'s float model and its integer-exact
emulation of the same export on the same windows.
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
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report import machine_line, write_section  # noqa: E402


def emulated_ppl(model: Path, export: Path, windows: list[torch.Tensor]) -> tuple[float, float, float]:
    from llavaq.verify import build_quantized_model, load_float_model, read_quantized_output

    fp = load_float_model(model)
    qm = build_quantized_model(fp, read_quantized_output(export))
    nll_f = nll_q = 0.0
    n = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            x = w.unsqueeze(0)
            tgt = x[0, 1:]
            nll_f += float(F.cross_entropy(fp(input_ids=x).logits[0, :-1].double(), tgt, reduction="sum"))
            nll_q += float(F.cross_entropy(qm(input_ids=x).logits[0, :-1].double(), tgt, reduction="sum"))
            n += tgt.numel()
    return math.exp(nll_f / n), math.exp(nll_q / n), time.perf_counter() - t0


def vllm_cuda_zero_points(export: Path) -> tuple[int, int]:
    """(Linears whose zero point vLLM's CUDA int8 kernels rebuild one off, all W8A8 Linears).

    vLLM 0.33.0 ``kernels/linear/scaled_mm/cutlass.py`` (and ``triton.py``) turn the per-tensor scale and zero
    point back into a range and then into ``azp = (-128 - range_min / scale).to(int32)``: a truncation.
    """
    from llavaq.formats.reader import read_quantized

    view = read_quantized(export)
    off = 0
    for name in view.quantized:
        lv = view.linear(name)
        s, azps = lv.input_scale.float(), lv.input_offset.to(torch.int32)
        range_max = (s * (127 - azps)).max()
        range_min = (s * (-128 - azps)).min()
        scale = (range_max - range_min) / 255
        azp = (-128 - range_min / scale).to(torch.int32)
        off += int(azp.item() != int(lv.input_offset.item()))
    return off, len(view.quantized)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--export", type=Path, required=True, help="a compressed-tensors export of --model")
    ap.add_argument("--interop_python", default=str(ROOT / ".venv-interop" / "bin" / "python"))
    ap.add_argument("--text", type=Path, default=None, help="held-out text (default: verify's shipped one)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the section into this file")
    a = ap.parse_args(argv)

    from llavaq.calib.samples import load_processor
    from llavaq.verify import load_heldout_text, perplexity_windows

    tok = load_processor(a.model).tokenizer
    windows = perplexity_windows(tok, load_heldout_text(a.text))
    with tempfile.TemporaryDirectory() as td:
        wfile = Path(td) / "windows.safetensors"
        save_file({f"w{i}": w.contiguous() for i, w in enumerate(windows)}, str(wfile))
        jobs = [{"name": dt, "model": str(a.export), "dtype": dt, "windows": str(wfile)} for dt in ("float32", "auto")]
        (Path(td) / "jobs.json").write_text(json.dumps(jobs))
        t0 = time.perf_counter()
        proc = subprocess.run([a.interop_python, str(ROOT / "tests" / "interop" / "interop_runner.py"), "--jobs",
                               str(Path(td) / "jobs.json")], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"interop runner failed:\n{proc.stderr[-3000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        t_theirs = time.perf_counter() - t0
    ppl_fp, ppl_emul, t_ours = emulated_ppl(a.model, a.export, windows)
    res = {"windows": len(windows), "tokens": theirs[0]["tokens"], "ppl_fp": ppl_fp, "ppl_emulated": ppl_emul,
           "transformers": theirs[0]["transformers"], "compressed_tensors": theirs[0]["compressed_tensors"],
           "seconds_interop": t_theirs, "seconds_emulated": t_ours}
    for r in theirs:
        assert not r["missing_keys"] and not r["unexpected_keys"] and r["finite"], r
        res[f"ppl_transformers_{r['dtype']}"] = math.exp(r["nll_sum"] / r["tokens"])
    res["gap_percent_float32"] = (res["ppl_transformers_float32"] / ppl_emul - 1) * 100
    res["vllm_cuda_zero_point_off_by_one"], res["w8a8_linears"] = vllm_cuda_zero_points(a.export)
    print(json.dumps(res, indent=1))
    if a.markdown:
        write_section(a.markdown, markdown(res, a.model, a.export))
    return 0


def _recipe_line(export: Path) -> str:
    rec = json.loads((export / "llavaq_record.json").read_text()).get("recipe", {})
    keys = ("anti_outlier", "act_method", "modules", "m2_search")
    text = ", ".join(f"{k}={rec.get(k)}" for k in keys)
    default = (rec.get("anti_outlier"), rec.get("act_method"), rec.get("modules")) == ("m2", 2, "msmodelslim")
    return text + (" (the default: msModelSlim's recipe)" if default else "")


def markdown(r: dict, model: Path, export: Path) -> str:
    import datetime

    f16 = r.get("ppl_transformers_float16")
    return "\n".join([
        "## Interop: the compressed-tensors export in the newest transformers",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line()}. Command: `python benchmarks/interop_ppl.py "
        f"--model {model} --export {export} --markdown docs/BENCHMARKS.md` (after `make interop-env` and "
        f"`llavaq quantize --format compressed-tensors` on `calibImages/`). Recipe: {_recipe_line(export)}.",
        f"The demo model's export loaded with plain `LlavaForConditionalGeneration.from_pretrained` in transformers "
        f"{r['transformers']} + compressed-tensors {r['compressed_tensors']} (no MISSING/UNEXPECTED keys), "
        f"perplexity on `llavaq/data/eval/heldout.txt` in `verify`'s {r['windows']} windows of 256 tokens "
        f"({r['tokens']} predicted tokens), vs `llavaq verify`'s integer-exact emulation of the same files:",
        "",
        "| model | perplexity | vs FP |",
        "|---|---|---|",
        f"| FP (float32, transformers 4.37.2) | {r['ppl_fp']:.4f} | |",
        f"| W8A8, `verify`'s emulation (float32) | {r['ppl_emulated']:.4f} | "
        f"{(r['ppl_emulated'] / r['ppl_fp'] - 1) * 100:+.2f} % |",
        f"| W8A8, transformers {r['transformers']} `from_pretrained(dtype=float32)` | "
        f"{r['ppl_transformers_float32']:.4f} | {(r['ppl_transformers_float32'] / r['ppl_fp'] - 1) * 100:+.2f} % |",
        *([f"| W8A8, transformers {r['transformers']} default dtype (float16) | {f16:.4f} | "
           f"{(f16 / r['ppl_fp'] - 1) * 100:+.2f} % |"] if f16 else []),
        "",
        f"transformers vs the emulation (float32): **{r['gap_percent_float32']:+.3f} %** (within 1 %: compressed-"
        "tensors decompresses W_q·ws and fake-quantizes every W8A8 input with the file's float32 scale and int8 "
        "zero point, the emulation multiplies the integers exactly: the same arithmetic up to float rounding and the "
        "two transformers versions' float code, which flip a few int8 codes across the layers). In the "
        "checkpoint's float16, compressed-tensors also casts `input_scale` to float16, which moves the "
        "quantization grid slightly.",
        "",
        f"vLLM (from its source, not run: no GPU): its CUDA int8 kernels would rebuild the zero point of "
        f"{r['vllm_cuda_zero_point_off_by_one']} of these {r['w8a8_linears']} W8A8 Linears one off (the truncation "
        "described in README \"Output formats\"), shifting their clamping window by one code.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
