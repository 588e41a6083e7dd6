"""What the integrity checksums (issue 24) cost on a demo-sized calibration + export.

Runs ``llavaq.api.quantize`` (default recipe, empty session cache) on the demo LLaVA and, separately, times the
work the checksums add to it, each timed alone so a loaded machine does not blur the ratio:

- the full weights digest: sha256 of every checkpoint tensor's bytes (calibration and export each hash every
  tensor once as they read it, ``Checkpoint.weights_sha256``);
- the session cache: sha256 of every stage file when it is written and each time export reads it, and the
  manifest's own checksum each time it is saved or loaded.

Usage: ``python benchmarks/checksums.py --model DEMO_DIR [--calib_images calibImages]`` (build the demo with
``python -m llavaq.demo_model DEMO_DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), _cpu()
    fn()
    return time.perf_counter() - w, _cpu() - c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib_images", type=Path, default=REPO / "calibImages")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llavaq-bench-checksums"))
    a = ap.parse_args(argv)
    import torch

    from llavaq import api
    from llavaq.calib.cache import manifest_checksum
    from llavaq.model.checkpoint import Checkpoint

    shutil.rmtree(a.work, ignore_errors=True)
    box: dict = {}
    run_w, run_c = _timed(lambda: box.update(r=api.quantize(a.model, a.calib_images, a.work / "out",
                                                             cache_dir=a.work / "cache", device_type="cpu")))
    cache = box["r"][0].cache
    ck = Checkpoint(a.model)

    def weights() -> None:
        for name in ck.names:
            hashlib.sha256(ck.tensor(name, None).reshape(-1).view(torch.uint8).numpy()).hexdigest()

    stages = sorted(cache.path.glob("stage-*.safetensors"))
    blobs = [f.read_bytes() for f in stages]
    manifest = cache.manifest

    def cache_sums() -> None:
        for b in blobs:  # written once, read once by export
            hashlib.sha256(b).hexdigest()
            hashlib.sha256(b).hexdigest()
        for _ in range(2 * len(stages) + 4):  # saved per stage + finish, loaded by export
            manifest_checksum(manifest)

    read_w, read_c = _timed(lambda: [ck.tensor(n, None) for n in ck.names])  # reading alone (subtracted below)
    hw_w, hw_c = _timed(weights)
    hc_w, hc_c = _timed(cache_sums)
    hash_w = 2 * max(hw_w - read_w, 0.0) + hc_w  # calibration and export each hash the weights once
    hash_c = 2 * max(hw_c - read_c, 0.0) + hc_c
    mb = sum(f.stat().st_size for f in a.model.glob("*.safetensors")) / 2**20
    res = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "weights_mib": round(mb, 1), "stage_files": len(stages),
           "stage_mib": round(sum(len(b) for b in blobs) / 2**20, 1),
           "quantize_wall_s": round(run_w, 2), "quantize_cpu_s": round(run_c, 2),
           "checksums_wall_s": round(hash_w, 3), "checksums_cpu_s": round(hash_c, 3),
           "share_wall_pct": round(100 * hash_w / run_w, 2), "share_cpu_pct": round(100 * hash_c / run_c, 2)}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
