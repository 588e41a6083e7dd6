"""Issue 30: one recipe, one model — every format of one export carries the same quantized model.

For each recipe family (calibrated and derived m1 with both SmoothQuant statistics, m2, the Hadamard rotation, GPTQ,
``--keep_float``, ``--smooth_vo``) on the tiny fixture of each model family (Llama + CLIP untied and tied, Mistral +
CLIP, Qwen2 + SigLIP), every format is exported from ONE session cache, and:

* the int8 codes are identical, and so are the weight scales (float32 in every format), input scales and offsets;
* float tensors (norms, embeddings, float Linears, biases) carry the same values in every format: compressed-tensors
  and fakequant store a tensor in the checkpoint's float16 only where that cast is lossless (the tensors the recipe
  left unchanged), the smoothed (or rotated) ones in float32 like msModelSlim's CPU export;
* ``verify``'s emulated logits agree within the bound below.

**The bound.** The stored models are now the same; what differs is the kernel each format describes: msModelSlim
folds a Linear's float bias into its int32 ``quant_bias``, which rounds it to the accumulator's step
``deq_scale`` (|δ| ≤ deq_scale/2 per output), while compressed-tensors and fakequant add the float bias after
rescaling. A Linear's output y thus moves by |δ| ≤ r·E|y|, r = max over the quantized Linears of
max(deq_scale)/2 / E|y| (measured on the prompt). It reaches the next int8 quantizer (step s) as a relative
perturbation |δx| ≲ k·r·|x|, k = 2 (the rounding of the Linear before and of the one before that, e.g. fc1 → fc2
and the residual stream), and the quantizer passes it on only by flipping a code by one step s, with probability
≤ |δx|/s: a variance ≤ s²·k·r·E|x|/s = k·r·s·E|x| beside quantization's own rounding noise s²/12. Both reach the
logits through the same downstream maps (first order), so

    RMS(L_msmodelslim − L_compressed-tensors) ≤ ρ · RMS(L_msmodelslim − L_float),   ρ² = 12·k·r·m,

with m = max over the quantized Linears of E|x|/s (the mean input magnitude in quantization steps). On Linears
without a bias (or with a bias that is a multiple of deq_scale) nothing is rounded; the random tiny models amplify
one flipped code through every later layer, which is why the bound is in units of the quantization error. Formats
that describe the same kernel (msmodelslim and mindie; compressed-tensors and fakequant) give bit-identical logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llavaq import api
from llavaq.calib.samples import image_sample, load_processor
from llavaq.cli import app
from llavaq.compare import compare_outputs, equal_up_to_rounding
from llavaq.formats import get_format
from llavaq.formats.reader import read_quantized
from llavaq.quant.emulate import EmulatedW8A8Linear
from llavaq.quant.state import weight_grid_dtype
from llavaq.recipe import DEFAULT_PROMPT, QuantRecipe
from llavaq.testing import build_tiny_llava
from llavaq.verify import build_quantized_model, load_float_model, read_quantized_output

FORMATS = ("msmodelslim", "mindie", "compressed-tensors", "fakequant")
U16, K_ROUNDINGS = 2.0**-11, 2
M1 = dict(anti_outlier="m1", alpha=0.5)
#: case -> (model family, the cache's recipe, {export: recipe changes}); every recipe and model family appears
CASES = {
    "llama_derived": ("llama_clip", dict(anti_outlier="none", act_method=1), {
        "m1_absmax": M1, "m1_range": dict(M1, smooth_stat="range"), "keep_float": dict(M1, keep_float=2)}),
    "tied_m1_smooth_vo": ("llama_clip_tied", dict(M1, act_method=1, smooth_vo=True), {"calibrated": {}}),
    "mistral_m2": ("mistral_clip", dict(act_method=1), {"calibrated": {}}),
    "qwen2_rotation_gptq": ("qwen2_siglip", dict(anti_outlier="none", act_method=1, rotation="hadamard",
                                                 weight_method="gptq"),
                            {"gptq": {}, "m1_rotated": dict(M1, weight_method="rtn")}),
}
EXPORTS = [(case, name) for case, (_, _, exports) in CASES.items() for name in exports]


@pytest.fixture(scope="module")
def families(tiny_model, tiny_model_tied, tmp_path_factory):
    root = tmp_path_factory.mktemp("eq_families")
    return {"llama_clip": tiny_model, "llama_clip_tied": tiny_model_tied,
            "mistral_clip": build_tiny_llava(root / "mistral", text_model_type="mistral", kv_heads=2,
                                             sliding_window=8, seed=41),
            "qwen2_siglip": build_tiny_llava(root / "qwen2", text_model_type="qwen2", vision_model_type="siglip",
                                             kv_heads=2, seed=42)}


@pytest.fixture(scope="module")
def outputs(families, calib_dir, tmp_path_factory):
    """(case, export) -> {format: output dir}: every format from the case's ONE cache."""
    root = tmp_path_factory.mktemp("eq_out")
    out = {}
    for case, (family, cal_kw, exports) in CASES.items():
        model = families[family]
        cal = api.calibrate(model, calib_dir, QuantRecipe(**cal_kw), cache_dir=root / "cache")
        base = QuantRecipe.from_dict(cal.cache.manifest["recipe"])
        for name, kw in exports.items():
            for fmt in FORMATS:
                res = api.export(model, cal.cache, root / case / name / fmt, format=fmt, recipe=base.replace(**kw))
                assert res.derived == (kw.get("anti_outlier", base.anti_outlier) != base.anti_outlier or
                                       "smooth_stat" in kw)
            out[case, name] = {fmt: root / case / name / fmt for fmt in FORMATS}
    return out


@pytest.mark.parametrize("case,name", EXPORTS)
def test_every_format_carries_the_same_codes_and_scales(outputs, case, name):
    dirs = outputs[case, name]
    ref = read_quantized(dirs["msmodelslim"])
    assert len(ref.quantized) >= 20
    for fmt in FORMATS[1:]:
        v = read_quantized(dirs[fmt])
        assert v.check() == [] and v.quantized == ref.quantized, fmt
        for n in ref.quantized:
            a, b = ref.linear(n), v.linear(n)
            assert torch.equal(a.weight, b.weight), (fmt, n)  # identical int8 codes
            assert b.weight_scale.dtype == torch.float32 and torch.equal(a.weight_scale, b.weight_scale), (fmt, n)
            assert torch.equal(a.input_scale, b.input_scale) and torch.equal(a.input_offset, b.input_offset)
            assert torch.equal(a.deq_scale, b.deq_scale), (fmt, n)
            if a.bias is not None:  # a bias with a folded shift: float32 wherever float16 would round it
                assert torch.equal(a.bias, b.bias.float()), (fmt, n)
        hf = fmt in ("compressed-tensors", "fakequant")
        dtypes = set()
        for t in ref.float_names:
            x, y = ref.tensor(t), v.tensor(t)
            # no rounding at all: the HF formats keep a tensor in float16 only where that cast is lossless
            assert x.dtype == torch.float32 and torch.equal(x, y.float()), (fmt, t)
            assert y.dtype == (torch.float16 if hf and torch.equal(x.half().float(), x) else torch.float32), (fmt, t)
            dtypes.add(y.dtype)
        # the recipe's smoothed (or rotated) tensors are float32, the tensors it left alone float16
        assert dtypes == ({torch.float16, torch.float32} if hf else {torch.float32}), (fmt, dtypes)
        assert sorted(v.float_names) == sorted(ref.float_names), fmt


@pytest.mark.parametrize("case,name", EXPORTS)
def test_compare_says_same_model(outputs, case, name):
    dirs = outputs[case, name]
    for a, b in (("msmodelslim", "mindie"), ("msmodelslim", "compressed-tensors"), ("msmodelslim", "fakequant"),
                 ("compressed-tensors", "fakequant")):
        res = compare_outputs(dirs[a], dirs[b])
        assert res.same_model and res.structure == [], (a, b, res.largest(3))
        assert all(d.code_fraction == 0 and d.scale_rel == 0 and d.weight_rel == 0 for d in res.linears)
        exact = (a, b) in (("msmodelslim", "mindie"), ("compressed-tensors", "fakequant"))
        assert (res.rounded == []) == exact, (a, b)  # msmodelslim vs HF: the unchanged tensors are float16 in HF
        assert all(f.max_rel == 0 and f.same for f in res.floats), (a, b)  # ... losslessly: equal values


def _prompt(model):
    proc = load_processor(model)
    s = image_sample(proc, Image.new("RGB", (40, 30), (200, 30, 60)), DEFAULT_PROMPT)
    text = proc.tokenizer("The cat sat on the table next to a cup of coffee. A rocket stands on the pad.",
                          return_tensors="pt")
    return s, text.input_ids


def _logits(model, sample, text_ids):
    with torch.no_grad():
        img = model(input_ids=sample.input_ids, pixel_values=sample.pixel_values,
                    attention_mask=sample.attention_mask).logits
        return torch.cat([img.flatten(0, 1), model(input_ids=text_ids).logits.flatten(0, 1)]).double()


def _steps_hook(steps: list[float], rel: list[float]):
    """Records E|x|/s of each quantized Linear's input and max(deq_scale)/2 / E|y| of its output."""
    def hook(mod, args, out):
        p = mod.params
        steps.append(float(args[0].detach().abs().mean() / p.input_scale))
        rel.append(float(p.deq_scale.max() / 2 / out.detach().abs().mean()))
    return hook


@pytest.mark.parametrize("case,name", EXPORTS)
def test_emulated_logits_agree_within_the_rounding_bound(outputs, families, case, name):
    model = families[CASES[case][0]]
    fp = load_float_model(model)
    sample, text_ids = _prompt(model)
    ref = _logits(fp, sample, text_ids)
    logits, steps, rel = {}, [], []
    for fmt, d in outputs[case, name].items():
        qm = build_quantized_model(fp, read_quantized_output(d))
        hooks = [m.register_forward_hook(_steps_hook(steps, rel)) for m in qm.modules()
                 if isinstance(m, EmulatedW8A8Linear)] if fmt == "msmodelslim" else []
        logits[fmt] = _logits(qm, sample, text_ids)
        for h in hooks:
            h.remove()
    assert torch.equal(logits["msmodelslim"], logits["mindie"])
    assert torch.equal(logits["compressed-tensors"], logits["fakequant"])
    rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
    quant_err = rms(logits["msmodelslim"] - ref)
    rho = (12 * K_ROUNDINGS * max(rel) * max(steps)) ** 0.5
    diff = rms(logits["msmodelslim"] - logits["compressed-tensors"])
    assert diff <= rho * quant_err, (diff, rho, quant_err, max(steps), max(rel))


# ------------------------------------------------------------------------------------ the grid: every format's
def test_weight_scales_have_one_dtype_for_every_format():
    from llavaq.pipeline.exporting import float_dtype_for, scale_dtype_for

    for fmt in FORMATS:  # the float tensors follow the format's consumer, the int8 grid does not
        assert scale_dtype_for("auto", torch.float16, "cpu") == torch.float32
        assert float_dtype_for("auto", get_format(fmt), torch.float16, "cpu") == (
            torch.float32 if fmt in ("msmodelslim", "mindie") else torch.float16)
    assert weight_grid_dtype("auto", torch.float16, "npu") == torch.float16  # msModelSlim's NPU run
    assert weight_grid_dtype("auto", torch.bfloat16, "cpu") == torch.float32
    assert weight_grid_dtype("bfloat16", torch.float16, "cpu") == torch.bfloat16  # --float_dtype: every format


def test_equal_up_to_rounding():
    x = torch.randn(1000) * 3
    assert equal_up_to_rounding(x, x.half()) and equal_up_to_rounding(x.half(), x)
    assert equal_up_to_rounding(x.bfloat16(), x) and not equal_up_to_rounding(x.half(), x.bfloat16())
    y = x.half().clone()
    y[7] = torch.nextafter(y[7:8], torch.tensor([1e9], dtype=torch.float16))[0]  # one ulp off: not the rounding
    assert not equal_up_to_rounding(x, y) and not equal_up_to_rounding(x, x + 1e-6)
    assert equal_up_to_rounding(torch.tensor([3.0]), torch.tensor([3], dtype=torch.int8))


# ------------------------------------------------------------------------------------------ llavaq inspect A B
def _inspect(*args):
    return CliRunner().invoke(app, ["inspect", *map(str, args)], catch_exceptions=False)


def test_inspect_two_outputs_same_model_exits_0(outputs):
    dirs = outputs["llama_derived", "m1_absmax"]
    r = _inspect(dirs["msmodelslim"], dirs["compressed-tensors"])
    assert r.exit_code == 0, r.output
    # the HF file keeps the tensors the recipe left unchanged in float16: equal values, nothing rounded
    assert "same model" in r.output and "lower precision, with equal values" in r.output
    assert "documented rounding" not in r.output
    j = _inspect(dirs["fakequant"], dirs["mindie"], "--json")
    assert j.exit_code == 0
    rep = json.loads(j.stdout)
    assert rep["same_model"] and rep["formats"] == ["fakequant", "mindie"] and rep["linears_differing"] == []
    assert len(rep["linears"]) == 26 and len(rep["rounded"]) > 0
    assert all(row["within_rounding"] for row in rep["largest"])


def test_inspect_names_the_linear_whose_codes_differ(outputs, tmp_path):
    """One int8 code changed by one step in one Linear of a compressed-tensors copy: a different model, exit 1."""
    d = tmp_path / "ct"
    shutil.copytree(outputs["llama_derived", "m1_absmax"]["compressed-tensors"], d)
    state = load_file(str(d / "model.safetensors"))
    name = "language_model.model.layers.0.mlp.up_proj"
    w = state[name + ".weight"].clone()
    w[3, 5] = w[3, 5] + (1 if w[3, 5] < 127 else -1)
    state[name + ".weight"] = w
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    res = compare_outputs(outputs["llama_derived", "m1_absmax"]["msmodelslim"], d)
    assert not res.same_model and [x.name for x in res.linears if not x.same] == [name]
    bad = next(x for x in res.linears if x.name == name)
    assert bad.code_fraction == 1 / w.numel() and bad.max_code_step == 1 and bad.scale_rel == 0
    assert res.largest(1)[0][:2] == (name + ".weight", "codes differing (fraction)")
    r = _inspect(outputs["llama_derived", "m1_absmax"]["msmodelslim"], d)
    assert r.exit_code == 1 and "different models" in r.output and "up_proj" in r.output
    rep = json.loads(_inspect(d, outputs["llama_derived", "m1_absmax"]["fakequant"], "--json").stdout)
    assert not rep["same_model"] and rep["linears_differing"] == [name]


def test_inspect_finds_the_issue_30_grid(outputs, families, tmp_path):
    """The file issue 30 found: weight scales in float16 (``--float_dtype float16``) put the codes on another grid
    than the msModelSlim file's; and two recipes of one cache are two models."""
    dirs = outputs["llama_derived", "m1_absmax"]
    cache = json.loads((dirs["msmodelslim"] / "llavaq_record.json").read_text())["cache"]
    fp16 = api.export(families["llama_clip"], cache, tmp_path / "fp16", format="compressed-tensors",
                      recipe=QuantRecipe(act_method=1, float_dtype="float16", **M1)).save_directory
    res = compare_outputs(dirs["msmodelslim"], fp16)
    assert not res.same_model and all(d.code_fraction < 0.05 and d.max_code_step <= 1 for d in res.linears)
    assert sum(d.code_fraction > 0 for d in res.linears) >= 0.8 * len(res.linears)  # nearly every Linear
    assert all(0 < d.scale_rel <= U16 for d in res.linears)  # scales: the fp16 rounding of the float32 ones
    other = compare_outputs(dirs["msmodelslim"], outputs["llama_derived", "m1_range"]["msmodelslim"])
    assert not other.same_model and any(d.code_fraction > 0.05 for d in other.linears)
    assert _inspect(dirs["compressed-tensors"], fp16).exit_code == 1


def test_inspect_structural_differences(outputs):
    """keep_float: Linears quantized in one output, float in the other; a missing directory is a one-line error."""
    a = outputs["llama_derived", "m1_absmax"]["msmodelslim"]
    b = outputs["llama_derived", "keep_float"]["compressed-tensors"]
    res = compare_outputs(a, b)
    kept = json.loads((b / "llavaq_record.json").read_text())["recipe"]["float_linears"]
    assert not res.same_model and len(res.structure) == len(kept) >= 2  # keep_float 2 + their fused siblings
    assert all(s.endswith("is quantized in A only (float in the other)") for s in res.structure)
    r = subprocess.run([sys.executable, "-m", "llavaq", "inspect", str(a), str(a.parent / "nowhere")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
