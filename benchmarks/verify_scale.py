"""``verify`` at full width: peak RSS and wall time against one float forward over the same evaluation set.

    python benchmarks/verify_scale.py [--size 7b] [--layers N] [--prompts P] [--text_tokens T] [--workdir DIR]

Builds (or reuses) :mod:`scale`'s random-weight checkpoint — ``--layers N`` keeps the real width and vocabulary
but only N language-model layers (the vision tower stays whole), so a run fits in the time at hand and the
per-layer cost projects to the full depth — exports it with msModelSlim's format (``anti_outlier=none``: the
export is not what is measured), then measures, each in its own child process (``os.wait4``: peak RSS):

* ``forward``: one layer-streamed fp32 forward of the float model over the evaluation samples (the first P
  shipped prompts with their photos, and T held-out tokens in 256-token windows);
* ``verify cold``: ``llavaq.verify.verify`` on the same set with an empty session cache (greedy answers, the float
  and the quantized model streamed together, the float side written to the cache);
* ``verify warm``: the same call again: the float side is read from the cache, one quantized streamed pass.

Prints a markdown table (machine, date, load) to append to docs/BENCHMARKS.md.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402
from report import machine_info  # noqa: E402

GIB = 1024**3


def _eval(prompts: int, text_tokens: int, work: Path) -> dict:
    from llavaq.verify import shipped_eval

    src = json.loads(shipped_eval("prompts.json").read_text())[:prompts]
    d = work / "eval"
    d.mkdir(exist_ok=True)
    (d / "prompts.json").write_text(json.dumps(src))
    return {"prompts": str(d / "prompts.json"), "images": str(shipped_eval("images")),
            "text": str(shipped_eval("heldout.txt")), "max_text_tokens": text_tokens}


def phase_forward(model: str, ev: dict) -> dict:
    from llavaq.calib.samples import load_processor
    from llavaq.model.forward import float_forward
    from llavaq.model.loading import open_model
    from llavaq.verify import load_eval_prompts, load_heldout_text, perplexity_windows
    from llavaq.verify.metrics import encode_prompt
    from llavaq.verify.streamed import EvalItem

    arch, proc = open_model(model), load_processor(model)
    items = [EvalItem(*encode_prompt(proc, p), slice(None))
             for p in load_eval_prompts(ev["prompts"], ev["images"])]
    for w in perplexity_windows(proc.tokenizer, load_heldout_text(ev["text"]), 256, ev["max_text_tokens"]):
        items.append(EvalItem(w.unsqueeze(0), torch.ones(1, w.numel(), dtype=torch.long), None, slice(None)))
    t0 = time.perf_counter()
    out = float_forward(arch, items)
    return {"wall": time.perf_counter() - t0, "positions": sum(int(x.shape[1]) for x in out)}


def phase_verify(model: str, out: str, ev: dict, cache: str) -> dict:
    from llavaq.verify import verify

    t0 = time.perf_counter()
    rep = verify(model, out, prompts=ev["prompts"], images=ev["images"], text=ev["text"],
                 max_text_tokens=ev["max_text_tokens"], cache_dir=cache)
    return {"wall": time.perf_counter() - t0, "top1": rep.top1, "kl": rep.kl, "ppl_fp": rep.ppl_fp}


def child(args: list[str]) -> tuple[dict, int, float]:
    res = Path(args[-1])
    load = os.getloadavg()[0]
    p = subprocess.Popen([sys.executable, __file__, *args])
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"phase {args[0]} failed")
    return json.loads(res.read_text()), ru.ru_maxrss * 1024, (load + os.getloadavg()[0]) / 2


def _build(size: str, layers: int | None, work: Path) -> tuple[Path, str]:
    key = size if layers is None else f"{size}-L{layers}"
    if layers is not None:
        m = scale.MODELS[size]
        scale.MODELS[key] = dict(m, name=f"{m['name']}, {layers} LM layers", text={**m["text"],
                                                                                     "num_hidden_layers": layers})
    model = work / f"{key}-random"
    if not (model / "model.safetensors.index.json").exists():
        scale.build_checkpoint(model, key)
    return model, key


def _export(model: Path, work: Path) -> Path:
    from llavaq import api
    from llavaq.recipe import QuantRecipe

    out = work / "q-out"
    if not (out / "llavaq_record.json").exists():
        images = work / "images"
        if not images.is_dir():
            from llavaq.testing import write_test_images

            write_test_images(images, sizes=((640, 480), (480, 640)))
        api.quantize(model, images, out, QuantRecipe(anti_outlier="none"), cache_dir=work / "calib-cache",
                     overwrite=True, device_type="cpu")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("forward", "verify"):
        a = sys.argv[2:]
        torch.set_num_threads(int(os.environ.get("LLAVAQ_BENCH_THREADS", os.cpu_count() or 1)))
        res = phase_forward(a[0], json.loads(a[1])) if sys.argv[1] == "forward" else \
            phase_verify(a[0], a[1], json.loads(a[2]), a[3])
        Path(a[-1]).write_text(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="7b", choices=list(scale.MODELS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--text_tokens", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-verify")
    a = ap.parse_args()
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, key = _build(a.size, a.layers, work)
    out = _export(model, work)
    ev = json.dumps(_eval(a.prompts, a.text_tokens, work))
    cache = work / "verify-cache"
    shutil.rmtree(cache, ignore_errors=True)
    r = {"fwd": child(["forward", str(model), ev, str(work / "fwd.json")])}
    r["cold"] = child(["verify", str(model), str(out), ev, str(cache), str(work / "cold.json")])
    r["warm"] = child(["verify", str(model), str(out), ev, str(cache), str(work / "warm.json")])
    m = machine_info()
    print(f"\n{key} on {m}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {a.prompts} prompts, "
          f"{a.text_tokens} held-out tokens; model {scale._du(model) / GIB:.1f} GiB\n")
    print("| run | wall s | peak RSS GiB | x float forward | load avg |\n|---|---|---|---|---|")
    base = r["fwd"][0]["wall"]
    for name, (res, rss, load) in r.items():
        print(f"| {name} | {res['wall']:.0f} | {rss / GIB:.2f} | {res['wall'] / base:.2f} | {load:.1f} |")
    (work / "results.json").write_text(json.dumps(r, indent=1, default=str))


if __name__ == "__main__":
    main()
