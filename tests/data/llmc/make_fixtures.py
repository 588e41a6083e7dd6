"""Regenerate the llm-compressor fixtures in this folder: real llm-compressor outputs of a tiny LLaVA.

    python tests/data/llmc/make_fixtures.py --llmc_python /path/to/.venv-llmc/bin/python

Run it with llavaq's python: it builds the float model with :func:`llavaq.testing.build_tiny_llava`
(:data:`FLOAT_MODEL`, llava-hf 4.37 keys like the hub checkpoints), then runs itself (``--stage llmc``) with
the python of a venv holding ``llmcompressor==0.14.0.1`` (it brings transformers 5.17 and compressed-tensors
0.19.0; torch 2.13.0 CPU first), which writes two outputs the way a user of llm-compressor would:

- ``w8a8_dynamic``: the W8A8 preset (int8 channel weights, per-token dynamic int8 inputs) with the ignore list
  of llm-compressor's LLaVA example (``re:.*lm_head``, ``re:.*multi_modal_projector.*``,
  ``re:.*vision_tower.*``), from the model loaded from its 4.37 keys. transformers 5 reverts its key renaming
  on save, so the keys are the 4.37 ones; compressed-tensors maps the ``ignore`` names to those checkpoint
  names too (``_map_to_checkpoint_names``), e.g. ``language_model.lm_head``.
- ``w8a8_static_newkeys``: static per-tensor asymmetric int8 inputs (llavaq's scheme), vision tower and
  projector quantized, ``down_proj`` / ``lm_head`` / one vision ``fc2`` ignored, calibrated on four random image
  prompts, from the model re-saved and re-loaded in transformers 5's own layout: keys and ``ignore`` are
  then in that layout (``model.language_model.…``, ``lm_head``, ``model.vision_tower.encoder.…``).

Beside each output, ``<name>.reference.safetensors`` holds inputs (``<input>.input_ids`` with one ``<image>``
token per image feature, ``.pixel_values``) and the logits of the saved output loaded back with
``from_pretrained(dtype=float32)`` in that venv (compressed-tensors decompresses W_q·ws and fake-quantizes the
inputs with the file's scales); ``w8a8_dynamic`` is loaded with the recipe's own ``re:`` ignore patterns,
since its saved ignore names do not match transformers 5's module names (the bug ``llavaq inspect``
reports). Only the weights/config/recipe files are kept (KBs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
#: build_tiny_llava arguments of the float model the fixtures were made from (the tests rebuild it)
FLOAT_MODEL = dict(seed=5, text_layers=1, vision_layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64,
                   vision_hidden=32, vision_heads=4, vision_intermediate=64, image_size=14, patch_size=7)
FIXTURES = ("w8a8_dynamic", "w8a8_static_newkeys")
KEEP = ("config.json", "model.safetensors", "recipe.yaml")


def build_float_model(out: Path) -> Path:
    from llavaq.testing import build_tiny_llava

    return build_tiny_llava(out, **FLOAT_MODEL)


def _reference_inputs(cfg: dict):
    import torch

    g = torch.Generator().manual_seed(0)
    vc = cfg["vision_config"]
    n_feat = (vc["image_size"] // vc["patch_size"]) ** 2
    img = cfg["image_token_index"]
    text = torch.tensor([[1, 45, 60, 75, 90, 105, 120, 135, 150, 165, 180, 195]])
    image = torch.cat([torch.tensor([1, 45, 60]), torch.full((n_feat,), img), torch.tensor([75, 90, 105, 120])])
    pix = torch.randn(1, 3, vc["image_size"], vc["image_size"], generator=g)
    return {"text": {"input_ids": text}, "image": {"input_ids": image.unsqueeze(0), "pixel_values": pix}}


def llmc_stage(model_dir: Path, out_root: Path) -> None:
    """Runs in the llm-compressor venv."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import save_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    cfg = json.loads((model_dir / "config.json").read_text())
    inputs = _reference_inputs(cfg)

    def reference(saved: Path, name: str, ignore: list[str] | None = None) -> None:
        """The saved file as compressed-tensors + transformers compute it, in float32: int8 weights decompressed
        to W_q·ws, inputs fake-quantized with the file's scales (``ignore``: patterns replacing the saved names)."""
        ref = Path(str(saved) + "-ref")
        shutil.copytree(saved, ref)
        if ignore is not None:
            c = json.loads((ref / "config.json").read_text())
            c["quantization_config"]["ignore"] = ignore
            (ref / "config.json").write_text(json.dumps(c))
        model, info = LlavaForConditionalGeneration.from_pretrained(str(ref), dtype=torch.float32,
                                                                    output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        tensors = {}
        with torch.no_grad():
            for key, kw in inputs.items():
                tensors[f"{key}.logits"] = model(**kw).logits[0].float().contiguous()
                for k, v in kw.items():
                    tensors[f"{key}.{k}"] = v.contiguous()
        save_file(tensors, str(out_root / f"{name}.reference.safetensors"))

    def keep(tmp: Path, name: str) -> None:
        dest = out_root / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in KEEP:
            if (tmp / f).is_file():
                shutil.copyfile(tmp / f, dest / f)

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        # A: the W8A8 preset, as llm-compressor's LLaVA example ignores things, from the 4.37 keys
        model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float16)
        example_ignore = ["re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_tower.*"]
        recipe = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=example_ignore)
        oneshot(model=model, recipe=recipe)
        model.save_pretrained(str(tmp / "a"))
        keep(tmp / "a", FIXTURES[0])
        # its saved ignore names (4.37 form) do not match transformers 5's modules: load with the recipe's own
        reference(tmp / "a", FIXTURES[0], ignore=example_ignore)

        # B: static per-tensor asymmetric inputs, from a model in transformers 5's own layout
        LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float16).save_pretrained(
            str(tmp / "newkeys"), save_original_format=False)
        model = LlavaForConditionalGeneration.from_pretrained(str(tmp / "newkeys"), dtype=torch.float16)
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor",
                                               dynamic=False))
        recipe = QuantizationModifier(config_groups={"group_0": scheme},
                                      ignore=["re:.*lm_head", "re:.*down_proj", "re:.*encoder.layers.0.mlp.fc2"])
        g = torch.Generator().manual_seed(1)
        n_feat = inputs["image"]["pixel_values"].shape[-1] // cfg["vision_config"]["patch_size"]
        rows = [[1, 45] + [cfg["image_token_index"]] * n_feat ** 2 + torch.randint(3, 250, (20,), generator=g).tolist()
                for _ in range(4)]
        size = cfg["vision_config"]["image_size"]
        pixels = [torch.randn(3, size, size, generator=g).tolist() for _ in rows]
        ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows],
                                "pixel_values": pixels})
        oneshot(model=model, recipe=recipe, dataset=ds, num_calibration_samples=len(rows), pipeline="basic",
                processor=AutoProcessor.from_pretrained(str(model_dir)))
        model.save_pretrained(str(tmp / "b"))
        keep(tmp / "b", FIXTURES[1])
        reference(tmp / "b", FIXTURES[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llmc_python", help="python of a venv with llmcompressor==0.14.0.1")
    p.add_argument("--stage", choices=["all", "llmc"], default="all")
    p.add_argument("--model_dir", help="(llmc stage) the float model")
    args = p.parse_args(argv)
    if args.stage == "llmc":
        llmc_stage(Path(args.model_dir), HERE)
        return 0
    if not args.llmc_python:
        p.error("--llmc_python is required")
    with tempfile.TemporaryDirectory() as td:
        model = build_float_model(Path(td) / "float")
        subprocess.run([args.llmc_python, str(Path(__file__).resolve()), "--stage", "llmc", "--model_dir", str(model)],
                       check=True)
    versions = subprocess.run([args.llmc_python, "-c", "import importlib.metadata as m; import json; print(json.dumps("
                               "{p: m.version(p) for p in ('llmcompressor', 'compressed-tensors', 'transformers', "
                               "'torch')}))"], check=True, capture_output=True, text=True).stdout
    (HERE / "VERSIONS.json").write_text(json.dumps({"float_model": FLOAT_MODEL, **json.loads(versions)}, indent=2)
                                        + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
