"""Run llavaq and msModelSlim side by side on one model and compare time, memory and outputs.

Example::

    python benchmarks/vs_msmodelslim.py --model_path M --calib_images DIR \\
        --msms_python .venv-msms/bin/python \\
        --llavaq_cmd "llavaq quantize --model_path {model} --calib_images {images} \\
                      --save_directory {out} --device_type cpu"

msModelSlim runs through ``tests/parity/msms_runner.py`` (its LLaVA example flow). Each tool runs in
its own subprocess, one after the other; wall time is measured around the subprocess and peak RSS
comes from ``os.wait4`` (the child's own rusage, which on Linux includes the largest RSS of any
descendant it waited for, so a shell wrapper around the real process is fine). Outputs are then
compared tensor by tensor with ``tests/parity/compare.py``. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "parity"))

from compare import compare_outputs, markdown_table  # noqa: E402
from report import machine_info, machine_line, write_section  # noqa: E402

DEFAULT_LLAVAQ_CMD = ("{python} -m llavaq quantize --model_path {model} --calib_images {images} "
                      "--save_directory {out} --cache_dir {cache} --device_type cpu --overwrite")


def run_measured(cmd, *, shell: bool, log_path: Path, cwd: Path | None = None) -> dict:
    """Run ``cmd`` to completion; return rc, wall seconds, peak RSS bytes and cpu seconds."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, shell=shell, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": round(wall, 3),
        "peak_rss_bytes": ru.ru_maxrss * 1024,  # Linux reports KiB
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "log": str(log_path),
    }


def last_json_line(log_path: Path) -> dict | None:
    for line in reversed(Path(log_path).read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _redact(cmd: str) -> str:
    """The command with this machine's paths shortened to their last component."""
    return " ".join(Path(w).name if w.startswith("/") else w for w in cmd.split())


def markdown(report: dict) -> str:
    """The BENCHMARKS.md section: one row per tool, wall/RSS relative to msModelSlim, output identity."""
    runs, cmps = report["runs"], report.get("comparison", {})
    ref = runs.get("msmodelslim")
    lines = [
        "## llavaq vs msModelSlim",
        "",
        f"Run {report['machine']['date']} on {machine_line()}, one tool after the other in one run of "
        f"`benchmarks/vs_msmodelslim.py` (`make bench-vs-msmodelslim`), nothing else running. Model: "
        f"`{report['model_path']}` (the demo LLaVA: SmolLM2-135M language model, 6-layer CLIP-336 tower, fp16); "
        f"calibration images: `{report['calib_images']}`. msModelSlim 26.1.0 runs its LLaVA W8A8 m2 example flow "
        "(`tests/parity/msms_runner.py`, CPU, float32); llavaq runs `llavaq quantize` with an empty session "
        "cache (commands below). Peak RSS is the process tree's (`wait4`).",
        "",
        "| tool | wall s | × msModelSlim | CPU s | peak RSS MiB | × msModelSlim | output vs msModelSlim |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in runs.items():
        rel_t = f"{r['wall_s'] / ref['wall_s']:.2f}" if ref else ""
        rel_m = f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}" if ref else ""
        c = cmps.get(label)
        if label == "msmodelslim":
            ident = "reference"
        elif c is None:
            ident = "not compared"
        elif c["identical"]:
            ident = f"**bit-identical** ({c['n_tensors'][0]} tensors, description, config)"
        else:
            w = c["kinds"].get("weight_int8", {})
            ident = (f"differs: {sum(k['n_not_equal'] for k in c['kinds'].values())} tensors not equal "
                     f"(int8 weights min equal fraction {w.get('min_equal_frac', 1):.4f})")
        lines.append(f"| {label} | {r['wall_s']:.1f} | {rel_t} | {r['cpu_s']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {rel_m} | {ident} |")
    lines.append("")
    for label, r in runs.items():
        if "cmd" in r:
            lines.append(f"- {label}: `{_redact(r['cmd'])}`")
    phases = (ref or {}).get("runner") or {}
    if phases:
        lines += ["", "msModelSlim's own phases (s): " + ", ".join(
            f"{k[:-2]} {v:.1f}" for k, v in phases.items() if k.endswith("_s"))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--calib_images", required=True)
    p.add_argument("--msms_python", required=True, help="python of the msModelSlim venv")
    p.add_argument("--llavaq_cmd", default=DEFAULT_LLAVAQ_CMD,
                   help="shell template with {python}, {model}, {images}, {out}, {cache} placeholders "
                        "(default: plain llavaq quantize on the CPU with a fresh session cache)")
    p.add_argument("--work_dir", default="bench_vs_msms", help="outputs and logs go here")
    p.add_argument("--also_fast", action="store_true", help="also time llavaq with --m2_search fast")
    p.add_argument("--markdown", type=Path, default=None,
                   help="write the 'llavaq vs msModelSlim' section into this file (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--mindie_format", action="store_true", help="pass --mindie_format to msModelSlim")
    p.add_argument("--part_file_size", type=int, default=None, help="GB per shard for msModelSlim")
    p.add_argument("--msms_out", default=None, help="reuse an existing msModelSlim output (skip running it)")
    p.add_argument("--json", default=None, help="write the report here (default WORK_DIR/report.json)")
    args = p.parse_args(argv)

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, images = str(Path(args.model_path).resolve()), str(Path(args.calib_images).resolve())
    report: dict = {"model_path": model, "calib_images": images, "machine": machine_info(), "runs": {}}

    if args.msms_out:
        ref = Path(args.msms_out).resolve()
    else:
        ref = work / "msmodelslim_out"
        cmd = [args.msms_python, str(REPO / "tests/parity/msms_runner.py"), "--model_path", model,
               "--calib_images", images, "--save_directory", str(ref)]
        if args.mindie_format:
            cmd.append("--mindie_format")
        if args.part_file_size is not None:
            cmd += ["--part_file_size", str(args.part_file_size)]
        r = run_measured(cmd, shell=False, log_path=work / "msmodelslim.log")
        r["runner"] = last_json_line(work / "msmodelslim.log")
        report["runs"]["msmodelslim"] = r
        print(f"msmodelslim: rc={r['rc']} wall={r['wall_s']}s peak_rss={r['peak_rss_bytes'] / 2**20:.0f} MiB")
        if r["rc"] != 0:
            print(f"msModelSlim failed, see {r['log']}", file=sys.stderr)

    variants = [("llavaq", args.llavaq_cmd)]
    if args.also_fast:
        variants.append(("llavaq --m2_search fast", args.llavaq_cmd + " --m2_search fast"))
    outs: dict[str, Path] = {}
    for label, template in variants:
        slug = label.replace(" --m2_search ", "_")
        ours = work / f"{slug}_out"
        cache = work / f"{slug}_cache"
        shutil.rmtree(cache, ignore_errors=True)  # time a full calibration, not a cache hit
        cmd = template.format(python=shlex.quote(sys.executable), model=shlex.quote(model),
                              images=shlex.quote(images), out=shlex.quote(str(ours)), cache=shlex.quote(str(cache)))
        r = run_measured(cmd, shell=True, log_path=work / f"{slug}.log")
        r["cmd"] = cmd
        report["runs"][label] = r
        outs[label] = ours
        print(f"{label}: rc={r['rc']} wall={r['wall_s']}s peak_rss={r['peak_rss_bytes'] / 2**20:.0f} MiB")
        if r["rc"] != 0:
            print(f"{label} failed, see {r['log']}", file=sys.stderr)

    lines = ["| tool | rc | wall (s) | cpu (s) | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for name, run in report["runs"].items():
        lines.append(f"| {name} | {run['rc']} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | "
                     f"{run['peak_rss_bytes'] / 2**20:.0f} |")
    print("\n" + "\n".join(lines) + "\n")
    ok = all(run["rc"] == 0 for run in report["runs"].values())
    report["comparison"] = {}
    if ok and ref.is_dir():
        for label, ours in outs.items():
            cmp = compare_outputs(ours, ref)
            report["comparison"][label] = cmp
            print(f"\n{label} vs msModelSlim: " + markdown_table(cmp))
    if args.markdown and ok:
        write_section(args.markdown, markdown(report))
    out_json = Path(args.json) if args.json else work / "report.json"
    out_json.write_text(json.dumps(report, indent=2))
    print(f"\nreport: {out_json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
