"""Fidelity benchmark: W8A8 recipes on a LLaVA whose language model is the real SmolLM2-135M.

    python benchmarks/fidelity.py [--model DIR] [--work DIR] [--markdown docs/BENCHMARKS.md]

One ``calibrate`` per distinct calibration recipe (session cache); m1 with a fixed alpha is also
*derived* from the RTN min-max cache at export time (no forward pass). Every quantized output is
measured by ``llavaq.verify`` (integer-exact kernel emulation) against the float model, on held-out
photos + questions, text-only questions and held-out plain English (perplexity). A last row runs the
best static recipe's int8 weights with dynamic per-token activations: what static ranges cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from report import machine_line, write_section  # noqa: E402

from llavaq import api  # noqa: E402
from llavaq.calib.coverage import range_drivers  # noqa: E402
from llavaq.calib.prompts import read_text_prompts  # noqa: E402
from llavaq.recipe import QuantRecipe  # noqa: E402
from llavaq.verify import verify  # noqa: E402

REPO = HERE.parent


def ensure_model(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    subprocess.run([sys.executable, "-m", "llavaq.demo_model", str(path)], check=True)
    return path


@dataclass
class Row:
    label: str
    recipe: str
    calib_s: float | None
    export_s: float | None
    report: object
    note: str = ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("DEMO_MODEL", "/work/demo-model")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-fidelity"))
    ap.add_argument("--calib_images", type=Path, default=REPO / "calibImages")
    ap.add_argument("--markdown", type=Path, default=None, help="write the Fidelity section into this file")
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="core rows only (no observer/down_proj/2-photo variants)")
    ap.add_argument("--keep_float", type=int, nargs="*", default=[8, 16],
                    help="rows of the best static recipe with N sensitive Linears kept float")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    model = ensure_model(a.model)
    work = a.work
    # calibration: the project's calibImages/ (3 photos) + the shipped text-only prompts; evaluation: the
    # shipped held-out set (other photos, questions, plain English), never seen by calibration
    calib = a.calib_images
    data = REPO / "llavaq" / "data"
    images, prompts, text = data / "eval" / "images", data / "eval" / "prompts.json", data / "eval" / "heldout.txt"
    text_prompts = read_text_prompts(data / "calib_text.json")
    cache_dir = work / "cache"
    fref: dict = {}  # the float model's answers/logits, computed once for all rows
    calib_time: dict[str, float] = {}
    rows: list[Row] = []
    outs: dict[str, tuple[Path, QuantRecipe, QuantRecipe | None]] = {}
    results_file = work / "fidelity.json"

    def measure(label: str, recipe: QuantRecipe, *, derive_from: QuantRecipe | None = None, note: str = "",
                mode: str = "static", out_dir: Path | None = None) -> Path:
        base = derive_from or recipe
        key = base.calibration_key()
        t0 = time.perf_counter()
        cal = api.calibrate(model, calib, base, cache_dir=cache_dir, device_type="cpu")
        if key not in calib_time:
            calib_time[key] = cal.seconds if not cal.reused else float("nan")
        out = out_dir or work / "out" / label.replace(" ", "_").replace("/", "-").replace("α", "a")
        exp_s = None
        if mode == "static":
            t1 = time.perf_counter()
            res = api.export(model, cal.cache, out, recipe=recipe, overwrite=True)
            exp_s = time.perf_counter() - t1
            if res.derived:
                note = (note + "; " if note else "") + "derived from the cached float statistics (min-max)"
            if res.kept_float:
                note = (note + "; " if note else "") + f"{len(res.kept_float)} Linears kept float: " + ", ".join(
                    _short(n) for n in res.kept_float)
        rep = verify(model, out, images=images, prompts=prompts, text=text, answer_tokens=a.answer_tokens,
                     mode=mode, float_reference=fref)
        shown = {k: v for k, v in recipe.calibration_dict().items()
                 if k not in ("prompt", "text_prompts", "activation_sample_tokens")}
        rows.append(Row(label, json.dumps({**shown, "weight_method": recipe.weight_method}),
                        None if derive_from or mode != "static" else calib_time[key], exp_s, rep, note))
        if mode == "static":
            outs[label] = (out, recipe, derive_from)
        r = rep
        print(f"{label:42s} ppl {r.ppl_fp:.4f}->{r.ppl_q:.4f} ({r.ppl_increase:+.2f}%) text {r.text_top1:.4f}/"
              f"{r.text_kl:.5f} image {r.image_top1:.4f}/{r.image_kl:.5f} all {r.top1:.4f}/{r.kl:.5f}  "
              f"worst {r.worst_layers[0].name} {r.worst_layers[0].rel_mse:.2e} [{time.perf_counter() - t0:.0f}s]",
              flush=True)
        _dump(rows, results_file)
        return out

    tp = text_prompts
    # one min-max cache with input moments serves every derived m1 / none row, RTN and GPTQ alike
    mm = QuantRecipe(anti_outlier="none", act_method=1, text_prompts=tp, weight_method="gptq")
    m2h = QuantRecipe(anti_outlier="m2", act_method=2, text_prompts=tp, weight_method="gptq")
    auto1 = QuantRecipe(anti_outlier="m1", alpha="auto", act_method=1, text_prompts=tp, weight_method="gptq")
    rtn = {"weight_method": "rtn"}
    measure("RTN (none), min-max", mm.replace(**rtn))
    measure("GPTQ (none), min-max", mm)
    for alpha in (0.5, 0.8):
        for wm in ("rtn", "gptq"):
            measure(f"m1 α={alpha}, {wm.upper()}", mm.replace(anti_outlier="m1", alpha=alpha, weight_method=wm),
                    derive_from=mm)
            measure(f"m1 α={alpha}, --smooth_vo, {wm.upper()}",
                    mm.replace(anti_outlier="m1", alpha=alpha, weight_method=wm, smooth_vo=True), derive_from=mm)
    for wm in ("rtn", "gptq"):
        measure(f"auto-α, min-max, {wm.upper()}", auto1.replace(weight_method=wm))
        measure(f"auto-α, min-max, --smooth_vo, {wm.upper()}", auto1.replace(weight_method=wm, smooth_vo=True))
        measure(f"m2, histogram (msModelSlim), {wm.upper()}", m2h.replace(weight_method=wm))
        measure(f"m2, histogram, --smooth_vo, {wm.upper()}", m2h.replace(weight_method=wm, smooth_vo=True))
    measure("m2, histogram, photos only, no text (msModelSlim's setup)", QuantRecipe(anti_outlier="m2", act_method=2),
            note="calibrated on the 3 photos only")
    if not a.quick:
        measure("RTN (none), histogram", mm.replace(act_method=2, **rtn))
        measure("m2, min-max, RTN", m2h.replace(act_method=1, **rtn))
        measure("m2, histogram, --m2_search fast, RTN", m2h.replace(m2_search="fast", **rtn),
                note="coarse-to-fine threshold search (not msModelSlim-exact)")
        measure("auto-α, histogram, GPTQ", auto1.replace(act_method=2))
        measure("auto-α, min-max, + down_proj, --smooth_vo, GPTQ", auto1.replace(modules="with_down_proj",
                                                                                  smooth_vo=True))
        measure("m2, histogram, + down_proj, RTN", m2h.replace(modules="with_down_proj", **rtn))
    # the best static recipe (top-1 on text and on image answers, the weaker of the two; then KL), with its
    # most sensitive Linears kept in float, and references that isolate the error sources of its int8 model
    static = [r for r in rows if r.label in outs]
    best_label = max(static, key=_rank).label
    best_out, best_recipe, best_base = outs[best_label]
    for n in a.keep_float:
        measure(f"{best_label}, --keep_float {n}", best_recipe.replace(keep_float=n), derive_from=best_base,
                note="export-time fallback from the same cache")
    measure(f"{best_label}, DYNAMIC per-token acts", best_recipe, derive_from=best_base, mode="dynamic",
            out_dir=best_out,
            note="reference: same int8 weights, activations quantized per token at run time")
    for wm in ("rtn", "gptq"):  # the weight-only ceiling of each weight method, on the best recipe's smoothing
        label = f"{best_label} [{wm.upper()} weights]"
        ref_out = measure(label, best_recipe.replace(weight_method=wm), derive_from=best_base) \
            if best_recipe.weight_method != wm else best_out
        measure(f"{label}, int8 weights only (float activations)", best_recipe.replace(weight_method=wm),
                derive_from=best_base, mode="weight_only", out_dir=ref_out,
                note=f"reference: what the {wm.upper()} int8 weights alone cost")
    cov = range_drivers(api.calibrate(model, calib, best_base or best_recipe, cache_dir=cache_dir,
                                      device_type="cpu").cache)
    md = markdown(rows, model, cov)
    print(md)
    if a.markdown:
        write_section(a.markdown, md)
    return 0


def _rank(r: Row) -> tuple[float, float]:
    """Best static recipe: the weaker of held-out-text and image-answer top-1 first, then KL."""
    p = r.report
    parts = [t for t in (p.text_top1, p.image_top1) if t is not None]
    return (min(parts) if parts else p.top1, -p.kl)


def _short(name: str) -> str:
    return name.replace("language_model.model.layers.", "L").replace("vision_tower.vision_model.encoder.layers.", "V")


def _dump(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"label": r.label, "recipe": r.recipe, "calibration_s": r.calib_s,
                                 "export_s": r.export_s, "note": r.note, "report": r.report.to_dict()}
                                for r in rows], indent=1, default=str))


def markdown(rows: list[Row], model: Path, cov) -> str:
    import datetime

    r0 = rows[0].report
    lines = [
        "## Fidelity",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line()}. Command: `make bench-fidelity`.",
        f"Model: LLaVA with the real SmolLM2-135M-Instruct language model (30 layers, hidden 576) and a small "
        f"random CLIP vision tower (`{model}`). Calibration: the 3 photos of `calibImages/` + "
        f"{cov.kinds.count('text')} text-only prompts (`llavaq/data/calib_text.json`) unless noted. Evaluation "
        "(`llavaq/data/eval/`, disjoint from the calibration inputs): held-out photos with questions, text-only "
        "questions (FP greedy answers "
        f"teacher-forced, {r0.prompts[0].answer_tokens if r0.prompts else 0} tokens), and held-out plain English "
        f"({r0.text_tokens} tokens) for perplexity. Quantized models are run as the int8 kernels run them "
        "(`llavaq verify`: static int8 activations with the saved input_scale/offset, exact int32 accumulation, "
        "deq_scale/quant_bias). Top-1 = next-token argmax agreement with the float model, KL(FP‖Q) = mean per "
        "position; *text* = the held-out plain English, *image* = the answers to the image prompts (FP greedy "
        "answers teacher-forced), *all* = every scored position (answers to image and text-only prompts + "
        "held-out text). GPTQ rows: `--weight_method gptq` (damp 0.01, act order) from the same caches, which "
        "record the input moments.",
        "",
        f"FP perplexity: **{r0.ppl_fp:.4f}**. Text-only calibration prompts set the range of "
        f"{cov.set_by_text}/{cov.language_linears} quantized language-model Linears (cache of the best static recipe).",
        "",
        "| recipe | Δppl % | text top-1 | text KL | image top-1 | image KL | all top-1 | all KL | calibrate s | "
        "export s | worst Linear (rel. MSE) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| FP (float32), ppl {r0.ppl_fp:.4f} | 0 | 1 | 0 | 1 | 0 | 1 | 0 | | | |",
    ]
    for r in rows:
        p = r.report
        w = p.worst_layers[0]
        short = _short(w.name)
        cs = "" if r.calib_s is None else ("cached" if r.calib_s != r.calib_s else f"{r.calib_s:.0f}")
        es = "" if r.export_s is None else f"{r.export_s:.1f}"
        label = r.label + (f" <br>*{r.note}*" if r.note else "")
        lines.append(f"| {label} | {p.ppl_increase:+.2f} | {p.text_top1:.4f} | {p.text_kl:.5f} | {p.image_top1:.4f} | "
                     f"{p.image_kl:.5f} | {p.top1:.4f} | {p.kl:.5f} | {cs} | {es} | {short} ({w.rel_mse:.1e}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
