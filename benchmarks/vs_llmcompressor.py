"""llavaq's W8A8 recipes side by side with llm-compressor's, on one model and the same calibration inputs.

    python benchmarks/vs_llmcompressor.py --model DIR --llmc_python .venv-llmc/bin/python \\
        [--work DIR] [--markdown docs/BENCHMARKS.md] [--llavaq "LABEL=key=value,key=value" ...] \\
        [--llmc gptq rtn] [--photos_only] [--eval DIR] [--auto [--auto_time_budget MIN]]

* Calibration inputs (both tools): the photos of ``--calib_images`` with llavaq's prompt
  (``USER: <image>\\nDescribe this image in detail. ASSISTANT:``) and, unless ``--photos_only``, the text-only
  prompts of ``llavaq/data/calib_text.json``, encoded once by llavaq (``llavaq.calib.samples``) and handed to
  llm-compressor as a safetensors file, so both see the same tokens and pixels.
* llm-compressor runs in its own venv (``scripts/setup_llmc_env.sh``) through ``benchmarks/llmc_runner.py``
  (SmoothQuant α then GPTQ or round-to-nearest, int8 per-channel symmetric weights, static per-tensor
  asymmetric int8 inputs, language-model q,k,v,o,gate,up; llavaq never imports it). Its compressed-tensors
  output is read by llavaq's own reader (``llavaq.formats.reader``), which needs no key mapping: transformers 5
  saves LLaVA under the 4.37 checkpoint names.
* llavaq: one ``calibrate`` (``--anti_outlier none --act_method 1 --modules language_only`` + the input moments
  GPTQ needs), then every recipe of ``--llavaq`` is exported from that cache (no forward pass). A recipe is
  ``LABEL=field=value,field=value`` with :class:`llavaq.QuantRecipe` field names, e.g.
  ``"m1 α 0.8 + GPTQ=anti_outlier=m1,alpha=0.8,weight_method=gptq"``; adding a recipe is one argument.
* ``--auto``: ``quantize --recipe auto`` on the same photos and prompts (``--modules language_only``, evaluated on
  the ``--eval`` set, its own session caches under WORK), its choice scored like every row and its whole tuning
  table kept in the JSON results (the choice is selected on the very set it is then scored on).
* ``--eval DIR``: the evaluation set (``DIR/prompts.json``, ``DIR/images``, ``DIR/heldout.txt``; default the
  shipped one), e.g. ``benchmarks/second_model.py``'s.
* Every output is scored by ``llavaq.verify`` on the shipped held-out set (``llavaq/data/eval/``) against one
  float model and one float reference: held-out paragraph (perplexity, top-1, KL), text-only prompts' answers
  and image prompts' answers apart (top-1, KL each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from report import machine_line, write_section  # noqa: E402

from llavaq import api  # noqa: E402
from llavaq.calib.images import load_images  # noqa: E402
from llavaq.calib.prompts import read_text_prompts  # noqa: E402
from llavaq.calib.samples import image_sample, load_processor, text_samples  # noqa: E402
from llavaq.recipe import QuantRecipe  # noqa: E402
from llavaq.safety import TOKENIZER_FILES  # noqa: E402
from llavaq.verify import FidelityReport, verify  # noqa: E402

DATA = REPO / "llavaq" / "data"
#: llavaq's recipes in the default run: SmoothQuant min-max (α 0.8 = llm-compressor's, α 0.5, searched per
#: group), each with round-to-nearest and with GPTQ weights; all derived from one calibration
DEFAULT_RECIPES = (
    "m1 α 0.8=anti_outlier=m1,alpha=0.8",
    "m1 α 0.8, smooth_stat range=anti_outlier=m1,alpha=0.8,smooth_stat=range",
    "m1 α 0.5=anti_outlier=m1,alpha=0.5",
    "m1 auto-α=anti_outlier=m1,alpha=auto",
    "m1 α 0.8 + GPTQ=anti_outlier=m1,alpha=0.8,weight_method=gptq",
    "m1 α 0.5 + GPTQ=anti_outlier=m1,alpha=0.5,weight_method=gptq",
    "m1 auto-α + GPTQ=anti_outlier=m1,alpha=auto,weight_method=gptq",
)


def parse_recipe(spec: str, base: QuantRecipe) -> tuple[str, QuantRecipe]:
    """``LABEL=field=value,field=value`` -> (label, base with those fields replaced)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label.strip():
        raise SystemExit(f"--llavaq {spec!r}: expected LABEL=field=value,...")
    changes: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--llavaq {spec!r}: {item!r} is not field=value")
        changes[key.strip()] = _value(value.strip())
    return label.strip(), base.replace(**changes)


def _value(v: str) -> object:
    if v in ("true", "false"):
        return v == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def write_samples(model: Path, calib_images: Path, text_prompts: tuple[str, ...], path: Path) -> list[str]:
    """llavaq's calibration samples (photos sorted by name, then text prompts) as a safetensors file."""
    from safetensors.torch import save_file

    processor = load_processor(model)
    loaded = load_images(calib_images, lambda im, p: image_sample(processor, im, QuantRecipe().prompt, p.name))
    samples = loaded.images + text_samples(processor, text_prompts)
    tensors = {}
    for i, s in enumerate(samples):
        tensors[f"{i}.input_ids"] = s.input_ids.contiguous()
        tensors[f"{i}.attention_mask"] = s.attention_mask.contiguous()
        if s.pixel_values is not None:
            tensors[f"{i}.pixel_values"] = s.pixel_values.float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return [s.label for s in samples]


def run_llmc(python: str, model: Path, samples: Path, out: Path, method: str, alpha: float, order: str,
             seed: int, log: Path, group_size: int = 128) -> dict:
    cmd = [python, str(HERE / "llmc_runner.py"), "--model", str(model), "--samples", str(samples), "--out", str(out),
           "--method", method, "--alpha", str(0 if method == "w4a16" else alpha), "--order", order, "--seed",
           str(seed), "--group_size", str(group_size)]
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise SystemExit(f"llm-compressor {method} failed (exit {rc}): {tail[0][:300]} (log: {log})")
    info = json.loads(log.read_text(errors="replace").strip().splitlines()[-1])
    info.update(wall_s=round(wall, 1), cpu_s=round(ru.ru_utime + ru.ru_stime, 1), peak_rss_bytes=ru.ru_maxrss * 1024)
    return info


@dataclass
class Row:
    tool: str
    label: str
    seconds: float | None
    scores: dict
    note: str = ""


def scores(r: FidelityReport) -> dict[str, float | None]:
    return {"ppl_fp": r.ppl_fp, "ppl_q": r.ppl_q, "dppl": r.ppl_increase, "para_top1": r.text_top1,
            "para_kl": r.text_kl, "textq_top1": r.text_prompt_top1, "textq_kl": r.text_prompt_kl,
            "image_top1": r.image_top1, "image_kl": r.image_kl, "top1": r.top1, "kl": r.kl,
            "text_tokens": r.text_tokens}


def tuner_scores(s: dict) -> dict[str, float | None]:
    """A ``--recipe auto`` row's stored score (the same verify on the same set) under :func:`scores`' keys."""
    keys = {"ppl_fp": "ppl_fp", "ppl_q": "ppl_q", "dppl": "ppl_increase", "para_top1": "text_top1",
            "para_kl": "text_kl", "textq_top1": "text_prompt_top1", "textq_kl": "text_prompt_kl",
            "image_top1": "image_top1", "image_kl": "image_kl", "top1": "top1", "kl": "kl",
            "text_tokens": "text_tokens"}
    return {k: s.get(v) for k, v in keys.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("DEMO_MODEL", "demo/llava-smollm2-demo")))
    ap.add_argument("--llmc_python", default=str(REPO / ".venv-llmc" / "bin" / "python"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-vs-llmc"))
    ap.add_argument("--calib_images", type=Path, default=REPO / "calibImages")
    ap.add_argument("--photos_only", action="store_true", help="calibrate on the photos only (no text prompts)")
    ap.add_argument("--llavaq", action="append", default=None, metavar="LABEL=field=value,...",
                    help="a llavaq recipe to export from the shared cache (repeatable; default: the standard list)")
    ap.add_argument("--llmc", nargs="*", default=["gptq", "rtn"], choices=("gptq", "rtn", "w4a16"),
                    help="llm-compressor weight methods to run (SmoothQuant --llmc_alpha first; w4a16: its W4A16 "
                         "GPTQ preset, --llmc_group_size)")
    ap.add_argument("--llmc_group_size", type=int, default=128, help="w4a16: columns per scale (preset: 128)")
    ap.add_argument("--llmc_alpha", type=float, default=0.8)
    ap.add_argument("--llmc_order", choices=("shuffle", "given"), default="shuffle",
                    help="calibration order for llm-compressor (shuffle: its default sampler, seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llmc_out", action="append", default=[], metavar="METHOD=DIR",
                    help="score an earlier llm-compressor output (its runner's llmc_run.json beside it) instead of "
                         "running that method again")
    ap.add_argument("--cache_dir", type=Path, default=None, help="llavaq session caches (default: WORK/cache)")
    ap.add_argument("--markdown", type=Path, default=None, help="write the section into this file")
    ap.add_argument("--eval", type=Path, default=DATA / "eval", help="evaluation set: prompts.json, images/, "
                    "heldout.txt (default: the shipped one)")
    ap.add_argument("--calib_field", action="append", default=[], metavar="field=value",
                    help="a QuantRecipe field of the shared calibration, e.g. gptq_tokens=balanced (repeatable)")
    ap.add_argument("--resume", action="store_true", help="keep the rows of WORK's earlier results, score the rest")
    ap.add_argument("--auto", action="store_true", help="also run and score quantize --recipe auto")
    ap.add_argument("--auto_time_budget", type=float, default=None, help="--time_budget (minutes) for --auto")
    a = ap.parse_args(argv)
    if a.llavaq == ["none"]:
        a.llavaq = []
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if not (a.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llavaq.demo_model", str(a.model)], check=True)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    text_prompts = () if a.photos_only else read_text_prompts(DATA / "calib_text.json")
    samples_file = work / "samples.safetensors"
    labels = write_samples(a.model, a.calib_images, text_prompts, samples_file)
    base = QuantRecipe(anti_outlier="none", act_method=1, modules="language_only", text_prompts=text_prompts)
    if a.calib_field:
        base = parse_recipe("calibration=" + ",".join(a.calib_field), base)[1]
    recipes = [parse_recipe(s, base) for s in (DEFAULT_RECIPES if a.llavaq is None else a.llavaq)]
    if any(r.weight_method == "gptq" for _, r in recipes):
        base = base.replace(input_moments=True)
    eval_kw = {"images": a.eval / "images", "prompts": a.eval / "prompts.json", "text": a.eval / "heldout.txt"}
    fref: dict = {}
    rows: list[Row] = []
    results = work / "vs_llmcompressor.json"
    llmc_info: dict[str, dict] = {}
    auto_table: list[dict] = []
    if a.resume and results.is_file():  # rows of an earlier run of this WORK: kept, not scored again
        old = json.loads(results.read_text())
        llmc_info.update(old.get("llmc", {}))
        auto_table[:] = old.get("auto", [])
        rows += [Row(r["tool"], r["label"], r["seconds"], {k: v for k, v in r.items()
                                                           if k not in ("tool", "label", "seconds", "note")},
                     r["note"]) for r in old["rows"]]
    done = {r.label for r in rows}

    def record(row: Row) -> None:
        rows.append(row)
        s = row.scores
        print(f"{row.tool:14s} {row.label:34s} Δppl {s['dppl']:+6.2f}%  paragraph {s['para_top1']:.4f}/"
              f"{s['para_kl']:.5f}  text answers {s['textq_top1']:.3f}/{s['textq_kl']:.5f}  image answers "
              f"{s['image_top1']:.3f}/{s['image_kl']:.5f}", flush=True)
        results.write_text(json.dumps({"samples": labels, "llmc": llmc_info, "auto": auto_table, "rows": [
            {"tool": r.tool, "label": r.label, "seconds": r.seconds, "note": r.note, **r.scores}
            for r in rows]}, indent=1, default=str))

    reuse = dict(x.split("=", 1) for x in a.llmc_out)
    for method in a.llmc:
        label = f"SmoothQuant {a.llmc_alpha:g} + {'GPTQ' if method == 'gptq' else 'RTN'}" if method != "w4a16" \
            else f"W4A16 GPTQ preset, group {a.llmc_group_size}"
        if label in done:
            continue
        out = Path(reuse.get(method, work / f"llmc-{method}"))
        if method in reuse:
            info = json.loads((out / "llmc_run.json").read_text())
        else:
            info = run_llmc(a.llmc_python, a.model, samples_file, out, method, a.llmc_alpha, a.llmc_order, a.seed,
                            work / f"llmc-{method}.log", a.llmc_group_size)
            (out / "llmc_run.json").write_text(json.dumps(info))
        llmc_info[method] = info
        for name in TOKENIZER_FILES:  # transformers 5 re-serialises the same tokenizer: verify compares bytes
            if (a.model / name).is_file() and (out / name).is_file():
                shutil.copyfile(a.model / name, out / name)
        rep = verify(a.model, out, float_reference=fref, **eval_kw)
        order = "".join("I" if k == "image" else "T" for _, k in info["order"])
        record(Row("llm-compressor", label, info["wall_s"], scores(rep), f"sample order {order}"))

    recipes = [(label, r) for label, r in recipes if label not in done]
    if recipes:
        cal = api.calibrate(a.model, a.calib_images, base, cache_dir=a.cache_dir or work / "cache",
                            device_type="cpu")
    for label, recipe in recipes:
        out = work / "out" / "".join(c if c.isalnum() else "_" for c in label)
        t0 = time.perf_counter()
        api.export(a.model, cal.cache, out, recipe=recipe, overwrite=True)
        export_s = time.perf_counter() - t0
        rep = verify(a.model, out, float_reference=fref, **eval_kw)
        record(Row("llavaq", label, export_s, scores(rep), "derived from one min-max cache"))
        shutil.rmtree(out, ignore_errors=True)

    if a.auto and not any(lb.startswith("--recipe auto") for lb in done):
        t0 = time.perf_counter()
        res = api.tune(a.model, a.calib_images, work / "auto", modules="language_only", text_prompts=text_prompts,
                       eval_prompts=eval_kw["prompts"], eval_images=eval_kw["images"], eval_text=eval_kw["text"],
                       time_budget=a.auto_time_budget, cache_dir=a.cache_dir or work / "cache", overwrite=True)
        auto_s = time.perf_counter() - t0
        auto_table[:] = [r.to_dict() for r in res.rows] + [{"notes": res.notes}]
        record(Row("llavaq", f"--recipe auto: {res.chosen.candidate}", auto_s, tuner_scores(res.chosen.score),
                   f"target {'met' if res.met else 'missed'}; wall incl. calibrations; its tuner's score"))
    if not rows:
        return 0
    md = markdown(rows, a, labels, llmc_info)
    print(md)
    if a.markdown:
        write_section(a.markdown, md)
    return 0


def markdown(rows: list[Row], a, labels: list[str], llmc_info: dict) -> str:
    import datetime

    versions = next(iter(llmc_info.values()), {}).get("versions", {})
    n_img = sum(1 for x in labels if not x.startswith("text"))
    r0 = rows[0].scores
    lines = [
        "## llavaq vs llm-compressor",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line()}; llm-compressor "
        f"{versions.get('llmcompressor', '?')} (compressed-tensors {versions.get('compressed-tensors', '?')}, "
        f"transformers {versions.get('transformers', '?')}) in `.venv-llmc`. Command: `make bench-vs-llmcompressor` "
        f"(`benchmarks/vs_llmcompressor.py`). Model: the demo LLaVA (SmolLM2-135M language model). Both tools "
        f"calibrate on the same {len(labels)} samples ({n_img} photos of `calibImages/` with llavaq's prompt"
        + (f", {len(labels) - n_img} text-only prompts of `llavaq/data/calib_text.json`" if len(labels) > n_img else "")
        + "), quantize the language model's q,k,v,o,gate,up_proj (int8 per-channel symmetric weights, static "
        "per-tensor asymmetric int8 inputs; `--modules language_only`) and are scored by `llavaq verify` "
        f"(integer-exact kernels) on the shipped held-out set: FP perplexity {r0.get('ppl_fp') or 0:.4f} on "
        f"{r0.get('text_tokens')} "
        "held-out tokens; answers teacher-forced from the FP model's greedy answers. llavaq's rows are exported "
        "from one `calibrate` (`--anti_outlier none --act_method 1`, input moments for GPTQ) with "
        "no forward pass.",
        "",
        "| tool | recipe | Δppl % | paragraph top-1 | paragraph KL | text answers top-1 | text answers KL | "
        "image answers top-1 | image answers KL | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r.scores
        secs = "" if r.seconds is None else f"{r.seconds:.0f}"
        label = r.label + (f" <br>*{r.note}*" if r.note else "")
        lines.append(f"| {r.tool} | {label} | {s['dppl']:+.2f} | {s['para_top1']:.4f} | {s['para_kl']:.5f} | "
                     f"{s['textq_top1']:.3f} | {s['textq_kl']:.5f} | {s['image_top1']:.3f} | {s['image_kl']:.5f} | "
                     f"{secs} |")
    lines += ["", "s: llm-compressor's wall time (calibration + quantization + save); llavaq's export time from "
              "the shared cache."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
