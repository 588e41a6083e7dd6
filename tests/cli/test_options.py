"""The recipe options of calibrate / quantize / export come from QuantRecipe: same defaults, parsed by the real app."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

import llavaq.api
from llavaq.calib.cache import SessionCache
from llavaq.cli import app
from llavaq.cli.options import AUTO_CHOSEN, COMMAND_FIELDS, RECIPE_FLAGS
from llavaq.recipe import QuantRecipe

#: recipe fields with no flag: the prompt template, the cache's activation rows, and what weight_method implies
NO_FLAG = {"prompt", "activation_sample_tokens", "input_moments"}
SEED_FLAGS = ("--model_path", "--calib_images", "--save_directory", "--part_file_size", "--w_bit", "--a_bit",
              "--device_type", "--trust_remote_code", "--mindie_format")
DEFAULTS = {f.name: getattr(QuantRecipe(), f.name) for f in dataclasses.fields(QuantRecipe)}


class Captured(Exception):
    """Stops the command once the api has the recipe."""


@pytest.fixture
def captured(monkeypatch) -> dict:
    """Replace the api calls by one that records their recipe (and keyword arguments) and stops."""
    seen: dict = {}

    def capture(name):
        def api_call(*args, **kwargs):
            seen["call"] = name
            seen["recipe"] = kwargs.get("recipe") or next((a for a in args if isinstance(a, QuantRecipe)), None)
            seen["kwargs"] = kwargs
            raise Captured(name)
        return api_call

    for name in ("calibrate", "quantize", "export", "tune"):
        monkeypatch.setattr(llavaq.api, name, capture(name))
    monkeypatch.setattr("llavaq.cli.quantize.device_line", lambda device_type: None)
    monkeypatch.setattr("llavaq.cli.calibrate.device_line", lambda device_type: None)
    return seen


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_every_recipe_field_has_a_flag_or_is_named_as_having_none():
    fields = {f.name for f in dataclasses.fields(QuantRecipe)}
    assert set(RECIPE_FLAGS) == fields - NO_FLAG
    assert set(COMMAND_FIELDS["quantize"]) == set(RECIPE_FLAGS)
    assert set(COMMAND_FIELDS["calibrate"]) < set(RECIPE_FLAGS) and set(COMMAND_FIELDS["export"]) < set(RECIPE_FLAGS)


@pytest.mark.parametrize("command,args", [
    ("quantize", ["--save_directory", "out"]),
    ("calibrate", []),
])
def test_cli_defaults_are_quant_recipe_defaults(captured, command, args):
    r = invoke(command, "--model_path", "m", *args)
    assert isinstance(r.exception, Captured), r.output
    recipe = captured["recipe"]
    assert captured["call"] == command and isinstance(recipe, QuantRecipe)
    for name in COMMAND_FIELDS[command]:
        assert getattr(recipe, name) == DEFAULTS[name], name
    assert recipe == QuantRecipe()  # the fields without a flag too
    # the numbers themselves, as QuantRecipe states them (msModelSlim's LLaVA W8A8 case)
    assert (recipe.w_bit, recipe.a_bit, recipe.act_method, recipe.keep_float, recipe.rotation_seed) == (8, 8, 2, 0, 0)
    assert recipe.alpha == 0.5 and recipe.gptq_damp == 0.01 and recipe.gptq_block_size == 128
    assert recipe.gptq_act_order is True and recipe.float_linears == () and recipe.text_prompts == ()


def test_flags_reach_the_recipe(captured, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    r = invoke("quantize", "--model_path", "m", "--save_directory", "out", "--anti_outlier", "m1", "--alpha", "0.25",
               "--act_method", "1", "--gptq_damp", "0.05", "--gptq_block_size", "64", "--gptq_act_order", "False",
               "--weight_method", "gptq", "--float_linears", "a.b, c.d", "--keep_float", "3", "--smooth_vo",
               "--text_prompts", str(prompts), "--rotation", "hadamard", "--rotation_seed", "7")
    assert isinstance(r.exception, Captured), r.output
    recipe = captured["recipe"]
    assert (recipe.anti_outlier, recipe.alpha, recipe.act_method) == ("m1", 0.25, 1)
    assert (recipe.gptq_damp, recipe.gptq_block_size, recipe.gptq_act_order) == (0.05, 64, False)
    assert recipe.float_linears == ("a.b", "c.d") and recipe.keep_float == 3 and recipe.smooth_vo is True
    assert recipe.text_prompts == ("first prompt", "second prompt")
    assert (recipe.rotation, recipe.rotation_seed, recipe.input_moments) == ("hadamard", 7, True)


def test_export_defaults_and_as_calibrated(captured, monkeypatch):
    cached = QuantRecipe(anti_outlier="m1", alpha=0.7, smooth_vo=True, smooth_stat="range", weight_method="gptq",
                         gptq_damp=0.05, keep_float=2, float_dtype="float16")

    class Cache:
        manifest = {"recipe": cached.to_dict()}

    monkeypatch.setattr(SessionCache, "load", classmethod(lambda cls, path: Cache()))
    r = invoke("export", "--model_path", "m", "--cache", "c", "--save_directory", "out")
    assert isinstance(r.exception, Captured), r.output
    recipe = captured["recipe"]
    # left out: as calibrated (and --alpha only with --anti_outlier)
    assert (recipe.anti_outlier, recipe.alpha, recipe.smooth_vo, recipe.smooth_stat) == ("m1", 0.7, True, "range")
    # the export-time fields: QuantRecipe's defaults
    for name in ("float_dtype", "keep_float", "float_linears", "weight_method", "gptq_damp", "gptq_block_size",
                 "gptq_act_order"):
        assert getattr(recipe, name) == DEFAULTS[name], name
    r = invoke("export", "--model_path", "m", "--cache", "c", "--save_directory", "out", "--anti_outlier", "none",
               "--no_smooth_vo")
    assert isinstance(r.exception, Captured), r.output
    assert (captured["recipe"].anti_outlier, captured["recipe"].alpha, captured["recipe"].smooth_vo) == \
        ("none", DEFAULTS["alpha"], False)


def test_recipe_auto_accepts_the_defaults_spelled_out_and_refuses_others(captured):
    base = ("quantize", "--model_path", "m", "--save_directory", "out", "--recipe", "auto")
    spelled = []
    for name in AUTO_CHOSEN:
        default = DEFAULTS[name]
        if isinstance(default, (int, float, str)) and not isinstance(default, bool):
            spelled += [f"--{name}", str(default)]
    assert "--gptq_damp" in spelled and "--alpha" in spelled
    r = invoke(*base, *spelled, "--gptq_act_order", "yes", "--float_linears", "")
    assert isinstance(r.exception, Captured) and captured["call"] == "tune", r.output
    assert captured["kwargs"]["text_prompts"] is None  # no --text_prompts: the tuner's shipped ones
    for flag, value in (("--gptq_damp", "0.02"), ("--alpha", "0.3"), ("--act_method", "1"),
                        ("--gptq_act_order", "False")):
        r = invoke(*base, flag, value)
        assert f"{flag} is chosen by --recipe auto" in str(r.exception), (flag, r.output)


def test_quantize_help_lists_the_seed_flags():
    r = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for flag in SEED_FLAGS:
        assert flag in r.output, flag
    for name in COMMAND_FIELDS["quantize"]:
        assert f"--{name}" in r.output, name
