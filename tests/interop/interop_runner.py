"""Interop runner: load an export with plain ``LlavaForConditionalGeneration.from_pretrained`` in the newest
transformers (+ compressed-tensors) and run it; for tests/interop, run by the ``.venv-interop`` python.

llavaq never imports this file, and this file never imports llavaq: it is what a user of the current
ecosystem does with an export. It reads the inputs that the test prepared with llavaq (``--inputs``, a
safetensors file of ``<name>.input_ids`` / ``<name>.attention_mask`` / ``<name>.pixel_values``, with the
``<image>`` token already expanded to one token per image feature as transformers >= 4.47 expects), and writes
``--out``: ``<name>.logits`` (float32 [seq, vocab]) and ``<name>.greedy`` (the ``--generate`` greedily
generated token ids). With ``--activation_quant FILE`` (a JSON object ``{module name in this transformers'
layout: [input_scale, input_offset]}``), every listed Linear fake-quantizes its input with those static
parameters first: ``x̂ = (clamp(round(x/s + o), −128, 127) − o)·s`` (what a fake-quant export's recorded
parameters mean).

``--jobs FILE`` runs several such loads in one process (transformers is imported once): a JSON list of
objects with the keys ``model``, ``inputs``, ``out`` and optionally ``dtype``, ``activation_quant`` (the object
itself) and ``bad_token``; a job with ``windows`` (a safetensors file of 1-D token tensors ``w0``, ``w1``, …)
instead reports the summed next-token NLL over them (``nll_sum``, ``tokens``): perplexity.

The last stdout line is a JSON object (with ``--jobs``: a list, one per job): versions, the load report
(missing / unexpected / mismatched keys, error messages, and any load-report or warning line transformers
logged), what the quantized Linears run as, and whether any output was NaN/Inf.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", default=None, help="JSON list of jobs (see the module docstring)")
    p.add_argument("--model")
    p.add_argument("--inputs")
    p.add_argument("--out")
    p.add_argument("--dtype", default="float32", choices=["float32", "auto"])
    p.add_argument("--generate", type=int, default=8)
    p.add_argument("--activation_quant", default=None)
    p.add_argument("--bad_token", type=int, default=None, help="never generate this token (the image token)")
    return p.parse_args(argv)


def _fake_quant_hook(scale: float, offset: float):
    import torch

    s = torch.tensor(scale, dtype=torch.float32)
    o = torch.tensor(offset, dtype=torch.float32)

    def hook(_module, args):
        x = args[0]
        q = torch.clamp(torch.round(x.float() / s + o), -128, 127)
        return ((q - o) * s).to(x.dtype), *args[1:]

    return hook


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.jobs:
        with open(args.jobs) as f:
            jobs = json.load(f)
    else:
        act = None
        if args.activation_quant:
            with open(args.activation_quant) as f:
                act = json.load(f)
        jobs = [{"model": args.model, "inputs": args.inputs, "out": args.out, "dtype": args.dtype,
                 "activation_quant": act, "bad_token": args.bad_token}]
    results = [run_job(job, args.generate) for job in jobs]
    sys.stdout.flush()
    print(json.dumps(results if args.jobs else results[0]))
    return 0


def run_job(job: dict, generate: int) -> dict:
    import compressed_tensors
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    hf_logging.get_logger().addHandler(handler)
    hf_logging.set_verbosity_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtype = torch.float32 if job.get("dtype", "float32") == "float32" else "auto"
        model, info = LlavaForConditionalGeneration.from_pretrained(job["model"], dtype=dtype,
                                                                    output_loading_info=True)
    model.eval()
    hf_logging.get_logger().removeHandler(handler)
    report_lines = [ln for ln in log.getvalue().splitlines() if ln.strip()]
    report_lines += [f"{w.category.__name__}: {w.message}" for w in caught
                     if "MISSING" in str(w.message) or "UNEXPECTED" in str(w.message)]

    if job.get("activation_quant"):
        modules = dict(model.named_modules())
        for name, (scale, offset) in job["activation_quant"].items():
            modules[name].register_forward_pre_hook(_fake_quant_hook(scale, offset))

    if job.get("windows"):  # perplexity: the summed next-token NLL over token windows (w0, w1, ...)
        windows = load_file(job["windows"])
        nll, n = 0.0, 0
        with torch.no_grad():
            for key in sorted(windows, key=lambda k: int(k[1:])):
                x = windows[key].unsqueeze(0)
                logits = model(input_ids=x).logits[0, :-1].double()
                nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
                n += x.shape[1] - 1
        return {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
                "dtype": str(model.dtype).replace("torch.", ""), "missing_keys": sorted(info.get("missing_keys", [])),
                "unexpected_keys": sorted(info.get("unexpected_keys", [])), "nll_sum": nll, "tokens": n,
                "finite": bool(nll == nll and abs(nll) != float("inf"))}

    inputs = load_file(job["inputs"])
    names = sorted({k.rsplit(".", 1)[0] for k in inputs})
    out: dict[str, torch.Tensor] = {}
    finite = True
    with torch.no_grad():
        for name in names:
            kw = {k.rsplit(".", 1)[1]: v for k, v in inputs.items() if k.rsplit(".", 1)[0] == name}
            if "pixel_values" in kw:
                kw["pixel_values"] = kw["pixel_values"].to(model.dtype)
            logits = model(**kw).logits[0].float()
            finite &= bool(torch.isfinite(logits).all())
            out[f"{name}.logits"] = logits.contiguous()
            bad = [[job["bad_token"]]] if job.get("bad_token") is not None else None
            gen = model.generate(**kw, max_new_tokens=generate, min_new_tokens=generate, do_sample=False,
                                 bad_words_ids=bad)
            out[f"{name}.greedy"] = gen[0, kw["input_ids"].shape[1]:].contiguous()
    save_file(out, job["out"])

    schemes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    for _name, mod in model.named_modules():
        sch = getattr(mod, "quantization_scheme", None)
        if sch is not None:
            a = sch.input_activations
            kind = "weights only" if a is None else (
                f"int{a.num_bits} {'dynamic' if a.dynamic else 'static'} {a.strategy} "
                f"{'symmetric' if a.symmetric else 'asymmetric'} inputs")
            status = str(getattr(mod, "quantization_status", "?")).split(".")[-1].lower()
            key = f"{type(mod).__name__} ({status}), {kind}, weight {str(mod.weight.dtype).replace('torch.', '')}"
            schemes[key] = schemes.get(key, 0) + 1
            if hasattr(mod, "input_scale"):
                dtypes[str(mod.input_scale.dtype).replace("torch.", "")] = 1
    result = {
        "transformers": transformers.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__,
        "dtype": str(model.dtype).replace("torch.", ""),
        "missing_keys": sorted(info.get("missing_keys", [])),
        "unexpected_keys": sorted(info.get("unexpected_keys", [])),
        "mismatched_keys": sorted(str(k) for k in info.get("mismatched_keys", [])),
        "error_msgs": [str(e) for e in info.get("error_msgs", [])],
        "load_report": [ln for ln in report_lines if "MISSING" in ln or "UNEXPECTED" in ln or "MISMATCH" in ln],
        "quantized_modules": schemes,
        "input_scale_dtypes": sorted(dtypes),
        "finite": finite,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
