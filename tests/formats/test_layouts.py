"""Issue #18: LLaVA module names across transformers layouts (llavaq.formats.names) and the reader on each."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llavaq import api
from llavaq.formats.names import (
    LAYOUT_NAMES,
    entry_matches,
    layouts,
    matching_layouts,
    module_pattern,
    new_layout,
    to_internal,
)
from llavaq.formats.reader import read_quantized

NAMES = {  # internal (4.37): (4.52-5.5, >= 5.6)
    "language_model.model.layers.3.mlp.down_proj": ("model.language_model.layers.3.mlp.down_proj",) * 2,
    "language_model.lm_head": ("lm_head", "lm_head"),
    "vision_tower.vision_model.encoder.layers.7.self_attn.q_proj": (
        "model.vision_tower.vision_model.encoder.layers.7.self_attn.q_proj",
        "model.vision_tower.encoder.layers.7.self_attn.q_proj"),
    "multi_modal_projector.linear_2": ("model.multi_modal_projector.linear_2",) * 2,
}


@pytest.mark.parametrize("name", list(NAMES))
def test_layouts_and_back(name):
    assert layouts(name) == (name, *NAMES[name]) and new_layout(name) == NAMES[name][1]
    for other in (*layouts(name), *(n + ".weight" for n in layouts(name))):
        assert to_internal(other) in (name, name + ".weight")
    pat = module_pattern(name)
    assert pat.startswith("re:^") and pat.endswith("$")
    assert matching_layouts([pat], name) == (True,) * len(LAYOUT_NAMES)
    # anchored: neither a longer layer number, a prefix of the name, nor the same leaf elsewhere
    for other in (name.replace(".3.", ".13.").replace(".7.", ".17."), name + "_x", "x." + name):
        if other != name:
            assert not any(entry_matches(pat, n) for n in layouts(other)), other


def test_legacy_and_partial_key_forms():
    assert to_internal("model.language_model.model.layers.0.mlp.up_proj.weight") == \
        "language_model.model.layers.0.mlp.up_proj.weight"  # transformers 5.10-5.23's duplicate "legacy" form
    assert to_internal("vision_tower.encoder.layers.0.mlp.fc1.bias") == \
        "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"
    assert to_internal("lm_head.weight") == "language_model.lm_head.weight"
    assert to_internal("language_model.model.norm.weight") == "language_model.model.norm.weight"
    assert entry_matches("re:[", "x") is False  # a broken pattern matches nothing instead of raising


@pytest.mark.parametrize("layout", [1, 2])
def test_reader_reads_our_export_with_new_layout_keys(quantized, tiny_model, tmp_path, layout):
    """The same compressed-tensors export with its keys renamed as transformers 4.52-5.5 / >= 5.6 would save
    them: the reader gives the same kernel parameters, and the ignore patterns still cover every float Linear."""
    cal, _ = quantized
    src = api.export(tiny_model, cal.cache.path, tmp_path / "ct", format="compressed-tensors").save_directory
    dst = tmp_path / f"ct-layout{layout}"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    renamed = {layouts(k)[layout]: v for k, v in tensors.items()}
    assert len(renamed) == len(tensors) and any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, str(dst / "model.safetensors"), metadata={"format": "pt"})
    a, b = read_quantized(src), read_quantized(dst)
    assert b.check() == [] and a.check() == []
    assert a.quantized == b.quantized and a.float_names == b.float_names and len(a.quantized) == 26
    for n in a.quantized:
        la, lb = a.linear(n), b.linear(n)
        for attr in ("weight", "weight_scale", "input_scale", "input_offset", "deq_scale"):
            assert torch.equal(getattr(la, attr), getattr(lb, attr)), (n, attr)
    q = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert b.files.stored_name(q) == layouts(q)[layout]
    # a plain 4.37 ignore list is what breaks transformers >= 4.52: the check names the layout
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = a.float_linears
    (dst / "config.json").write_text(json.dumps(cfg))
    problems = read_quantized(dst).check()
    assert len(problems) == 3 and all(LAYOUT_NAMES[1] in p for p in problems), problems
