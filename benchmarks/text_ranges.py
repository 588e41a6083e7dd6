"""How the SmoothQuant statistic changes the static activation range that held-out TEXT tokens see.

    python benchmarks/text_ranges.py --model DIR --cache SESSION_DIR [--text heldout.txt] [--alpha 0.8]

For every language-model smoothing group (``input_layernorm`` -> q,k,v; ``post_attention_layernorm`` -> gate,up)
of a min-max session cache (``calibrate --anti_outlier none --act_method 1``), and for each statistic (``absmax``,
``range``): the smoothing scale derived from the cached per-channel statistics (as ``export`` derives it), the
static per-tensor int8 range of the smoothed input (the calibration rows' min-max, as ``export`` derives it), and,
on the held-out text's tokens run through the float model:

* ``text/calib``: the width of the text tokens' smoothed range / the static range's (how much of the int8 grid
  text uses; < 1: text tokens are coded with fewer levels);
* ``clipped``: the fraction of text activations outside the static range;
* ``act err``: the Linear's output error from quantizing only its input (``‖(Q(x) − x)·Wsᵀ‖² / ‖x·Wsᵀ‖²``,
  weights float, Ws the smoothed weights), which is comparable across smoothings.

Reported as medians over the groups and for the worst group. No quantized model is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from llavaq.algorithms.smoothquant import smoothquant_group  # noqa: E402
from llavaq.calib.cache import SessionCache  # noqa: E402
from llavaq.model.loading import open_model  # noqa: E402
from llavaq.quant.int8 import activation_qparams  # noqa: E402
from llavaq.verify import load_float_model  # noqa: E402


def text_inputs(model, tokenizer_dir: Path, text: str, tokens: int, names: list[str]) -> dict[str, torch.Tensor]:
    """The float model's input rows of the Linears ``names`` on the first ``tokens`` tokens of ``text``."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(text, return_tensors="pt").input_ids[:, :tokens]
    got: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, inp, out, n=n: got.__setitem__(n, inp[0].detach().reshape(-1, inp[0].shape[-1]).clone()))
        for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return got


def group_numbers(x: torch.Tensor, w: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, scale: torch.Tensor,
                  shift: torch.Tensor | None) -> dict[str, float]:
    z = shift if shift is not None else torch.zeros_like(scale)
    lo, hi = ((mn - z) / scale).min(), ((mx - z) / scale).max()
    xs = (x - z) / scale
    ws = w * scale
    s, o = activation_qparams(lo.reshape(1), hi.reshape(1))
    q = (torch.clamp(torch.round(xs / s + o), -128, 127) - o) * s
    y = xs @ ws.T
    err = ((q - xs) @ ws.T).pow(2).sum() / y.pow(2).sum()
    width = torch.maximum(hi, torch.zeros(())) - torch.minimum(lo, torch.zeros(()))
    twidth = torch.maximum(xs.max(), torch.zeros(())) - torch.minimum(xs.min(), torch.zeros(()))
    return {"text_over_calib": float(twidth / width), "clipped": float(((xs < lo) | (xs > hi)).float().mean()),
            "act_err": float(err)}


def measure(model_dir: Path, cache_dir: Path, text: str, tokens: int, alpha: float) -> dict[str, dict]:
    arch = open_model(model_dir)
    cache = SessionCache.load(cache_dir)
    model = load_float_model(model_dir)
    stages = [s for s in arch.stages() if s.kind == "text_layer"]
    groups = [(s, g) for s in stages for g in arch.smooth_groups(s)]
    xs = text_inputs(model, model_dir, text, tokens, [g.linears[0] for _, g in groups])
    out: dict[str, dict] = {"absmax": {}, "range": {}, "none": {}}
    records: dict[str, dict] = {}
    for s, g in groups:
        rec = records.setdefault(s.name, cache.read_stage(s.name))
        key = g.linears[0]
        mn, mx = rec[f"float.{key}.min"].float(), rec[f"float.{key}.max"].float()
        weights = [model.get_submodule(n).weight.detach().float() for n in g.linears]
        w = torch.cat(weights)
        for stat in ("absmax", "range"):
            scale, shift = smoothquant_group(g, mn, mx, weights, alpha, rec.get(f"float.{key}.rows"), stat=stat)
            out[stat][g.name] = group_numbers(xs[g.linears[0]], w, mn, mx, scale.float(),
                                              None if shift is None else shift.float())
        out["none"][g.name] = group_numbers(xs[g.linears[0]], w, mn, mx, torch.ones_like(mn), None)
    return out


def summary(per_group: dict[str, dict]) -> dict[str, dict[str, float]]:
    res = {}
    for stat, groups in per_group.items():
        vals = {k: torch.tensor([g[k] for g in groups.values()]) for k in ("text_over_calib", "clipped", "act_err")}
        res[stat] = {**{f"median_{k}": float(v.median()) for k, v in vals.items()},
                     "min_text_over_calib": float(vals["text_over_calib"].min()),
                     "max_clipped": float(vals["clipped"].max()), "max_act_err": float(vals["act_err"].max()),
                     "mean_act_err": float(vals["act_err"].mean())}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="a min-max session cache directory")
    ap.add_argument("--text", type=Path, default=HERE.parent / "llavaq" / "data" / "eval" / "heldout.txt")
    ap.add_argument("--tokens", type=int, default=510)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    per_group = measure(a.model, a.cache, a.text.read_text(), a.tokens, a.alpha)
    res = summary(per_group)
    for stat, d in res.items():
        print(f"{stat:7s} " + "  ".join(f"{k} {v:.4g}" for k, v in d.items()))
    if a.json:
        a.json.write_text(json.dumps({"summary": res, "groups": per_group}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
