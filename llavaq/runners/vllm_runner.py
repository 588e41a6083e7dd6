"""vLLM runner: load exports with ``vllm.LLM`` (vLLM's CPU build, ``.venv-vllm``) and score / generate with them.

Run (as a file, by path) with the ``.venv-vllm`` python (``make vllm-env``) for tests/interop/vllm, ``llavaq
verify --engine vllm`` and benchmarks/serve.py. llavaq never imports this file and this file never imports llavaq:
it is what a vLLM user does with an export.

``--jobs FILE``: a JSON list of jobs, all run in this one process (vLLM is imported once; each engine is shut
down before the next starts). A job is an object with:

* ``model``: the export (or float model) directory; ``dtype`` (default ``float32``); ``max_model_len``
  (default: the model's);
* ``windows`` (optional): a safetensors file of 1-D token tensors ``w0``, ``w1``, … scored with
  ``prompt_logprobs=1``: per window, the NLL of every token but the first (``nll``) and vLLM's top-1 token at each
  of those positions (``top1``);
* ``images`` (optional): a list of ``{"prompt": text with one <image>, "image": path}``, answered greedily with
  ``generate`` new tokens each (``greedy``: token ids, ``answers``: text);
* ``bench`` (optional): ``{"prompt_tokens", "batch", "decode_tokens", "repeats"}``: serving speed on random
  token prompts (best of ``repeats``): ``prefill_tok_s`` (``batch`` prompts, one new token each) and
  ``decode_tok_s`` (the ``decode_tokens − 1`` further tokens per sequence over the extra time they take), the
  weights' bytes as loaded (``weight_bytes``) and this process's peak RSS (``peak_rss_bytes``);
* ``out``: where the job's result JSON is written.

Every job's result (a JSON object) is also printed, one line each, as ``RESULT <json>``; a job that fails to
load reports ``{"error": "..."}`` instead, and the runner goes on with the next one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", required=True, help="JSON list of jobs (see the module docstring)")
    p.add_argument("--generate", type=int, default=8)
    return p.parse_args(argv)


def make_llm(job: dict):
    from vllm import LLM

    extra = {"max_model_len": job["max_model_len"]} if job.get("max_model_len") else {}
    return LLM(model=job["model"], dtype=job.get("dtype", "float32"), enforce_eager=True,
               max_num_seqs=job.get("max_num_seqs", 4), seed=0, limit_mm_per_prompt={"image": 1},
               disable_log_stats=True, **extra)


def score_windows(llm, path: str) -> dict:
    from safetensors.torch import load_file
    from vllm import SamplingParams

    windows = load_file(path)
    keys = sorted(windows, key=lambda k: int(k[1:]))
    prompts = [{"prompt_token_ids": windows[k].tolist()} for k in keys]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0), use_tqdm=False)
    nll, top1 = [], []
    for prompt, out in zip(prompts, outs, strict=True):
        ids = prompt["prompt_token_ids"]
        lps = out.prompt_logprobs  # [None, {token: Logprob}, ...]: position i scores ids[i] given ids[:i]
        nll.append([-lps[i][ids[i]].logprob for i in range(1, len(ids))])
        top1.append([next(t for t, lp in lps[i].items() if lp.rank == 1) for i in range(1, len(ids))])
    return {"nll": nll, "top1": top1}


def answer_images(llm, items: list[dict], generate: int) -> dict:
    from PIL import Image
    from vllm import SamplingParams

    prompts = []
    for it in items:
        with Image.open(it["image"]) as im:
            prompts.append({"prompt": it["prompt"], "multi_modal_data": {"image": im.convert("RGB")}})
    sp = SamplingParams(temperature=0.0, max_tokens=generate, min_tokens=generate, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return {"greedy": [list(o.outputs[0].token_ids) for o in outs], "answers": [o.outputs[0].text for o in outs]}


def bench(llm, cfg: dict) -> dict:
    import random
    import resource

    from vllm import SamplingParams

    rng = random.Random(0)
    n, b, d = cfg.get("prompt_tokens", 256), cfg.get("batch", 4), cfg.get("decode_tokens", 32)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 20000) for _ in range(n)]} for _ in range(b)]

    def timed(tokens: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    reps = cfg.get("repeats", 2)
    pre = min(timed(1) for _ in range(reps))
    full = min(timed(d) for _ in range(reps))
    try:
        weights = sum(llm.apply_model(lambda m: sum(t.numel() * t.element_size()
                                                    for t in [*m.parameters(), *m.buffers()])))
    except Exception:  # noqa: BLE001  (not every vLLM exposes apply_model)
        weights = None
    return {"prefill_tok_s": n * b / pre, "decode_tok_s": (d - 1) * b / max(full - pre, 1e-9), "prefill_s": pre,
            "generate_s": full, "weight_bytes": weights,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def quant_summary(llm) -> str | None:
    try:
        cfg = llm.llm_engine.model_config
        return getattr(cfg, "quantization", None)
    except Exception:  # noqa: BLE001  (only informative)
        return None


def run_job(job: dict, generate: int) -> dict:
    import vllm

    t0 = time.perf_counter()
    res: dict = {"name": job.get("name"), "vllm": vllm.__version__}
    try:
        llm = make_llm(job)
    except Exception as e:  # noqa: BLE001  (reported, the next job still runs)
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
        return res
    res["load_s"] = time.perf_counter() - t0
    res["quantization"] = quant_summary(llm)
    try:
        if job.get("windows"):
            res.update(score_windows(llm, job["windows"]))
        if job.get("images"):
            res.update(answer_images(llm, job["images"], job.get("generate", generate)))
        if job.get("bench"):
            res.update(bench(llm, job["bench"]))
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        del llm
        gc.collect()
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
    with open(args.jobs) as f:
        jobs = json.load(f)
    for job in jobs:
        res = run_job(job, args.generate)
        if job.get("out"):
            with open(job["out"] + ".tmp", "w") as f:
                json.dump(res, f)
            os.replace(job["out"] + ".tmp", job["out"])
        print("RESULT " + json.dumps({k: v for k, v in res.items() if k not in ("nll", "top1")}), flush=True)
    return 0


if __name__ == "__main__":  # vLLM may spawn its engine: create it only here
    sys.exit(main())
