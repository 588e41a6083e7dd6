"""Issue #25: one registered class per format writes and reads it; each format round-trips the in-memory state."""

from __future__ import annotations

import pytest
import torch

from llavaq.calib.cache import SessionCache
from llavaq.errors import OutputError
from llavaq.formats import FORMATS, ExportContext, OutputFormat, QuantizedModelView, get_format, read_quantized
from llavaq.formats.base import detect_format
from llavaq.model.checkpoint import Checkpoint
from llavaq.model.llava import LlavaArch
from llavaq.quant.state import unpack_deq_scale
from llavaq.quant.tensor_stream import iter_quantized_tensors
from llavaq.recipe import QuantRecipe

NAMES = ("msmodelslim", "mindie", "compressed-tensors", "fakequant")


@pytest.fixture(scope="module")
def state(quantized, tiny_model):
    """The quantized tensor stream of the tiny model, in memory: {name: tensor}, plus what the writers need."""
    cal, _ = quantized
    cache = SessionCache.load(cal.cache.path)
    recipe = QuantRecipe.from_dict(cache.manifest["recipe"])
    arch = LlavaArch(Checkpoint(tiny_model))
    dtype = arch.ckpt.torch_dtype
    stream = list(iter_quantized_tensors(arch, cache, recipe, float_dtype=dtype))
    return arch, recipe, dtype, stream


@pytest.fixture(scope="module")
def written(state, tiny_model, tmp_path_factory):
    arch, recipe, dtype, stream = state
    root = tmp_path_factory.mktemp("registry")
    out = {}
    for name in NAMES:
        d = root / name
        d.mkdir()
        ctx = ExportContext(arch, recipe, tiny_model, float_dtype=dtype)
        info = get_format(name).write(d, iter(stream), ctx)
        assert info["tensors"] > 0
        out[name] = d
    return out


def test_registry_holds_one_reader_writer_class_per_format():
    assert tuple(FORMATS) == NAMES
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, OutputFormat) and fmt.name == name and fmt.description
        assert issubclass(fmt.view, QuantizedModelView) and fmt.view is not QuantizedModelView
    assert FORMATS["mindie"].view is FORMATS["msmodelslim"].view
    with pytest.raises(OutputError, match="unknown format 'gguf'"):
        get_format("gguf")


def test_read_quantized_refuses_a_directory_of_no_format(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert detect_format(tmp_path) is None
    with pytest.raises(OutputError, match="is not a quantized model"):
        read_quantized(tmp_path)
    with pytest.raises(OutputError, match="is not a directory"):
        read_quantized(tmp_path / "config.json")


@pytest.mark.parametrize("name", NAMES)
def test_each_format_round_trips_codes_and_scales(state, written, name):
    arch, recipe, dtype, stream = state
    mem = {n: t for n, t, _tag in stream}
    quantized = arch.quantized_linears(recipe.modules, recipe.float_linears)
    d = written[name]
    assert detect_format(d) == name
    view = get_format(name).read(d)
    assert type(view) is get_format(name).view and view.format == name
    assert type(read_quantized(d)) is type(view)
    assert view.check() == []
    assert view.quantized == quantized and len(quantized) == 26
    for m in quantized:
        lv = view.linear(m)
        assert lv.weight.dtype == torch.int8 and torch.equal(lv.weight, mem[m + ".weight"])
        assert torch.equal(lv.weight_scale, mem[m + ".weight_scale"])
        assert torch.equal(lv.input_scale, mem[m + ".input_scale"])
        assert torch.equal(lv.input_offset, mem[m + ".input_offset"])
        assert lv.activation == "static"
        want_deq = unpack_deq_scale(mem[m + ".deq_scale"])
        assert torch.equal(lv.deq_scale, want_deq)
        if m + ".bias" in mem:
            assert torch.equal(lv.bias, mem[m + ".bias"])
        if name in ("msmodelslim", "mindie"):
            assert torch.equal(lv.quant_bias, mem[m + ".quant_bias"])
        else:
            assert lv.quant_bias is None
    floats = [n for n in mem if n.rpartition(".")[0] not in set(quantized)]
    assert sorted(view.float_names) == sorted(floats)
    for n in floats:
        assert torch.equal(view.tensor(n), mem[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_a_changed_code_is_reported_by_the_formats_own_check(written, tmp_path, name):
    """Each format's reader checks its own invariant: a flipped int8 code breaks the kernel parameters."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / name
    shutil.copytree(written[name], d)
    view = read_quantized(d)
    m = view.quantized[0]
    f = d / view.files.file_of(m + ".weight")
    f.chmod(0o600)
    tensors = load_file(str(f))
    key = view.files.stored_name(m + ".weight")
    w = tensors[key]
    if w.dtype == torch.int8:
        w[0, 0] = -128
    else:  # fakequant: the dequantized weight, now not W_q·ws
        w[0, 0] = w[0, 0] + view.linear(m).weight_scale[0, 0] / 2
    save_file(tensors, str(f), metadata={"format": "pt"})
    problems = read_quantized(d).check()
    assert problems and all(m in p or key in p for p in problems), problems
