"""Reference runner: llm-compressor 0.14 W8A8 (SmoothQuant + GPTQ or round-to-nearest) on a llava-hf LLaVA.

Run it with the python of a venv that has llm-compressor (``scripts/setup_llmc_env.sh``); llavaq never
imports this file or llm-compressor. ``benchmarks/vs_llmcompressor.py`` calls it as a subprocess.

The calibration inputs come from llavaq (``--samples``: a safetensors file written by the benchmark with
``llavaq.calib.samples.build_samples``: ``{i}.input_ids``, ``{i}.attention_mask`` and, for image prompts,
``{i}.pixel_values``), so both tools see the same tokens and pixels. What runs is llm-compressor's own
``oneshot``:

* recipe ``[SmoothQuantModifier(smoothing_strength=ALPHA), GPTQModifier(...) | QuantizationModifier(...)]``,
  one config group: int8 per-channel symmetric weights (``strategy="channel"``) and static per-tensor
  asymmetric int8 input activations (``strategy="tensor", symmetric=False, dynamic=False``; llm-compressor's
  default activation observer, ``minmax``: moving average of per-batch min/max with constant 0.01);
* targets: the language model's ``q,k,v,o,gate,up_proj`` (``down_proj``, ``lm_head``, the vision tower and the
  projector stay float, as ``llavaq --modules language_only``); SmoothQuant's mappings are llm-compressor's
  defaults for Llama (``input_layernorm`` → q,k,v; ``post_attention_layernorm`` → gate,up);
* ``sequential_targets=["LlamaDecoderLayer"]`` (its LLaVA example), default ``pipeline="independent"``
  (every modifier gets its own sequential pass over the calibration data), batch size 1;
* the data are fed as a ``DataLoader`` in an explicit order (``--order``): ``shuffle`` reproduces
  llm-compressor's default ``RandomSampler`` with a seeded generator (``--seed``), ``given`` keeps llavaq's
  order (photos, then text prompts). With the moving-average observer the first batches set the ranges,
  so the order is recorded in the JSON line;
* the image prompts enter the language model as llava-hf merges them: the runner computes each sample's
  ``inputs_embeds`` with the model's own ``get_image_features`` + ``masked_scatter`` before calibration (the
  vision tower and projector are not quantized, so this is the same input to the decoder layers), because
  llm-compressor's traced sequential pipeline needs every batch to have the same inputs (a text-only sample
  has no ``pixel_values``).

``--method w4a16`` (issue 28): llm-compressor's W4A16 preset instead (int4 symmetric group-wise weights,
``--group_size``, no activation quantization, GPTQ with its default act order), no SmoothQuant; saved
``pack-quantized``.

Output: ``model.save_pretrained(out, save_compressed=True)`` (compressed-tensors ``int-quantized``) + the
processor files. The last stdout line is a JSON object with timings, versions and the sample order.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

TARGETS = [r"re:.*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj)$"]
# llm-compressor's default Llama mappings, restricted to the language model (its bare ``re:.*q_proj$``
# patterns also match the CLIP tower's q/k/v_proj, and mapping resolution then fails on LLaVA)
SQ_MAPPINGS = [
    [[r"re:.*language_model.*self_attn\.q_proj$", r"re:.*language_model.*self_attn\.k_proj$",
      r"re:.*language_model.*self_attn\.v_proj$"], r"re:.*language_model.*input_layernorm$"],
    [[r"re:.*language_model.*mlp\.gate_proj$", r"re:.*language_model.*mlp\.up_proj$"],
     r"re:.*language_model.*post_attention_layernorm$"],
]


def build_recipe(method: str, alpha: float, block_size: int, dampening_frac: float, actorder: str | None,
                 group_size: int = 128):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if method == "w4a16":  # its W4A16 preset's weights (int4 symmetric, group-wise), float activations
        scheme = QuantizationScheme(targets=TARGETS, weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size, dynamic=False))
        kw = {} if actorder is None else {"actorder": None if actorder == "none" else actorder}
        return [GPTQModifier(config_groups={"group_0": scheme}, block_size=block_size, dampening_frac=dampening_frac,
                             **kw)]
    scheme = QuantizationScheme(
        targets=TARGETS,
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor",
                                           dynamic=False),
    )
    recipe = [SmoothQuantModifier(smoothing_strength=alpha,
                                  mappings=SQ_MAPPINGS)] if alpha > 0 else []
    if method == "gptq":
        kw = {} if actorder is None else {"actorder": None if actorder == "none" else actorder}
        recipe.append(GPTQModifier(config_groups={"group_0": scheme}, block_size=block_size,
                                   dampening_frac=dampening_frac, **kw))
    else:
        recipe.append(QuantizationModifier(config_groups={"group_0": scheme}))
    return recipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--samples", required=True, help="safetensors file of calibration samples (see above)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=("gptq", "rtn", "w4a16"), default="gptq")
    ap.add_argument("--group_size", type=int, default=128, help="--method w4a16: columns per scale")
    ap.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant strength (0 = no SmoothQuant)")
    ap.add_argument("--order", choices=("shuffle", "given"), default="shuffle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--dampening_frac", type=float, default=0.01)
    ap.add_argument("--actorder", default=None, help="GPTQ act-order (default: llm-compressor's)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)

    import importlib.metadata as md

    import torch
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32)
    model.eval()
    processor = AutoProcessor.from_pretrained(a.model)
    t_load = time.perf_counter() - t0

    raw = load_file(a.samples)
    n = 1 + max(int(k.split(".")[0]) for k in raw)
    samples = []
    with torch.no_grad():
        emb = model.get_input_embeddings()
        image_token = model.config.image_token_id if hasattr(model.config, "image_token_id") \
            else model.config.image_token_index
        for i in range(n):
            ids, mask = raw[f"{i}.input_ids"], raw[f"{i}.attention_mask"]
            x = emb(ids)
            if f"{i}.pixel_values" in raw:
                feats = model.get_image_features(pixel_values=raw[f"{i}.pixel_values"].float())
                feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
                if isinstance(feats, (list, tuple)):
                    feats = torch.cat(list(feats), 0)
                feats = feats.reshape(-1, x.shape[-1]).to(x.dtype)
                if int((ids == image_token).sum()) == 1:  # a transformers-4 processor: one <image> per photo
                    p = int((ids[0] == image_token).nonzero()[0, 0])
                    ids = torch.cat([ids[:, :p], torch.full((1, feats.shape[0]), image_token, dtype=ids.dtype),
                                     ids[:, p + 1:]], 1)
                    mask = torch.ones_like(ids)
                    x = emb(ids)
                sel = (ids == image_token).unsqueeze(-1).expand_as(x)
                x = x.masked_scatter(sel, feats)
            samples.append({"inputs_embeds": x.detach(), "attention_mask": mask, "index": i,
                            "kind": "image" if f"{i}.pixel_values" in raw else "text"})
    if a.order == "shuffle":  # llm-compressor's default sampler for a dataset (shuffle_calibration_samples)
        g = torch.Generator().manual_seed(a.seed)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    ordered = [samples[i] for i in order]

    def collate(batch):
        (s,) = batch
        return {"inputs_embeds": s["inputs_embeds"], "attention_mask": s["attention_mask"]}

    loader = DataLoader(ordered, batch_size=1, shuffle=False, collate_fn=collate)
    recipe = build_recipe(a.method, a.alpha, a.block_size, a.dampening_frac, a.actorder, a.group_size)
    t1 = time.perf_counter()
    oneshot(model=model, recipe=recipe, dataset=loader, sequential_targets=["LlamaDecoderLayer"],
            num_calibration_samples=n)
    t_oneshot = time.perf_counter() - t1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    processor.save_pretrained(out)
    t_total = time.perf_counter() - t0
    info = {
        "method": a.method, "alpha": a.alpha, "order": [(i, samples[i]["kind"]) for i in order],
        "seed": a.seed if a.order == "shuffle" else None, "load_s": round(t_load, 2),
        "oneshot_s": round(t_oneshot, 2), "total_s": round(t_total, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "versions": {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
        "threads": torch.get_num_threads(), "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
