"""Reference runner: msModelSlim's LLaVA-1.5 W8A8 example flow, for parity tests and benchmarks.

Run it with the python of a venv that has msModelSlim 26.1.0 (``scripts/setup_msms_env.sh``);
llavaq never imports this file. It reproduces ``example/multimodal_vlm/LLaVA/quant_llava.py``
(msModelSlim 26.1.0) on CPU:

1. ``AutoProcessor.from_pretrained(model, local_files_only=True, pad_token="<pad>")``;
2. ``LlavaForConditionalGeneration.from_pretrained(model, torch_dtype=float32, device_map="cpu")``;
3. ``disable_names`` = every ``language_model.model.layers.N.mlp.down_proj`` + ``language_model.lm_head``;
4. one sample per image: ``[input_ids, pixel_values, attention_mask]`` from
   ``processor(images=img, text=PROMPT, return_tensors="pt")``;
5. ``AntiOutlier(model, calib_data, AntiOutlierConfig(w_bit=8, a_bit=8, anti_method="m2",
   dev_type="cpu")).process()``;
6. ``Calibrator(model, QuantConfig(w_bit=8, a_bit=8, disable_names=..., dev_type="cpu", act_method=2,
   mm_tensor=False), calib_data, disable_level="L0").run()``;
7. ``calibrator.save(out, save_type=["ascendV1"] | ["safe_tensor"], part_file_size=G)``;
8. the example's ``VlmSafeGenerator`` step (``example/common/vlm_utils.py`` is not shipped in the
   26.1.0 wheel, so it is re-implemented here from the notes): config.json rewritten (indent 4)
   with ``torch_dtype`` = the checkpoint's dtype name and, for ``--mindie_format``, ``quantize``,
   ``vision_config.quantize`` and ``quantization_config``; every other ``*.json``/``*.py`` of the
   model dir except ``model.safetensors.index.json`` copied with mode 0o600.

Deliberate deviations from upstream:
- calibration images are SORTED by file name (upstream iterates ``os.listdir`` order, which makes
  the anti-outlier sample - always sample 0 - filesystem dependent);
- msModelSlim is run inside a temporary working directory, because it writes ``features.npy``
  (and possibly other scratch files) into the cwd;
- if the model ties input and output embeddings, ``lm_head`` gets its own copy of the weight
  before anything runs (msModelSlim's safetensors writer crashes on shared tensors);
- ``--part_unit_bytes N`` (tests only) redefines msModelSlim's shard unit (1 GiB) as N bytes so that
  tiny models can be sharded; msModelSlim itself only accepts an integer ``part_file_size >= 1`` (GB);
- ``--dtype`` can override the float32 CPU load dtype (upstream: float32 on CPU);
- ``--processor parts`` builds the processor from its parts, ``AutoTokenizer`` (fast) + ``AutoImageProcessor``,
  joined as ``LlavaProcessor.__call__`` joins them. Upstream's ``AutoProcessor`` cannot load llava-interleave
  checkpoints on transformers 4.37.2: ``LlavaProcessor`` forces a ``LlamaTokenizerFast`` (a Qwen2 tokenizer
  has no BOS: "add_bos_token = True but bos_token = None") and a ``CLIPImageProcessor`` (the checkpoint's
  is a ``SiglipImageProcessor``). Only the processor changes; the quantization flow is upstream's;
- ``--disable NAME`` (repeatable) adds NAME to ``disable_names``. On a SigLIP tower upstream crashes in
  ``calibrator.save`` (``'NoneType' object has no attribute 'cpu'``): the pooling head's
  ``attention.out_proj`` is an ``nn.Linear`` that ``nn.MultiheadAttention`` never calls, so its quantizer
  never sees an input and has no ``input_scale``. Disabling it (float, as llavaq keeps it) lets the rest
  of upstream's flow run and be compared.

Weight-only (``--a_bit 16``, issue 28): msModelSlim's data-free weight quantization, as its W8A16 / W4A16 docs
run it: no anti-outlier, ``QuantConfig(w_bit, a_bit=16, w_sym, mm_tensor=False)`` and, for ``--group_size N``,
its per-group switches ``is_lowbit=True, open_outlier=False, group_size=N``; ``Calibrator(..., calib_data=None)``.
The config.json edit for ``--mindie_format`` then says ``w8a16`` / ``w4a16`` with those values.

The last stdout line is a JSON object with timings (seconds) and peak RSS (bytes) of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "USER: <image>\nDescribe this image in detail. ASSISTANT:"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_path", required=True)
    p.add_argument("--calib_images", required=True)
    p.add_argument("--save_directory", required=True)
    p.add_argument("--part_file_size", type=int, default=None, help="GB per shard (msModelSlim: int >= 1)")
    p.add_argument("--part_unit_bytes", type=int, default=None,
                   help="TEST ONLY: bytes per 'GB' of --part_file_size (patches the 1 GiB constant)")
    p.add_argument("--mindie_format", action="store_true")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dev_type", default="cpu", help="only recorded in quantization_config (runs on CPU)")
    p.add_argument("--disable", action="append", default=[], help="extra disable_names (see above)")
    p.add_argument("--w_bit", type=int, default=8, choices=[4, 8])
    p.add_argument("--a_bit", type=int, default=8, choices=[8, 16])
    p.add_argument("--group_size", type=int, default=0, help="weight-only: per-group (0: per channel)")
    p.add_argument("--w_sym", default="true", choices=["true", "false"])
    p.add_argument("--processor", default="auto", choices=["auto", "parts"],
                   help="auto: AutoProcessor (upstream); parts: AutoTokenizer + AutoImageProcessor (see above)")
    return p.parse_args(argv)


def list_images(calib_dir: Path) -> list[Path]:
    files = sorted(p for p in calib_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"msms_runner: no images in {calib_dir}")
    return files


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def untie_lm_head(model) -> bool:
    lm = model.language_model.lm_head
    emb = model.language_model.get_input_embeddings()
    if lm.weight.data_ptr() == emb.weight.data_ptr():
        import torch

        lm.weight = torch.nn.Parameter(lm.weight.detach().clone(), requires_grad=False)
        return True
    return False


def write_config_and_copy(model_path: Path, out: Path, orig_dtype: str, mindie: bool, dev_type: str,
                          args=None) -> None:
    """Equivalent of the example's VlmSafeGenerator (config.json rewrite + json/py copy)."""
    config = json.loads((model_path / "config.json").read_text())
    config["torch_dtype"] = orig_dtype
    w_bit, a_bit = (args.w_bit, args.a_bit) if args is not None else (8, 8)
    gs, sym = (args.group_size, args.w_sym == "true") if args is not None else (0, True)
    if mindie:
        qt = f"w{w_bit}a{a_bit}"
        config["quantize"] = qt
        config.setdefault("vision_config", {})["quantize"] = qt
        config["quantization_config"] = {
            "group_size": gs, "act_method": 2, "anti_method": "m2" if a_bit == 8 else "", "is_lowbit": gs > 0,
            "mm_tensor": False, "w_sym": sym, "open_outlier": gs == 0, "is_dynamic": False, "w_bit": w_bit,
            "a_bit": a_bit, "dev_type": dev_type,
        }
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(config, indent=4))
    os.chmod(cfg_path, stat.S_IRUSR | stat.S_IWUSR)
    for src in sorted(model_path.iterdir()):
        if src.suffix not in (".json", ".py") or src.name in ("config.json", "model.safetensors.index.json"):
            continue
        dst = out / src.name
        shutil.copyfile(src, dst)
        os.chmod(dst, stat.S_IRUSR | stat.S_IWUSR)


class PartsProcessor:
    """``LlavaProcessor.__call__`` (transformers 4.37.2) over ``AutoImageProcessor`` + a fast ``AutoTokenizer``."""

    def __init__(self, path: str) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)

    def __call__(self, text=None, images=None, return_tensors="pt"):
        pixel_values = self.image_processor(images, return_tensors=return_tensors)["pixel_values"]
        return {**self.tokenizer(text, return_tensors=return_tensors), "pixel_values": pixel_values}


def main(argv=None) -> int:
    args = parse_args(argv)
    model_path = Path(args.model_path).resolve()
    calib_dir = Path(args.calib_images).resolve()
    out = Path(args.save_directory).resolve()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    import torch
    from msmodelslim.pytorch.llm_ptq.anti_outlier import AntiOutlier, AntiOutlierConfig
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    timings["import_s"] = time.perf_counter() - t0
    orig_dtype = json.loads((model_path / "config.json").read_text()).get("torch_dtype", "float16")
    dtype = getattr(torch, args.dtype)

    t = time.perf_counter()
    if args.processor == "auto":
        processor = AutoProcessor.from_pretrained(str(model_path), local_files_only=True, pad_token="<pad>")
    else:
        processor = PartsProcessor(str(model_path))
    config = AutoConfig.from_pretrained(str(model_path), local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        str(model_path), local_files_only=True, torch_dtype=dtype, device_map="cpu"
    ).eval()
    untied = untie_lm_head(model)
    timings["load_s"] = time.perf_counter() - t

    n_layers = config.text_config.num_hidden_layers
    disable_names = [f"language_model.model.layers.{i}.mlp.down_proj" for i in range(n_layers)]
    disable_names.append("language_model.lm_head")
    disable_names += args.disable

    images = list_images(calib_dir)
    calib_data = []
    for path in images:
        with Image.open(path) as img:
            inputs = processor(images=img.convert("RGB") if img.mode != "RGB" else img, text=PROMPT,
                               return_tensors="pt")
        calib_data.append([inputs["input_ids"], inputs["pixel_values"].to(dtype), inputs["attention_mask"]])

    out.mkdir(parents=True, exist_ok=True)
    prev_cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="msms_cwd_") as scratch:
        os.chdir(scratch)
        try:
            t = time.perf_counter()
            if args.a_bit == 8:
                anti_cfg = AntiOutlierConfig(w_bit=8, a_bit=8, anti_method="m2", dev_type="cpu")
                AntiOutlier(model, calib_data=calib_data, cfg=anti_cfg).process()
            timings["anti_outlier_s"] = time.perf_counter() - t

            t = time.perf_counter()
            if args.a_bit == 8:
                quant_cfg = QuantConfig(w_bit=8, a_bit=8, disable_names=disable_names, dev_type="cpu",
                                        act_method=2, mm_tensor=False)
            else:  # weight-only: data-free round-to-nearest
                groups = dict(is_lowbit=True, open_outlier=False, group_size=args.group_size) if args.group_size else {}
                quant_cfg = QuantConfig(w_bit=args.w_bit, a_bit=16, disable_names=disable_names, dev_type="cpu",
                                        w_sym=args.w_sym == "true", mm_tensor=False, **groups)
                calib_data = None
            calibrator = Calibrator(model, quant_cfg, calib_data=calib_data, disable_level="L0")
            calibrator.run()
            timings["calibrate_s"] = time.perf_counter() - t

            t = time.perf_counter()
            if args.part_unit_bytes is not None:
                from msmodelslim.pytorch.llm_ptq.llm_ptq_tools.save.writer import buffered_safetensor

                buffered_safetensor.ONE_GB_FILE_BYTES = args.part_unit_bytes
            save_type = ["safe_tensor"] if args.mindie_format else ["ascendV1"]
            calibrator.save(str(out), save_type=save_type, part_file_size=args.part_file_size)
            timings["save_s"] = time.perf_counter() - t
        finally:
            os.chdir(prev_cwd)
    write_config_and_copy(model_path, out, orig_dtype, args.mindie_format, args.dev_type, args)
    timings["total_s"] = time.perf_counter() - t0
    result = {
        "tool": "msmodelslim", "images": [p.name for p in images], "untied_lm_head": untied,
        **{k: round(v, 4) for k, v in timings.items()}, "peak_rss_bytes": peak_rss_bytes(),
    }
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
