"""Issue 30's table: one cache, one derived recipe, two formats — the same model? (docs/BENCHMARKS.md)

    python benchmarks/format_equivalence.py export ROOT MODEL RESULTS.json   # calibrate once, export both formats
    python benchmarks/format_equivalence.py verify ROOT MODEL RESULTS.json   # compare + verify every export in ROOT

``export`` calibrates MODEL on ``calibImages/`` + the shipped text prompts with ``--anti_outlier none --act_method 1``
into ``ROOT/cache`` (reused when done) and exports ``--anti_outlier m1 --alpha 0.5`` (derived from the cache, no
forward pass) as ``ROOT/<tag>-msmodelslim`` and ``ROOT/<tag>-compressed-tensors`` (``--tag``, default ``new``), plus
``ROOT/<tag>-ct-fp32`` (compressed-tensors with ``--float_dtype float32``). Run it once more with
``PYTHONPATH`` pointing at an older checkout and ``--tag old`` to measure before a fix. ``verify`` runs
:func:`llavaq.compare.compare_outputs` on each msmodelslim/compressed-tensors pair and ``llavaq verify``'s
held-out perplexity (256-token windows, and one full-context window with ``--full``) on every export.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llavaq import api
from llavaq.calib.prompts import read_text_prompts
from llavaq.recipe import QuantRecipe

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "llavaq" / "data" / "eval" / "heldout.txt"


def export_stage(root: Path, model: Path, tag: str) -> dict:
    base = QuantRecipe(anti_outlier="none", act_method=1,
                       text_prompts=read_text_prompts(ROOT / "llavaq" / "data" / "calib_text.json"))
    t0 = time.perf_counter()
    cal = api.calibrate(model, ROOT / "calibImages", base, cache_dir=root / "cache")
    out = {"calibrate_s": time.perf_counter() - t0, "reused": cal.reused}
    derived = base.replace(anti_outlier="m1", alpha=0.5)
    for name, fmt, recipe in ((f"{tag}-msmodelslim", "msmodelslim", derived),
                              (f"{tag}-compressed-tensors", "compressed-tensors", derived),
                              (f"{tag}-ct-fp32", "compressed-tensors", derived.replace(float_dtype="float32"))):
        try:
            res = api.export(model, cal.cache, root / name, format=fmt, recipe=recipe, overwrite=True)
            out[name] = {"derived": res.derived, "seconds": res.seconds}
        except Exception as e:  # an older checkout may lack an option
            out[name] = {"error": str(e)}
    return out


def verify_stage(root: Path, model: Path, full: bool) -> dict:
    from llavaq.compare import compare_outputs
    from llavaq.verify import verify

    out: dict = {}
    for tag in ("old", "new"):
        a, b = root / f"{tag}-msmodelslim", root / f"{tag}-compressed-tensors"
        if a.is_dir() and b.is_dir():
            c = compare_outputs(a, b)
            fr = [d.code_fraction for d in c.linears]
            out[f"compare-{tag}"] = {"same_model": c.same_model, "codes_min": min(fr), "codes_max": max(fr),
                                     "scale_rel_max": max(d.scale_rel for d in c.linears), "rounded": len(c.rounded)}
    refs = ({}, {})
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "cache"):
        row = {}
        for window, ref, key in ((256, refs[0], "ppl"), (4096, refs[1], "ppl_full"))[: 2 if full else 1]:
            r = verify(model, d, text=HELDOUT, layer_errors=False, float_reference=ref,
                       ppl_window=window)
            row.update({f"{key}_fp": r.ppl_fp, f"{key}_q": r.ppl_q, "tokens": r.text_tokens})
        out[d.name] = row
        print(d.name, row, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=("export", "verify"))
    ap.add_argument("root", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("results", type=Path)
    ap.add_argument("--tag", default="new")
    ap.add_argument("--full", action="store_true", help="also one full-context window (the paragraph perplexity)")
    a = ap.parse_args(argv)
    results = json.loads(a.results.read_text()) if a.results.exists() else {}
    if a.stage == "export":
        results[f"export-{a.tag}"] = export_stage(a.root, a.model, a.tag)
    else:
        results.update(verify_stage(a.root, a.model, a.full))
    a.results.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
