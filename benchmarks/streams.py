"""Calibration memory vs the number of calibration images: hidden states in memory or on disk.

    python benchmarks/streams.py [--model DIR] [--counts 3 32 128] [--markdown docs/BENCHMARKS.md]

Runs ``llavaq calibrate`` (default recipe: m2 + histogram) on the demo model (real SmolLM2-135M
language model + CLIP tower, built if missing) with N photos for each N in ``--counts``, twice: with
the default stream budget (a quarter of the available memory: everything stays in memory here) and
with ``--stream_memory_gb 0`` (every hidden state read back from the session cache's files).  Each
run is a child process on a fresh cache; wall time is measured around it and peak RSS is the child's
own ``ru_maxrss`` (``os.wait4``).  The N photos are 640x480 crops of the six bundled public-domain /
CC0 photos (calibImages/ and llavaq/data/eval/images/), each at its own zoom and position.  Both runs
of a count must write identical stage records (checked).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from fidelity import ensure_model  # noqa: E402
from make_images import cover_crop  # noqa: E402
from report import machine_info, write_section  # noqa: E402

PHOTOS = sorted((REPO / "calibImages").glob("*.jpg")) + sorted((REPO / "llavaq/data/eval/images").glob("*.jpg"))
MIB = 2**20


def make_images(out: Path, n: int) -> Path:
    """``n`` distinct 640x480 crops of the bundled photos (deterministic)."""
    if out.exists() and len(list(out.glob("*.jpg"))) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    srcs = [Image.open(p).convert("RGB") for p in PHOTOS]
    for i in range(n):
        img = srcs[i % len(srcs)]
        k = i // len(srcs)
        zoom = 1.0 + 0.15 * (k % 7)  # crop a window 1/zoom of the photo, then cover 640x480
        w, h = int(img.width / zoom), int(img.height / zoom)
        x0 = (img.width - w) * ((k * 37) % 11) // 10
        y0 = (img.height - h) * ((k * 53) % 7) // 6
        cover_crop(img.crop((x0, y0, x0 + w, y0 + h)), (640, 480)).save(out / f"img_{i:04d}.jpg", quality=90)
    return out


def run(model: Path, images: Path, cache: Path, budget: float | None) -> tuple[float, int]:
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, "-m", "llavaq", "calibrate", "--model_path", str(model), "--calib_images", str(images),
           "--cache_dir", str(cache), "--device_type", "cpu"]
    if budget is not None:
        cmd += ["--stream_memory_gb", str(budget)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    err = p.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"calibrate failed: {err.strip().splitlines()[-1] if err.strip() else status}")
    return time.perf_counter() - t0, ru.ru_maxrss * 1024


def same_records(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    (sa,), (sb,) = [p for p in a.iterdir() if p.is_dir()], [p for p in b.iterdir() if p.is_dir()]
    for f in sorted(sa.glob("stage-*.safetensors")):
        x, y = load_file(str(f)), load_file(str(sb / f.name))
        if sorted(x) != sorted(y) or not all(torch.equal(x[k], y[k]) for k in x if not k.endswith(".screened")):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(os.environ.get("DEMO_MODEL", "/work/demo-model")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-streams"))
    ap.add_argument("--counts", type=int, nargs="+", default=[3, 32, 128])
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args(argv)
    model = ensure_model(a.model)
    rows = []
    for n in a.counts:
        images = make_images(a.work / f"images-{n}", n)
        mem_s, mem_rss = run(model, images, a.work / "cache-mem", None)
        disk_s, disk_rss = run(model, images, a.work / "cache-disk", 0)
        same = same_records(a.work / "cache-mem", a.work / "cache-disk")
        rows.append((n, mem_s, mem_rss, disk_s, disk_rss, same))
        print(f"{n} images: in memory {mem_s:.1f} s {mem_rss / MIB:.0f} MiB; on disk {disk_s:.1f} s "
              f"{disk_rss / MIB:.0f} MiB; identical records: {same}", flush=True)
    m = machine_info()
    md = [
        "## Calibration memory vs number of images",
        "",
        f"{m['date']}; {m['nproc']} CPU cores ({m['cpu']}), {m['ram_gib']:.0f} GiB RAM, torch {m['torch']}; "
        f"`python benchmarks/streams.py --counts {' '.join(map(str, a.counts))}`: `llavaq calibrate` (default "
        "recipe) on the demo model, N photos at 336 px (~600 tokens each), a fresh cache per run, one run "
        "each. *In memory*: default stream budget (a quarter of the available memory; all hidden states "
        "fit). *On disk*: `--stream_memory_gb 0`. Peak RSS is the child process's (`os.wait4`).",
        "",
        "| images | in memory: wall | peak RSS | on disk: wall | peak RSS | stage records identical |",
        "|---|---|---|---|---|---|",
    ]
    for n, ms, mr, ds, dr, same in rows:
        md.append(f"| {n} | {ms:.1f} s | {mr / MIB:.0f} MiB | {ds:.1f} s | {dr / MIB:.0f} MiB | "
                  f"{'yes' if same else '**no**'} |")
    text = "\n".join(md) + "\n"
    print(text)
    if a.markdown:
        write_section(a.markdown, text)
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
