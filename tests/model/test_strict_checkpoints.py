"""Issue 24: checkpoints read strictly and unambiguously; already-quantized inputs and insane configs refused
before any model is built. Every case: one error line, the input byte-identical afterwards."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hostile_guard import cli, guard, one_error  # noqa: F401  (guard is a fixture)
from safetensors.torch import load_file, save_file

from llavaq.errors import ModelError
from llavaq.model.checkpoint import read_safetensors_header

W = "model.safetensors"


def _run(capsys, model: Path, tmp_path: Path, calib_dir: Path):
    return cli(capsys, "quantize", "--model_path", model, "--calib_images", calib_dir, "--save_directory",
               tmp_path / "out", "--device_type", "cpu", "--cache_dir", tmp_path / "cache")


def _rewrite_header(f: Path, edit) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def _overlap(h):
    a, b = _two(h)
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]  # b reads a's bytes


def _metadata_not_str(h):
    h["__metadata__"] = {"format": {"nested": 1}}


def _bad_dtype(h):
    h[_two(h)[0]]["dtype"] = "F8_E9M9"


def _negative_shape(h):
    h[_two(h)[0]]["shape"] = [-1, 4]


def _nested(h):
    a = _two(h)[0]
    h[a] = {"inner": h[a]}


def _shape_vs_bytes(h):
    a = _two(h)[0]
    h[a]["shape"] = [*h[a]["shape"][:-1], h[a]["shape"][-1] + 1]


HEADER_CASES = {"overlapping_offsets": (_overlap, "overlaps"), "metadata_not_str": (_metadata_not_str, "__metadata__"),
                "unknown_dtype": (_bad_dtype, "F8_E9M9"), "negative_shape": (_negative_shape, "corrupted"),
                "nested_entry": (_nested, "corrupted"), "shape_vs_bytes": (_shape_vs_bytes, "bytes")}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_bad_header_refused_like_the_safetensors_library(case, model, calib_dir, tmp_path, guard, capsys):  # noqa: F811
    edit, needle = HEADER_CASES[case]
    _rewrite_header(model / W, edit)
    if case != "metadata_not_str":  # the library is the reference: it refuses these files too
        with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type differs across versions)
            load_file(str(model / W))
    guard.watch(model, calib_dir)
    one_error(_run(capsys, model, tmp_path, calib_dir), str(model / W), needle)
    assert not (tmp_path / "cache").exists()


def test_trailing_bytes_and_duplicate_keys_refused(tmp_path):
    f = tmp_path / "a.safetensors"
    save_file({"x": __import__("torch").ones(2)}, str(f))
    good = f.read_bytes()
    f.write_bytes(good + b"\0" * 8)
    with pytest.raises(ModelError, match="after the last tensor"):
        read_safetensors_header(f)
    (n,) = struct.unpack("<Q", good[:8])
    head = good[8:8 + n].decode().rstrip()
    dup = head[:-1] + ',"x":' + json.dumps(json.loads(head)["x"]) + "}"
    dup += " " * (-len(dup) % 8)
    f.write_bytes(struct.pack("<Q", len(dup)) + dup.encode() + good[8 + n:])
    with pytest.raises(ModelError, match="duplicate key"):
        read_safetensors_header(f)


# ------------------------------------------------------------------------------------------- which files
def _stray(model: Path) -> str:
    sd = load_file(str(model / W))
    name = sorted(sd)[0]
    save_file({name: sd[name] * 0}, str(model / "extra.safetensors"))
    return "extra.safetensors"


def _sharded_with_stray(model: Path) -> str:
    sd = load_file(str(model / W))
    names = sorted(sd)
    half = len(names) // 2
    save_file({n: sd[n] for n in names[:half]}, str(model / "model-00001-of-00002.safetensors"))
    save_file({n: sd[n] for n in names[half:]}, str(model / "model-00002-of-00002.safetensors"))
    (model / W).rename(model / "old-model.safetensors")
    wmap = {n: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
            for i, n in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return "old-model.safetensors"


def _index_outside(model: Path) -> str:
    sd = load_file(str(model / W))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "../w.safetensors"
                                                                                   for n in sd}}))
    return "model.safetensors.index.json"


@pytest.mark.parametrize("make", [_stray, _sharded_with_stray, _index_outside])
def test_only_the_named_weight_files_are_read(make, model, calib_dir, tmp_path, guard, capsys):  # noqa: F811
    name = make(model)
    guard.watch(model)
    one_error(_run(capsys, model, tmp_path, calib_dir), str(model / name))


def test_sharded_model_named_by_its_index_loads(model):
    from llavaq.model.checkpoint import Checkpoint

    want = load_file(str(model / W))
    _sharded_with_stray(model)
    (model / "old-model.safetensors").unlink()
    ck = Checkpoint(model)
    assert sorted(ck.names) == sorted(want)
    assert all(ck.tensor(n, None).equal(want[n]) for n in want)


# ------------------------------------------------------------------------------------- already quantized
@pytest.fixture(scope="module")
def outputs(quantized, tmp_path_factory):
    from llavaq import api

    cal, exp = quantized
    root = tmp_path_factory.mktemp("outs")
    out = {"msmodelslim": exp.save_directory}
    for fmt in ("mindie", "compressed-tensors", "fakequant"):
        out[fmt] = api.export(cal.cache.manifest["model_path"], cal.cache, root / fmt, format=fmt).save_directory
    return out


@pytest.mark.parametrize("fmt,needle", [("msmodelslim", "llavaq_record.json"), ("mindie", "llavaq_record.json"),
                                        ("compressed-tensors", "llavaq_record.json"),
                                        ("fakequant", "llavaq_record.json")])
def test_our_outputs_refused_as_model_path(fmt, needle, outputs, calib_dir, tmp_path, guard, capsys):  # noqa: F811
    guard.watch(outputs[fmt])
    one_error(_run(capsys, outputs[fmt], tmp_path, calib_dir), "not a float model", needle, fmt)


@pytest.mark.parametrize("case", ["msmodelslim_own", "mindie_own", "llm_compressor", "int8_tensors"])
def test_other_tools_quantized_models_refused(case, outputs, model, calib_dir, tmp_path, guard, capsys):  # noqa: F811
    src = {"msmodelslim_own": "msmodelslim", "mindie_own": "mindie", "llm_compressor": "compressed-tensors",
           "int8_tensors": "msmodelslim"}[case]
    d = Path(shutil.copytree(outputs[src], tmp_path / case))
    (d / "llavaq_record.json").unlink()  # as the other tool writes it
    if case == "int8_tensors":  # no description file either: only the int8 weights tell
        for f in d.glob("quant_model_description*.json"):
            f.unlink()
        for f in d.glob("*.safetensors"):
            f.chmod(0o600)
            f.rename(d / W)
        shutil.copy(model / "config.json", d / "config.json")
    needle = {"msmodelslim_own": "msModelSlim", "mindie_own": "MindIE", "llm_compressor": "compressed-tensors",
              "int8_tensors": "already-quantized"}[case]
    guard.watch(d)
    one_error(_run(capsys, d, tmp_path, calib_dir), needle)


# ------------------------------------------------------------------------------------------- config sanity
def _cfg(key, value, sub="text_config"):
    def edit(cfg):
        (cfg[sub] if sub else cfg)[key] = value
    return edit


CONFIG_CASES = {
    "layers_0": (_cfg("num_hidden_layers", 0), "num_hidden_layers is 0"),
    "layers_-1": (_cfg("num_hidden_layers", -1), "num_hidden_layers is -1"),
    "layers_1e9": (_cfg("num_hidden_layers", 10**9), "num_hidden_layers is 1000000000"),
    "layers_float": (_cfg("num_hidden_layers", 2.5), "num_hidden_layers is 2.5"),
    "hidden_0": (_cfg("hidden_size", 0), "hidden_size is 0"),
    "vision_layers_0": (_cfg("num_hidden_layers", 0, "vision_config"), "vision_config.num_hidden_layers"),
    "eps_0": (_cfg("rms_norm_eps", 0), "rms_norm_eps is 0"),
    "eps_nan": (_cfg("rms_norm_eps", float("nan")), "rms_norm_eps is nan"),
    "no_text_config": (lambda cfg: cfg.pop("text_config"), "no text_config"),
    "feature_layer": (_cfg("vision_feature_layer", 99, None), "vision_feature_layer 99 is outside"),
    "fewer_layers_than_weights": (_cfg("num_hidden_layers", 1), "the weights have text layer 1"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_insane_config_refused_before_any_model(case, model, calib_dir, tmp_path, guard, capsys):  # noqa: F811
    edit, needle = CONFIG_CASES[case]
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))
    guard.watch(model)
    one_error(_run(capsys, model, tmp_path, calib_dir), "config.json", needle)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_refuses_a_weight_map_outside_the_directory(outputs, tmp_path, guard, capsys):  # noqa: F811
    d = Path(shutil.copytree(outputs["msmodelslim"], tmp_path / "q"))
    single = d / "quant_model_weight_w8a8.safetensors"
    outside = tmp_path / "quant_model_weight_w8a8-00001-of-00001.safetensors"
    single.rename(outside)
    names = [k for k in load_file(str(outside))]
    (d / "quant_model_weight_w8a8.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f"../{outside.name}" for n in names}}))
    guard.watch(d, outside)
    one_error(cli(capsys, "inspect", d), "weight_map names a file outside")


def test_inspect_refuses_a_config_that_is_not_an_object(outputs, tmp_path, guard, capsys):  # noqa: F811
    d = Path(shutil.copytree(outputs["compressed-tensors"], tmp_path / "q"))
    (d / "config.json").chmod(0o644)
    (d / "config.json").write_text("[]")
    guard.watch(d)
    one_error(cli(capsys, "inspect", d), "config.json")
