"""Fidelity with ``--rotation hadamard`` on the demo model (real SmolLM2-135M LM), next to the same recipes unrotated.

    python benchmarks/rotation.py [--model DIR] [--work DIR] [--markdown docs/BENCHMARKS.md]

Same setup as ``benchmarks/fidelity.py`` (calibImages/ + the shipped text-only prompts; the shipped held-out set
for evaluation, scored by ``llavaq.verify`` with integer-exact kernels), but every row is reported for image-prompt
answers, text-only answers and held-out text separately, with the cost of the recipe: calibration time, export
time and output size. The best rotated static recipe also gets the ``dynamic`` and ``weight_only`` references.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fidelity import _short, ensure_model  # noqa: E402
from report import machine_line, write_section  # noqa: E402

from llavaq import api  # noqa: E402
from llavaq.calib.prompts import read_text_prompts  # noqa: E402
from llavaq.recipe import QuantRecipe  # noqa: E402
from llavaq.verify import verify  # noqa: E402

REPO = HERE.parent
TITLE = "## Fidelity with rotation (`--rotation hadamard`)"


@dataclass
class Row:
    label: str
    rotated: bool
    calib_s: float | None
    export_s: float | None
    size: int | None
    report: object
    note: str = ""
    shared: bool = False  # derived at export from another row's calibration


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("DEMO_MODEL", "/work/demo-model")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-rotation"))
    ap.add_argument("--calib_images", type=Path, default=REPO / "calibImages")
    ap.add_argument("--markdown", type=Path, default=None, help="write the section into this file")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1], help="other rotation seeds for the best recipe")
    ap.add_argument("--no-baselines", action="store_true", help="skip the unrotated rows")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    model = ensure_model(a.model)
    data = REPO / "llavaq" / "data"
    images, prompts, text = data / "eval" / "images", data / "eval" / "prompts.json", data / "eval" / "heldout.txt"
    tp = read_text_prompts(data / "calib_text.json")
    cache_dir = a.work / "cache"
    fref: dict = {}
    calib_time: dict[str, float] = {}
    rows: list[Row] = []
    outs: dict[str, tuple[Path, QuantRecipe, QuantRecipe | None]] = {}

    def measure(label: str, recipe: QuantRecipe, *, derive_from: QuantRecipe | None = None, mode: str = "static",
                out_dir: Path | None = None, note: str = "") -> None:
        base = derive_from or recipe
        key = base.calibration_key()
        t0 = time.perf_counter()
        cal = api.calibrate(model, a.calib_images, base, cache_dir=cache_dir, device_type="cpu")
        if key not in calib_time:
            calib_time[key] = cal.seconds if not cal.reused else float("nan")
        out = out_dir or a.work / "out" / label.replace(" ", "_").replace("/", "-").replace("α", "a").replace("+", "")
        exp_s = size = None
        if mode == "static":
            t1 = time.perf_counter()
            res = api.export(model, cal.cache, out, recipe=recipe, overwrite=True)
            exp_s, size = time.perf_counter() - t1, res.bytes_written
            if res.derived:
                note = (note + "; " if note else "") + "derived from the cached float statistics"
            outs[label] = (out, recipe, derive_from)
        rep = verify(model, out, images=images, prompts=prompts, text=text, mode=mode,
                     float_reference=fref)
        calib = None if mode != "static" else calib_time[key]
        rows.append(Row(label, recipe.rotation != "none", calib, exp_s, size, rep, note, derive_from is not None))
        it, ik, tt, tk = rep.image_top1, rep.image_kl, rep.text_prompt_top1, rep.text_prompt_kl
        print(f"{label:44s} ppl {rep.ppl_increase:+.2f}% top1 {rep.top1:.4f} KL {rep.kl:.5f} | image {it:.3f}/{ik:.4f} "
              f"text {tt:.3f}/{tk:.4f} heldout {rep.text_top1:.3f}/{rep.text_kl:.4f} [{time.perf_counter() - t0:.0f}s]",
              flush=True)
        _dump(rows, a.work / "rotation.json")

    rtn = QuantRecipe(anti_outlier="none", act_method=1, text_prompts=tp)
    auto = QuantRecipe(anti_outlier="m1", alpha="auto", act_method=1, text_prompts=tp)
    m2 = QuantRecipe(anti_outlier="m2", act_method=2, text_prompts=tp)
    a08 = rtn.replace(anti_outlier="m1", alpha=0.8)
    if not a.no_baselines:
        measure("m1 α=0.8", a08, derive_from=rtn)
        measure("m2, histogram (msModelSlim)", m2)
    R = {"rotation": "hadamard"}
    rrtn = rtn.replace(**R)
    measure("R: rotation alone (none), min-max", rrtn)
    measure("R: rotation alone (none), histogram", rrtn.replace(act_method=2))
    measure("R + m1 α=0.5", rrtn.replace(anti_outlier="m1", alpha=0.5), derive_from=rrtn)
    measure("R + m1 α=0.8", rrtn.replace(anti_outlier="m1", alpha=0.8), derive_from=rrtn)
    measure("R + m1 α=0.8 + --smooth_vo", rrtn.replace(anti_outlier="m1", alpha=0.8, smooth_vo=True),
            derive_from=rrtn)
    measure("R + auto-α, min-max", auto.replace(**R))
    measure("R + m2, histogram", m2.replace(**R))

    def best_rotated() -> Row:
        return max((r for r in rows if r.rotated and r.label in outs), key=lambda r: (r.report.top1, -r.report.ppl_q))

    best = best_rotated()
    _, rec, base = outs[best.label]
    gptq = {"weight_method": "gptq"}
    measure(f"{best.label} + GPTQ", rec.replace(**gptq), derive_from=None if base is None else base.replace(**gptq))
    if not a.no_baselines:
        measure("m1 α=0.8 + GPTQ", a08.replace(**gptq), derive_from=rtn.replace(**gptq))
    best = best_rotated()
    best_out, best_recipe, best_base = outs[best.label]
    for seed in a.seeds:
        base = None if best_base is None else best_base.replace(rotation_seed=seed)
        measure(f"{best.label}, rotation seed {seed}", best_recipe.replace(rotation_seed=seed), derive_from=base,
                note="another draw of the random signs")
    measure(f"{best.label}, DYNAMIC per-token acts", best_recipe, derive_from=best_base, mode="dynamic",
            out_dir=best_out, note="reference: same int8 weights, activations quantized per token at run time")
    measure(f"{best.label}, int8 weights only (float activations)", best_recipe, derive_from=best_base,
            mode="weight_only", out_dir=best_out, note="reference: what the int8 weights alone cost")
    md = markdown(rows, model)
    print(md)
    if a.markdown:
        write_section(a.markdown, md)
    return 0


def _dump(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"label": r.label, "rotated": r.rotated, "calibration_s": r.calib_s,
                                 "export_s": r.export_s, "bytes": r.size, "note": r.note,
                                 "report": r.report.to_dict()} for r in rows], indent=1, default=str))


def markdown(rows: list[Row], model: Path) -> str:
    import datetime

    r0 = rows[0].report
    n_img, n_txt = r0.image_positions, r0.text_prompt_positions
    lines = [
        TITLE,
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line()}. Command: "
        "`python benchmarks/rotation.py --model DEMO --markdown docs/BENCHMARKS.md`.",
        f"Same model, calibration inputs and held-out set as \"Fidelity\" above (`{model}`). `R` = `--rotation "
        "hadamard` (seed 0 unless noted): the language model's residual stream rotated by a randomised Hadamard "
        "matrix (576 = 16·36, Sylvester ⊗ Paley II) and each head's v→o path by one of order 64, folded into the "
        "weights; `down_proj` stays float (msModelSlim's module set), the CLIP tower and projector `linear_1` are "
        "not rotated. Top-1 / KL are over: **image** = the answers to the held-out photos' questions "
        f"({n_img} tokens), **text** = the answers to the text-only questions ({n_txt} tokens), **held-out** = "
        f"the plain-English perplexity text ({r0.text_tokens} tokens); **all** pools every scored position. "
        "Calibrate s = the session cache the row is exported from (in parentheses: derived at export from that "
        "cache, no forward pass); size = the msModelSlim-format output directory.",
        "",
        f"FP perplexity **{r0.ppl_fp:.4f}**.",
        "",
        "| recipe | Δppl % | top-1 all | image top-1 | image KL | text top-1 | text KL | held-out top-1 | "
        "held-out KL | calibrate s | export s | size MiB | worst Linear (rel. MSE) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.report
        it, ik, tt, tk = p.image_top1, p.image_kl, p.text_prompt_top1, p.text_prompt_kl
        w = p.worst_layers[0]
        cs = "" if r.calib_s is None else ("cached" if r.calib_s != r.calib_s else f"{r.calib_s:.0f}")
        cs = f"({cs})" if cs and r.shared else cs
        es = "" if r.export_s is None else f"{r.export_s:.1f}"
        size = "" if r.size is None else f"{r.size / 2**20:.1f}"
        label = (f"**{r.label}**" if r.rotated else r.label) + (f" <br>*{r.note}*" if r.note else "")
        lines.append(f"| {label} | {p.ppl_increase:+.2f} | {p.top1:.4f} | {it:.4f} | {ik:.5f} | {tt:.4f} | {tk:.5f} | "
                     f"{p.text_top1:.4f} | {p.text_kl:.5f} | {cs} | {es} | {size} | "
                     f"{_short(w.name)} ({w.rel_mse:.1e}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
