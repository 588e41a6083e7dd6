"""Full-size scale benchmark: quantize a LLaVA-1.5-7B (and 13B) shaped checkpoint end to end on this machine.

    python benchmarks/scale.py --size 7b [--workdir DIR] [--m2_search full|fast] [--keep]

1. Builds a FULL-SIZE llava-1.5-{7b,13b}-hf checkpoint with the real config and seeded random fp16
   weights (N(0, 0.02); norms ~1 with a few outlier channels), tensor by tensor (bounded memory),
   sharded exactly like llava-hf ships it (``model-0000i-of-00003.safetensors`` + index, 5 GB
   shards), with a Llama fast tokenizer of the real size (``<image>`` = 32000, ``<pad>`` = 32001,
   embedding table 32064) and a 336 px CLIP processor.
2. Measures, each in its own child process (``os.wait4`` gives that child's peak RSS):
   * ``quantize``: ``llavaq.api.quantize`` on two 640x480 photos, m2 anti-outlier (time of the m2
     search recorded separately), msModelSlim format;
   * the physical floor: one plain float forward of the whole model over the same samples
     (layer-streamed fp32, the same builders), and one read + write of all the weights.
3. Appends a markdown table to ``docs/BENCHMARKS.md`` (machine, date, numbers).

13B runs only with ``--size 13b|both`` and enough free disk (checked first; skipped with a note).
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

CLIP_L = dict(v_hidden=1024, v_layers=24, v_heads=16, v_intermediate=4096)
SIZES = {
    "7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008, **CLIP_L),
    "13b": dict(hidden=5120, layers=40, heads=40, intermediate=13824, **CLIP_L),
    # smoke test of this script only (not a benchmark)
    "smoke": dict(hidden=128, layers=2, heads=4, intermediate=256, v_hidden=64, v_layers=3, v_heads=4,
                  v_intermediate=128),
}
VOCAB = 32064
IMAGE_TOKEN, PAD_TOKEN = 32000, 32001
SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB"
GIB = 1024**3


# ---------------------------------------------------------------------------------------------- build
def llava_config(size: str):
    from transformers import LlavaConfig

    s = SIZES[size]
    return LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=s["v_hidden"], intermediate_size=s["v_intermediate"],
            num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"], image_size=336, patch_size=14,
            projection_dim=768, hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            model_type="llama", hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
            vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        image_token_index=IMAGE_TOKEN, pad_token_id=PAD_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
        torch_dtype="float16",
    )


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
    assert fast.convert_tokens_to_ids("<image>") == IMAGE_TOKEN, fast.convert_tokens_to_ids("<image>")
    assert fast.convert_tokens_to_ids("<pad>") == PAD_TOKEN
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
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from llavaq.formats.sharding import SafetensorsFileWriter, TensorSpec

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg = llava_config(size)
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(cfg)
    specs = [TensorSpec(n, torch.float16, tuple(p.shape)) for n, p in meta.state_dict().items()]
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
    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                            do_center_crop=True, do_resize=True, do_normalize=True,
                            image_mean=[0.48145466, 0.4578275, 0.40821073],
                            image_std=[0.26862954, 0.26130258, 0.27577711])
    LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer_32k()).save_pretrained(out)
    return {"bytes": total, "shards": len(shards), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- phases
def phase_quantize(model: Path, images: Path, work: Path, m2_search: str) -> dict:
    import llavaq.calib.engine as engine
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
    cal, exp = api.quantize(model, images, out, QuantRecipe(m2_search=m2_search), cache_dir=cache,
                            overwrite=True, device_type="cpu")
    wall = time.perf_counter() - t0
    return {"wall": wall, "calibrate": cal.seconds, "export": exp.seconds, "m2_seconds": m2["seconds"],
            "m2_calls": m2["calls"], "output_bytes": _du(out), "cache_bytes": _du(cache),
            "forward_passes": cal.forward_passes}


@torch.no_grad()
def phase_forward(model: Path, images: Path) -> dict:
    """One plain float forward of all samples, layer-streamed fp32 (as the engine streams layers)."""
    from llavaq.calib.images import load_images
    from llavaq.calib.samples import build_samples, load_processor
    from llavaq.model.checkpoint import Checkpoint
    from llavaq.model.llava import LlavaArch
    from llavaq.recipe import DEFAULT_PROMPT

    arch = LlavaArch(Checkpoint(model))
    samples = build_samples(load_processor(model), load_images(images).images, DEFAULT_PROMPT)
    per_sample = [0.0] * len(samples)
    t0 = time.perf_counter()

    def run(fn, hs):
        out = []
        for j, h in enumerate(hs):
            t = time.perf_counter()
            out.append(fn(h, j))
            per_sample[j] += time.perf_counter() - t
        return out

    emb = arch.build_vision_embeddings()
    hs = run(lambda h, j: emb(samples[j].pixel_values), samples)
    feat = None
    fidx = arch.config.vision_feature_layer % (arch.n_vision_layers + 1)
    for i in range(arch.n_vision_layers):
        if i == fidx:
            feat = hs
        layer = arch.build_vision_layer(i)
        hs = run(lambda h, j, layer=layer: layer(h, None, None)[0], hs)
        del layer
    if feat is None:
        feat = hs
    proj = arch.build_projector()
    feat = run(lambda h, j: proj(h[:, 1:]), feat)
    embed = arch.build_token_embedding()
    lm_in = []
    for j, s in enumerate(samples):
        e, mask2d, pos = arch.merge_image_features(feat[j], embed(s.input_ids), s.input_ids, s.attention_mask)
        lm_in.append((arch.causal_mask(mask2d, e), pos))
        feat[j] = e
    del embed
    hs = feat
    for i in range(arch.n_text_layers):
        layer = arch.build_text_layer(i)
        hs = run(lambda h, j, layer=layer: layer(h, attention_mask=lm_in[j][0], position_ids=lm_in[j][1])[0], hs)
        del layer
    norm = arch.build_final_norm()
    head = arch.lm_head_weight()
    run(lambda h, j: norm(h) @ head.T, hs)
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


def run_size(size: str, work: Path, images: Path, m2_search: str, keep: bool, log) -> dict:
    model = work / f"llava-1.5-{size}-random"
    weights = SIZES[size]["hidden"] ** 2 * SIZES[size]["layers"] * 12 * 2  # fp16 bytes, roughly
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
    r["q"], r["q_wall"], r["q_rss"] = child(["quantize", str(model), str(images), str(qwork), m2_search,
                                             "--result", str(work / f"{size}-q.json")])
    if not keep:
        shutil.rmtree(qwork, ignore_errors=True)
    log(f"[{size}] done: {json.dumps(r)}")
    return r


def table(results: list[dict], m: dict, m2_search: str) -> str:
    lines = [
        f"### Scale benchmark ({m['date']}; {m['nproc']} CPU cores ({m['cpu']}), {m['ram_gib']:.0f} GiB RAM, "
        f"torch {m['torch']}; `python benchmarks/scale.py`, m2_search={m2_search})",
        "",
        "Random-weight full-size checkpoints with the real llava-1.5-hf configs (fp16, 5 GB shards as llava-hf "
        "ships them: 3 for 7B, 6 for 13B), two 640x480 "
        "photos at 336 px (~600 tokens each), layer-streamed, CPU only. Peak RSS is each child process's own "
        "(`os.wait4`, its `ru_maxrss`).",
        "",
        "| model | weights | quantize wall | of which m2 search | export | peak RSS (quantize) | output + cache "
        "written | float forward (all samples / sample 0 compute) | read+write weights once | m2 ÷ fwd(sample 0) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| LLaVA-1.5-{r['size'].upper()} | skipped: {r['skipped']} |||||||||")
            continue
        q, f, io = r.get("q"), r.get("fwd"), r.get("io")
        f0 = f["compute_per_sample"][0] if f else None
        cells = [
            f"LLaVA-1.5-{r['size'].upper()}", f"{r['model_bytes'] / GIB:.1f} GiB",
            f"{q['wall'] / 60:.1f} min" if q else "—", f"{q['m2_seconds'] / 60:.1f} min" if q else "—",
            f"{q['export'] / 60:.1f} min" if q else "—", f"{r['q_rss'] / GIB:.2f} GiB" if q else "—",
            f"{(q['output_bytes'] + q['cache_bytes']) / GIB:.1f} GiB" if q else "—",
            f"{f['wall'] / 60:.1f} min / {f0 / 60:.1f} min (peak RSS {r['fwd_rss'] / GIB:.2f} GiB)" if f else "—",
            f"{io['seconds'] / 60:.1f} min ({io['bytes'] / GIB:.1f} GiB)" if io else "—",
            f"{q['m2_seconds'] / f0:.1f}×" if q and f0 else "—",
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
            res = phase_quantize(Path(pos[0]), Path(pos[1]), Path(pos[2]), pos[3])
        result.write_text(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["7b", "13b", "both", "smoke"], default="7b")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-scale")
    ap.add_argument("--images", type=Path, default=None, help="calibration photos (default: 2 from calibImages/)")
    ap.add_argument("--m2_search", choices=["full", "fast"], default="full",
                    help="the m2 search to measure (default: full, llavaq's own default)")
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
    sizes = ["7b", "13b"] if a.size == "both" else [a.size]
    results = [run_size(s, work, images, a.m2_search, a.keep, log) for s in sizes]
    (work / "results.json").write_text(json.dumps({"machine": m, "results": results}, indent=2))
    text = table(results, m, a.m2_search)
    a.report.parent.mkdir(parents=True, exist_ok=True)
    head = "" if a.report.exists() else "# Benchmarks\n\n"
    with open(a.report, "a") as f:
        f.write(head + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
