"""Full-size scale benchmark: quantize a 7B/13B-shaped LLaVA checkpoint end to end on this machine.

    python benchmarks/scale.py --size 7b|13b|both|bakllava-7b|interleave-qwen-7b|families
                               [--workdir DIR] [--m2_search full|fast] [--recipe K=V,...] [--keep]

1. Builds a FULL-SIZE checkpoint with the real config and seeded random fp16 weights (N(0, 0.02);
   norms ~1 with a few outlier channels), tensor by tensor (bounded memory), sharded like llava-hf
   ships it (``model-0000i-of-0000N.safetensors`` + index, 5 GB shards), with a tokenizer of the real
   size and the real image processor:
   * ``7b`` / ``13b``: llava-1.5-{7,13}b-hf (Llama-2 + CLIP-L/14-336; 32064-entry Llama tokenizer);
   * ``bakllava-7b``: bakLlava-v1-hf (Mistral-7B: GQA 32/8, FFN 14336, sliding window 4096 + CLIP-L/14-336);
   * ``interleave-qwen-7b``: llava-interleave-qwen-7b-hf (Qwen1.5-7B: q/k/v biases, 152000-entry table,
     rope_theta 1e6 + SigLIP-so400m/14-384 without its last layer and pooling head, 729 "full" features).
2. Measures, each in its own child process (``os.wait4`` gives that child's peak RSS):
   * ``quantize``: ``llavaq.api.quantize`` on two 640x480 photos, default recipe (m2, msModelSlim's
     groups: on bakLlava the CLIP layers, on llava-interleave none), msModelSlim format;
   * the physical floor: one plain float forward of the whole model over the same samples
     (layer-streamed fp32, the same builders), and one read + write of all the weights.
   ``--recipe K=V,...`` replaces recipe fields (e.g. ``anti_outlier=none,act_method=1,weight_method=gptq``:
   GPTQ's input moments in the cache and GPTQ weights at export); the table states it.
3. Appends a markdown table to ``docs/BENCHMARKS.md`` (machine, date, numbers).

A size runs only with enough free disk (checked first; skipped with a note).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import machine_info  # noqa: E402

# The published configs (llava-hf config.json files), written out: only the fields that shape the model.
CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
              layer_norm_eps=1e-5)
SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                     num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)


def _llama2(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)


LLAVA15 = dict(image_token_index=32000, pad_token_id=32001, vision_feature_layer=-2,
               vision_feature_select_strategy="default")
MODELS = {
    "7b": dict(name="LLaVA-1.5-7B", text=_llama2(4096, 32, 32, 11008), vision=CLIP_L, top=LLAVA15, tok="llama"),
    "13b": dict(name="LLaVA-1.5-13B", text=_llama2(5120, 40, 40, 13824), vision=CLIP_L, top=LLAVA15, tok="llama"),
    "bakllava-7b": dict(
        name="bakLlava-v1 (Mistral-7B + CLIP-L)", vision=CLIP_L, top=LLAVA15, tok="llama",
        text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)),
    "interleave-qwen-7b": dict(
        name="llava-interleave-qwen-7b (Qwen1.5-7B + SigLIP-so400m)", vision=SIGLIP_SO400M, tok="qwen2",
        top=dict(image_token_index=151646, vision_feature_layer=-1, vision_feature_select_strategy="full"),
        text=dict(model_type="qwen2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=152000, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
                  max_window_layers=28, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)),
}
# smoke tests of this script only (not benchmarks): the same families, tiny
_SMOKE_V = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
_SMOKE_T = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
for _key in ("7b", "bakllava-7b", "interleave-qwen-7b"):
    _m = MODELS[_key]
    _t = {**_m["text"], **_SMOKE_T}
    _t["num_key_value_heads"] = 4 if _t["num_key_value_heads"] == _t["num_attention_heads"] else 2
    MODELS["smoke" + ("" if _key == "7b" else "-" + _key.split("-")[0])] = dict(
        _m, name="smoke " + _m["name"], text=_t, vision={**_m["vision"], **_SMOKE_V})
GROUPS = {"both": ["7b", "13b"], "families": ["bakllava-7b", "interleave-qwen-7b"]}
SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB"
GIB = 1024**3


# ---------------------------------------------------------------------------------------------- build
def llava_config(size: str):
    from transformers import LlavaConfig

    m = MODELS[size]
    return LlavaConfig(vision_config=dict(m["vision"]), text_config=dict(m["text"]), projector_hidden_act="gelu",
                       tie_word_embeddings=False, torch_dtype="float16", **m["top"])


def build_tokenizer_32k():
    """Byte-level BPE Llama fast tokenizer with 32000 base entries, ``<image>`` 32000, ``<pad>`` 32001."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    from llavaq.testing import build_tokenizer

    small = build_tokenizer()._tokenizer  # trained on a small corpus; reuse its vocab and merges
    model = json.loads(small.to_str())["model"]
    vocab = {k: v for k, v in model["vocab"].items() if v < 32000}
    n = len(vocab)
    for i in range(32000 - n):  # filler entries (never produced by the merges) up to Llama's 32000
        vocab[f"<unused_{i}>"] = n + i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              add_bos_token=True, add_eos_token=False, legacy=False)
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.add_special_tokens({"pad_token": "<pad>"})
    assert fast.convert_tokens_to_ids("<image>") == LLAVA15["image_token_index"], fast.convert_tokens_to_ids("<image>")
    assert fast.convert_tokens_to_ids("<pad>") == LLAVA15["pad_token_id"]
    return fast


def build_tokenizer_qwen2():
    """Qwen2 fast tokenizer: 151643 entries, ``<|endoftext|>`` 151643 (pad), ``<|im_start|>``, ``<|im_end|>``
    (eos) 151645, ``<image>`` 151646, as llava-interleave-qwen ships it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    from llavaq.testing import build_qwen2_tokenizer

    small = build_qwen2_tokenizer()._tokenizer  # trained on a small corpus; reuse its vocab and merges
    model = json.loads(small.to_str())["model"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = sorted((k for k in model["vocab"] if k not in specials), key=model["vocab"].get)
    vocab = {k: i for i, k in enumerate(words)}
    for i in range(151643 - len(vocab)):  # fillers (never produced by the merges) up to Qwen's 151643
        vocab[f"<unused_{i}>"] = len(words) + i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*specials, "<image>"])
    fast = Qwen2TokenizerFast(tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    ids = [fast.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<image>")]
    assert ids == [151643, 151645, 151646], ids
    return fast


def _value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    is_norm = ("norm" in name or "layrnorm" in name) and name.endswith(".weight")
    if is_norm:
        t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        idx = torch.randperm(shape[0], generator=g)[:4]
        t[idx] *= torch.tensor([4.0, 6.0, 8.0, 12.0])  # a few outlier channels, as real norms have
        return t.half()
    return (0.02 * torch.randn(shape, generator=g)).half()


def build_checkpoint(out: Path, size: str, seed: int = 0) -> dict:
    """Write the full-size checkpoint tensor by tensor; returns {bytes, seconds}."""
    from transformers import LlavaForConditionalGeneration

    from llavaq.formats.sharding import SafetensorsFileWriter, TensorSpec
    from llavaq.testing import save_processor

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = llava_config(size)
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(cfg)
    absent = "vision_tower.vision_model.head." if not getattr(cfg.vision_config, "vision_use_head", True) else None
    specs = [TensorSpec(n, torch.float16, tuple(p.shape)) for n, p in meta.state_dict().items()
             if not (absent and n.startswith(absent))]  # llava-interleave ships no SigLIP head
    # transformers' shard_checkpoint rule: a new shard when the current one would exceed 5 GB
    shards: list[list[TensorSpec]] = [[]]
    cur = 0
    for s in specs:
        if shards[-1] and cur + s.nbytes > SHARD_BYTES:
            shards.append([])
            cur = 0
        shards[-1].append(s)
        cur += s.nbytes
    weight_map = {}
    total = 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsFileWriter(out / fname, {"format": "pt"}, group)
        for s in group:
            w.add(s.name, _value(s.name, s.shape, seed))
            weight_map[s.name] = fname
            total += s.nbytes
        w.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg_d = cfg.to_dict()
    cfg_d["architectures"] = ["LlavaForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(cfg_d, indent=2))
    m = MODELS[size]
    tokenizer = build_tokenizer_qwen2() if m["tok"] == "qwen2" else build_tokenizer_32k()
    save_processor(out, tokenizer, m["vision"]["image_size"], m["vision"]["model_type"] == "siglip_vision_model")
    return {"bytes": total, "shards": len(shards), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- phases
def parse_recipe(text: str) -> dict:
    """``K=V,...`` -> recipe fields (numbers and booleans parsed; the rest strings)."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, _, v = item.partition("=")
        try:
            out[k] = json.loads(v.lower() if v in ("True", "False") else v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def phase_quantize(model: Path, images: Path, work: Path, m2_search: str, recipe_fields: str = "") -> dict:
    import llavaq.calib.smoothing as engine  # where the engine calls os_plus_search
    from llavaq import api
    from llavaq.recipe import QuantRecipe

    m2 = {"seconds": 0.0, "calls": 0}
    real = engine.os_plus_search

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            m2["seconds"] += time.perf_counter() - t
            m2["calls"] += 1

    engine.os_plus_search = timed
    out, cache = work / "out", work / "cache"
    t0 = time.perf_counter()
    recipe = QuantRecipe(m2_search=m2_search).replace(**parse_recipe(recipe_fields))
    cal, exp = api.quantize(model, images, out, recipe, cache_dir=cache,
                            overwrite=True, device_type="cpu")
    wall = time.perf_counter() - t0
    return {"wall": wall, "calibrate": cal.seconds, "export": exp.seconds, "m2_seconds": m2["seconds"],
            "m2_calls": m2["calls"], "output_bytes": _du(out), "cache_bytes": _du(cache),
            "forward_passes": cal.forward_passes, "gptq_error": exp.gptq_error}


def phase_forward(model: Path, images: Path) -> dict:
    """One plain float forward of all samples, layer-streamed fp32 (as the engine streams layers)."""
    from llavaq.calib.images import load_images
    from llavaq.calib.samples import build_samples, load_processor
    from llavaq.model.checkpoint import Checkpoint
    from llavaq.model.forward import float_forward
    from llavaq.model.llava import LlavaArch
    from llavaq.recipe import DEFAULT_PROMPT

    arch = LlavaArch(Checkpoint(model))
    samples = build_samples(load_processor(model), load_images(images).images, DEFAULT_PROMPT)
    per_sample = [0.0] * len(samples)

    def timed(j: int, seconds: float) -> None:
        per_sample[j] += seconds

    t0 = time.perf_counter()
    float_forward(arch, samples, timed)
    return {"wall": time.perf_counter() - t0, "compute_per_sample": per_sample,
            "text_tokens": [int(s.input_ids.shape[1]) for s in samples]}


def phase_io(model: Path, work: Path) -> dict:
    """Read every weight once (positional reads) and write it once (streaming writer, layout planned
    from the checkpoint's headers, so the copy needs its own size on disk and nothing more)."""
    from llavaq.formats.sharding import TensorSpec, save_file_streamed
    from llavaq.model.checkpoint import Checkpoint

    ck = Checkpoint(model)
    dst = work / "io-copy.safetensors"
    specs = [TensorSpec(name, ck.dtype_of(name), ck.shape(name)) for name in ck.names]
    t0 = time.perf_counter()
    n = save_file_streamed(((name, ck.tensor(name, None)) for name in ck.names), dst, specs=specs)
    os.sync()
    sec = time.perf_counter() - t0
    dst.unlink()
    return {"seconds": sec, "bytes": n}


# ---------------------------------------------------------------------------------------------- driver
def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) if Path(p).exists() else 0


def child(args: list[str]) -> tuple[dict, float, int]:
    """Run ``scale.py <phase>`` in a child; return (its JSON result, wall seconds, its peak RSS bytes)."""
    t0 = time.perf_counter()
    res_file = Path(args[args.index("--result") + 1])
    p = subprocess.Popen([sys.executable, __file__, *args])
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"phase {args[0]} failed with exit code {p.returncode}")
    return json.loads(res_file.read_text()), time.perf_counter() - t0, ru.ru_maxrss * 1024


def _weight_bytes(size: str) -> int:
    """The checkpoint's fp16 bytes, from the model built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(llava_config(size))
    return sum(p.numel() * 2 for p in meta.parameters())


def run_size(size: str, work: Path, images: Path, m2_search: str, keep: bool, log, recipe: str = "") -> dict:
    model = work / f"{size}-random"
    weights = _weight_bytes(size)
    built = (model / "model.safetensors.index.json").exists()
    # the checkpoint (unless built), then the larger of the I/O floor's copy and output + cache
    need = (0 if built else weights) + 1.2 * weights
    free = shutil.disk_usage(work).free
    if free < need:
        return {"size": size, "skipped": f"needs ~{need / GIB:.0f} GiB free disk, {free / GIB:.0f} GiB free"}
    r: dict = {"size": size}
    if not built:
        log(f"[{size}] building the checkpoint in {model}")
        r["build"], r["build_wall"], r["build_rss"] = child(["build", str(model), size, "--result",
                                                             str(work / f"{size}-build.json")])
    r["model_bytes"] = _du(model)
    log(f"[{size}] floor: read + write the weights once")
    r["io"], _, r["io_rss"] = child(["io", str(model), str(work), "--result", str(work / f"{size}-io.json")])
    log(f"[{size}] floor: one float forward over the calibration samples")
    r["fwd"], _, r["fwd_rss"] = child(["forward", str(model), str(images), "--result",
                                       str(work / f"{size}-fwd.json")])
    log(f"[{size}] quantize (m2_search={m2_search})")
    qwork = work / f"{size}-q"
    load = os.getloadavg()[0]
    r["q"], r["q_wall"], r["q_rss"] = child(["quantize", str(model), str(images), str(qwork), m2_search, recipe,
                                             "--result", str(work / f"{size}-q.json")])
    r["q_load"] = (load + os.getloadavg()[0]) / 2  # other processes on the machine: the wall time's share
    if not keep:
        shutil.rmtree(qwork, ignore_errors=True)
    log(f"[{size}] done: {json.dumps(r)}")
    return r


def table(results: list[dict], m: dict, m2_search: str, recipe: str = "") -> str:
    lines = [
        f"### Scale benchmark ({m['date']}; {m['nproc']} CPU cores ({m['cpu']}), {m['ram_gib']:.0f} GiB RAM, "
        f"torch {m['torch']}; `python benchmarks/scale.py`, m2_search={m2_search}"
        + (f", `--recipe {recipe}`" if recipe else "") + ")",
        "",
        "Random-weight full-size checkpoints with the real llava-hf configs (fp16, 5 GB shards as llava-hf "
        "ships them), two 640x480 photos (336 px CLIP: ~600 tokens each; 384 px SigLIP: ~760), default recipe "
        "(m2 on msModelSlim's groups), layer-streamed, CPU only. Peak RSS is each child process's own "
        "(`os.wait4`, its `ru_maxrss`). CPU time is the quantize process's own (user + system): on a shared "
        "machine (load average in the last column) the wall time grows, the CPU time does not.",
        "",
        "| model | weights | quantize wall (CPU time) | of which m2 search | export | peak RSS (quantize) "
        "| output + cache written | float forward (all samples / sample 0 compute) | read+write weights once "
        "| m2 ÷ fwd(sample 0) | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {MODELS[r['size']]['name']} | skipped: {r['skipped']} ||||||||||")
            continue
        q, f, io = r.get("q"), r.get("fwd"), r.get("io")
        f0 = f["compute_per_sample"][0] if f else None
        cells = [
            MODELS[r["size"]]["name"], f"{r['model_bytes'] / GIB:.1f} GiB",
            (f"{q['wall'] / 60:.1f} min" + (f" ({q['cpu_seconds'] / 60:.1f} min)" if "cpu_seconds" in q else "")
             if q else "—"), f"{q['m2_seconds'] / 60:.1f} min" if q else "—",
            f"{q['export'] / 60:.1f} min" if q else "—", f"{r['q_rss'] / GIB:.2f} GiB" if q else "—",
            (f"{(q['output_bytes'] + q['cache_bytes']) / GIB:.1f} GiB (cache {q['cache_bytes'] / GIB:.2f})"
             if q else "—"),
            f"{f['wall'] / 60:.1f} min / {f0 / 60:.1f} min (peak RSS {r['fwd_rss'] / GIB:.2f} GiB)" if f else "—",
            f"{io['seconds'] / 60:.1f} min ({io['bytes'] / GIB:.1f} GiB)" if io else "—",
            f"{q['m2_seconds'] / f0:.1f}×" if q and f0 else "—",
            f"{r['q_load']:.1f}" if "q_load" in r else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("build", "io", "forward", "quantize"):
        phase, rest = sys.argv[1], sys.argv[2:]
        result = Path(rest[rest.index("--result") + 1])
        pos = rest[:rest.index("--result")]
        torch.set_num_threads(int(os.environ.get("LLAVAQ_BENCH_THREADS", os.cpu_count() or 1)))
        if phase == "build":
            res = build_checkpoint(Path(pos[0]), pos[1])
        elif phase == "io":
            res = phase_io(Path(pos[0]), Path(pos[1]))
        elif phase == "forward":
            res = phase_forward(Path(pos[0]), Path(pos[1]))
        else:
            res = phase_quantize(Path(pos[0]), Path(pos[1]), Path(pos[2]), pos[3], pos[4] if len(pos) > 4 else "")
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)  # CPU time: what the phase costs whatever else runs
        res["cpu_seconds"] = ru.ru_utime + ru.ru_stime
        result.write_text(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=[*MODELS, *GROUPS], default="7b")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-scale")
    ap.add_argument("--images", type=Path, default=None, help="calibration photos (default: 2 from calibImages/)")
    ap.add_argument("--m2_search", choices=["full", "fast"], default="full",
                    help="the m2 search to measure (default: full, llavaq's own default)")
    ap.add_argument("--recipe", default="", help="recipe fields K=V,... (default: msModelSlim's recipe)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized output and cache")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    a = ap.parse_args()
    work = a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    images = a.images
    if images is None:
        images = work / "images"
        images.mkdir(exist_ok=True)
        src = sorted((ROOT / "calibImages").glob("*.jpg"))[:2]
        if src:
            for f in src:
                shutil.copyfile(f, images / f.name)
        else:
            from llavaq.testing import write_test_images

            write_test_images(images, sizes=((640, 480), (480, 640)))

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    m = machine_info()
    sizes = GROUPS.get(a.size, [a.size])
    parse_recipe(a.recipe)  # fail here, not in the child
    results = [run_size(s, work, images, a.m2_search, a.keep, log, a.recipe) for s in sizes]
    (work / "results.json").write_text(json.dumps({"machine": m, "results": results}, indent=2))
    text = table(results, m, a.m2_search, a.recipe)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    head = "" if a.report.exists() else "# Benchmarks\n\n"
    with open(a.report, "a") as f:
        f.write(head + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
