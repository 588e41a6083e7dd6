"""Tuning benchmark: ``llavaq quantize --recipe auto`` on the demo model vs one m2 calibration.

    python benchmarks/tuning.py [--model DIR] [--work DIR] [--markdown docs/BENCHMARKS.md]

Runs, one after the other in fresh session caches, each as its own process (the CLI, as a user runs it):

1. ``llavaq calibrate`` with the default recipe (msModelSlim's m2 + histogram) and the shipped text-only
   prompts: the reference time (issue #17: auto must take less than 3x this);
2. ``llavaq quantize --recipe auto`` with its defaults (shipped held-out set, Δppl ≤ 1 %, top-1 ≥ 0.95).

The section written to docs/BENCHMARKS.md has the tuning table (``llavaq_tuning.json``), both wall times, the
machine and the load average while each ran (this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from report import machine_line, write_section  # noqa: E402

REPO = HERE.parent


def run(cmd: list[str], log: Path) -> tuple[float, int, tuple[float, float]]:
    """Wall time, exit code and the 1-minute load average before / after."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "COLUMNS": "160"})
    return time.perf_counter() - t0, p.returncode, (load0, os.getloadavg()[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("DEMO_MODEL", "/work/demo-model")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-tuning"))
    ap.add_argument("--calib_images", type=Path, default=REPO / "calibImages")
    ap.add_argument("--markdown", type=Path, default=None, help="write the Tuning section into this file")
    ap.add_argument("--skip_m2", action="store_true", help="reuse the m2 time of an earlier run (work/m2.json)")
    a = ap.parse_args(argv)
    if not (a.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "llavaq.demo_model", str(a.model)], check=True)
    a.work.mkdir(parents=True, exist_ok=True)
    llavaq = [sys.executable, "-m", "llavaq"]
    common = ["--model_path", str(a.model), "--calib_images", str(a.calib_images), "--device_type", "cpu"]
    m2_file = a.work / "m2.json"
    if a.skip_m2 and m2_file.is_file():
        m2 = json.loads(m2_file.read_text())
    else:
        shutil.rmtree(a.work / "cache-m2", ignore_errors=True)
        secs, code, load = run([*llavaq, "calibrate", *common, "--cache_dir", str(a.work / "cache-m2"),
                                "--text_prompts", str(REPO / "llavaq" / "data" / "calib_text.json")],
                               a.work / "calibrate-m2.log")
        if code:
            raise SystemExit(f"calibrate failed (exit {code}), see {a.work / 'calibrate-m2.log'}")
        m2 = {"seconds": secs, "load": load}
        m2_file.write_text(json.dumps(m2))
    print(f"m2 calibration: {m2['seconds']:.1f}s (load {m2['load'][0]:.1f} -> {m2['load'][1]:.1f})", flush=True)
    shutil.rmtree(a.work / "cache-auto", ignore_errors=True)
    out = a.work / "out-auto"
    secs, code, load = run([*llavaq, "quantize", *common, "--save_directory", str(out), "--recipe", "auto",
                            "--cache_dir", str(a.work / "cache-auto"), "--overwrite"], a.work / "auto.log")
    print(f"quantize --recipe auto: {secs:.1f}s, exit {code} (load {load[0]:.1f} -> {load[1]:.1f})", flush=True)
    if code not in (0, 1):
        raise SystemExit(f"quantize --recipe auto failed (exit {code}), see {a.work / 'auto.log'}")
    doc = json.loads((out / "llavaq_tuning.json").read_text())
    md = markdown(doc, m2, secs, code, load, a.model)
    print(md)
    if a.markdown:
        write_section(a.markdown, md)
    return 0


def _f(x, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(doc: dict, m2: dict, secs: float, code: int, load: tuple[float, float], model: Path) -> str:
    import datetime

    tgt = doc["target"]
    ratio = secs / m2["seconds"]
    lines = [
        "## Tuning: `quantize --recipe auto`",
        "",
        f"Run {datetime.date.today().isoformat()} on {machine_line()}. Command: `python benchmarks/tuning.py "
        "--markdown docs/BENCHMARKS.md`. Model: the demo LLaVA (real SmolLM2-135M language model, "
        f"`{model}`); calibration: `calibImages/` (3 photos) + the shipped text-only prompts; evaluation: the "
        "shipped held-out set (`llavaq/data/eval/`). Each command ran as its own process with an empty session "
        "cache; the machine is shared, so the 1-minute load average before → after each run is given.",
        "",
        "| run | wall | load avg |",
        "|---|---|---|",
        f"| `llavaq calibrate` (default m2 + histogram, shipped text prompts): the reference | {m2['seconds']:.1f} s "
        f"| {m2['load'][0]:.1f} → {m2['load'][1]:.1f} |",
        f"| `llavaq quantize --recipe auto` (exit {code}) | **{secs:.1f} s = {ratio:.2f}× the m2 calibration** | "
        f"{load[0]:.1f} → {load[1]:.1f} |",
        "",
        f"Target: Δppl ≤ {tgt['max_ppl_increase']:g} %, top-1 ≥ {tgt['min_top1']:g} on the held-out text and on the "
        f"answers to image prompts, each. Chosen: **{doc['chosen']}** — target "
        + ("**met**." if doc["met"] else "**missed**: " + "; ".join(doc["missed"]) + "."),
        "",
        "| candidate | stage | Δppl % | text top-1 | text KL | image top-1 | image KL | float Linears | time s | "
        "target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["candidates"]:
        s = r.get("score") or {}
        name = f"**{r['candidate']}** (chosen)" if r["candidate"] == doc["chosen"] and r["stage"] != "screen" \
            else r["candidate"]
        verdict = r.get("status", "") if not s else ("–" if r.get("meets") is None else
                                                    "meets" if r["meets"] else "misses")
        lines.append(f"| {name} | {r['stage']} | {_f(s.get('ppl_increase'), '+.2f')} | {_f(s.get('text_top1'))} | "
                     f"{_f(s.get('text_kl'), '.5f')} | {_f(s.get('image_top1'))} | {_f(s.get('image_kl'), '.5f')} | "
                     f"{len(r.get('float_linears') or []) if s else '–'} | "
                     f"{_f(r.get('seconds') if s else None, '.1f')} | {verdict} |")
    cal = ", ".join(f"{c['name']} {c['seconds']:.1f} s" for c in doc["calibrations"])
    lines += ["", f"Calibrations: {cal}. Total {doc['seconds']:.1f} s inside the tuner."]
    for n in doc.get("notes", []):
        lines.append(f"Note: {n}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
