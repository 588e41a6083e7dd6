"""Issue 23: ``verify`` streams both models one stage at a time, so its peak RSS does not grow with the depth.

Two tiny models of the same width, one twice as deep; each is exported and then verified in a child process
(``os.wait4`` in a small launcher gives that child's peak RSS). The deeper model's extra layers hold ``extra``
bytes of fp32 weights per model; a whole-model verify (the float model in fp32 and an emulated copy) holds twice
that more. The streamed verify must grow by a small fraction of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llavaq import api
from llavaq.recipe import QuantRecipe
from llavaq.testing import build_tiny_llava

WIDTH = dict(hidden=512, heads=4, kv_heads=4, intermediate=2048, vision_hidden=48, vision_intermediate=96)
CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from llavaq.verify import verify
a = json.loads(sys.argv[1])
verify(a["model"], a["out"], prompts=a["prompts"], images=a["images"], text=a["text"], answer_tokens=2,
       ppl_window=32, max_text_tokens=96)
"""


#: a small launcher between pytest and the measured child: Linux keeps a process's peak RSS across execve, and a
#: child forked (vfork) straight from pytest would start with pytest's own peak (which grows as the models are built)
LAUNCH = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, st, ru = os.wait4(p.pid, 0); "
          "print(os.waitstatus_to_exitcode(st), ru.ru_maxrss)")


def _peak_rss(model: Path, out: Path, eval_dir: Path) -> int:
    args = json.dumps({"model": str(model), "out": str(out), "prompts": str(eval_dir / "prompts.json"),
                       "images": str(eval_dir / "images"), "text": str(eval_dir / "heldout.txt")})
    proc = subprocess.run([sys.executable, "-c", LAUNCH, sys.executable, "-c", CHILD, args], capture_output=True,
                          text=True)
    code, maxrss = proc.stdout.split()[-2:]
    assert proc.returncode == 0 and code == "0", proc.stderr[-2000:]
    return int(maxrss) * 1024  # Linux: KiB


def test_verify_peak_rss_does_not_grow_with_depth(calib_dir, tmp_path):
    from llavaq.testing import write_test_images

    e = tmp_path / "eval"
    write_test_images(e / "images", sizes=((50, 40),), seed=3)
    (e / "prompts.json").write_text(json.dumps([{"image": "img_00.jpg", "question": "What is it?"},
                                               {"question": "Where is the rocket?"}]))
    (e / "heldout.txt").write_text("The quick brown fox jumps over the lazy dog near the rocket. " * 12)
    peaks, layer_bytes = {}, 0
    for depth in (4, 8):
        model = build_tiny_llava(tmp_path / f"m{depth}", text_layers=depth, **WIDTH)
        recipe = QuantRecipe(anti_outlier="none")
        _, res = api.quantize(model, calib_dir, tmp_path / f"q{depth}", cache_dir=tmp_path / "cache",
                              device_type="cpu", recipe=recipe)
        peaks[depth] = _peak_rss(model, Path(res.save_directory), e)
        h, i = WIDTH["hidden"], WIDTH["intermediate"]
        layer_bytes = 4 * (4 * h * h + 3 * h * i)  # fp32 q/k/v/o + gate/up/down of one text layer
    extra = 4 * layer_bytes  # the deeper model's 4 extra layers, fp32, one model
    grew = peaks[8] - peaks[4]
    assert extra > 60 << 20  # big enough to see: the whole-model verify grew by ~2x this
    assert grew < 0.25 * extra, f"peak RSS grew by {grew / 2**20:.1f} MiB for {extra / 2**20:.1f} MiB of layers"
