"""The command-line options: the recipe's, derived from :class:`~llavaq.recipe.QuantRecipe`, and the shared ones.

A recipe field's default lives only in ``QuantRecipe``: :data:`RECIPE_FLAGS` holds, per field, what the
CLI adds (help text, flag spelling, how the flag's text becomes the field's value) and nothing else.
:func:`recipe_options` turns a command's ``recipe: RecipeArgs`` parameter into one Typer option per field
of that command (:data:`COMMAND_FIELDS`), with the dataclass default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import typer

from llavaq.calib.prompts import read_text_prompts
from llavaq.errors import LlavaqError
from llavaq.recipe import QuantRecipe

DEFAULT_CALIB = "calibImages"


def parse_bool(value: str, flag: str) -> bool:
    """msModelSlim's ``True``/``False`` flag values (and 1/0, yes/no, on/off)."""
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise LlavaqError(f"{flag} takes True or False, not {value!r}")


def split_names(value: str | None) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``."""
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def _prompts(path: Path | None) -> tuple[str, ...]:
    return () if path is None else read_text_prompts(path)


def _left_out(default: tuple[str, ...]) -> None:
    """The flag's default for a field whose default is an empty tuple: left out (None)."""
    return None


@dataclass(frozen=True)
class RecipeFlag:
    """What the CLI adds to one ``QuantRecipe`` field; the default comes from the dataclass."""

    field: str
    help: str
    #: what the flag parses to (None: the field's own type)
    cli_type: type | None = None
    #: the flag's value -> the field's value (None: as parsed)
    to_recipe: Callable[[Any], Any] | None = None
    #: the field's default -> the flag's default (None: the same)
    to_cli: Callable[[Any], Any] | None = None
    #: flag spellings (empty: ``--<field>``)
    decls: tuple[str, ...] = ()
    #: default None: the field is left as it is (``export``: as calibrated)
    optional: bool = False

    @property
    def flag(self) -> str:
        return f"--{self.field}"

    @property
    def field_default(self) -> Any:
        f = next(f for f in dataclasses.fields(QuantRecipe) if f.name == self.field)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @property
    def cli_default(self) -> Any:
        if self.optional:
            return None
        return self.to_cli(self.field_default) if self.to_cli else self.field_default

    def value(self, raw: Any) -> Any:
        """The field's value for the flag's parsed value ``raw``."""
        return self.to_recipe(raw) if self.to_recipe else raw

    def parameter(self) -> inspect.Parameter:
        annotation = self.cli_type or typing.get_type_hints(QuantRecipe)[self.field]
        option = typer.Option(self.cli_default, *(self.decls or (self.flag,)), help=self.help)
        return inspect.Parameter(self.field, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=option,
                                 annotation=annotation)


def _act_order(value: str) -> bool:
    return parse_bool(value, "--gptq_act_order")


def _w_sym(value: str) -> bool:
    return parse_bool(value, "--w_sym")


RECIPE_FLAGS: dict[str, RecipeFlag] = {f.field: f for f in (
    RecipeFlag("w_bit", "Weight bits: 8, or 4 (with --a_bit 16)."),
    RecipeFlag("a_bit", "Activation bits: 8 (W8A8 static) or 16 (float activations: weight-only W8A16 / W4A16)."),
    RecipeFlag("group_size", "Weight-only: input columns per weight scale, e.g. 128 (0 = per output channel; "
               "must divide every quantized Linear's input columns). Export-time."),
    RecipeFlag("w_sym", "Weight-only: symmetric weights (True) or asymmetric with a zero point per group (False). "
               "Export-time.", cli_type=str, to_recipe=_w_sym, to_cli=str),
    RecipeFlag("anti_outlier", "m2 (msModelSlim OS+ search), m1 (SmoothQuant), none."),
    RecipeFlag("alpha", "SmoothQuant alpha for m1: a number in [0,1] or 'auto'.", cli_type=str, to_cli=str),
    RecipeFlag("act_method", "Activation observer: 2 = histogram (msModelSlim), 1 = min-max."),
    RecipeFlag("modules", "Quantized set: msmodelslim (down_proj float), with_down_proj, language_only."),
    RecipeFlag("m2_search", "m2 threshold search: full (msModelSlim's threshold, integer-screened), fast "
               "(coarse-to-fine, not msModelSlim-exact) or exhaustive (every candidate in float)."),
    RecipeFlag("m2_scope", "Groups m2 smooths: msmodelslim (the Llama and CLIP layers msModelSlim's m2 wraps; "
               "Mistral, Qwen2 and SigLIP layers stay unsmoothed, as there) or all."),
    RecipeFlag("float_dtype", "Dtype of float tensors and weight scales in the output: auto = as the format's "
               "consumer gets them (msmodelslim/mindie: float32 like msModelSlim's CPU run, the checkpoint dtype "
               "with --device_type npu; HF formats: the checkpoint dtype where that is lossless, float32 for tensors "
               "the recipe changed, e.g. smoothed norms), or float16 | bfloat16 | float32 (every float tensor)."),
    RecipeFlag("text_prompts", "JSON list or text file (one per line) of text-only calibration prompts, added "
               "after the image samples.", cli_type=Path, to_recipe=_prompts, to_cli=_left_out),
    RecipeFlag("image_loading", "How calibration photos become RGB: upright (EXIF orientation applied, transparent "
               "pixels on white) or msmodelslim (exactly msModelSlim's example: as decoded, then convert('RGB'): "
               "no EXIF transpose, alpha dropped)."),
    RecipeFlag("keep_float", "Keep the N Linears with the largest W8A8 error on the cached activation rows in "
               "float (export-time; no new calibration)."),
    RecipeFlag("float_linears", "Comma-separated Linear names to keep in float.", cli_type=str,
               to_recipe=split_names, to_cli=_left_out),
    RecipeFlag("smooth_vo", "Also smooth v_proj -> o_proj (CLIP out_proj) and, with --modules with_down_proj, "
               "up_proj -> down_proj (m1: its alpha; m2: searched per group)."),
    RecipeFlag("smooth_stat", "m1's per-channel activation statistic: absmax (max|X|, SmoothQuant's) or range "
               "(max - min, llm-compressor's); export-time for derived m1."),
    RecipeFlag("weight_method", "int8 weight codes: rtn (round to nearest, msModelSlim) or gptq (error-compensated "
               "on the same grid, from input moments recorded at calibration; export-time: one gptq calibration "
               "serves both)."),
    RecipeFlag("gptq_damp", "GPTQ dampening: fraction of the mean Hessian diagonal added to it."),
    RecipeFlag("gptq_block_size", "GPTQ columns per lazy update (speed only)."),
    RecipeFlag("gptq_act_order", "GPTQ: quantize input columns in decreasing order of their activation power "
               "(True/False).", cli_type=str, to_recipe=_act_order, to_cli=str),
    RecipeFlag("gptq_tokens", "How the language model's calibration tokens weigh in GPTQ's Hessian: all (each "
               "once; a photo's 576 image tokens dominate) or balanced (image and text tokens half each). "
               "Calibration-time."),
    RecipeFlag("rotation", "none | hadamard: rotate the language model's residual stream (randomised Hadamard, "
               "folded into the weights) before calibration, so static int8 activations have no outlier "
               "channels. down_proj stays float."),
    RecipeFlag("rotation_seed", "Seed of the random signs of the --rotation (recorded)."),
)}

#: the recipe fields each command exposes, in ``--help`` order
COMMAND_FIELDS: dict[str, tuple[str, ...]] = {
    "quantize": ("w_bit", "a_bit", "group_size", "w_sym", "anti_outlier", "alpha", "act_method", "modules",
                 "m2_search", "m2_scope",
                 "float_dtype", "text_prompts", "image_loading", "keep_float", "float_linears", "smooth_vo",
                 "smooth_stat", "weight_method", "gptq_damp", "gptq_block_size", "gptq_act_order", "gptq_tokens",
                 "rotation", "rotation_seed"),
    "calibrate": ("w_bit", "a_bit", "anti_outlier", "alpha", "act_method", "modules", "m2_search", "m2_scope",
                  "text_prompts", "smooth_vo", "smooth_stat", "weight_method", "gptq_tokens", "image_loading",
                  "rotation", "rotation_seed"),
    "export": ("w_bit", "a_bit", "group_size", "w_sym", "anti_outlier", "alpha", "smooth_stat", "float_dtype",
               "keep_float", "float_linears", "smooth_vo",
               "weight_method", "gptq_damp", "gptq_block_size", "gptq_act_order"),
}

#: how a command's flag differs from :data:`RECIPE_FLAGS` (export: left out = as calibrated)
COMMAND_VARIANTS: dict[tuple[str, str], dict[str, Any]] = {
    ("calibrate", "weight_method"): {"help": "gptq: also record the input moments GPTQ needs, so exports can use "
                                             "--weight_method gptq (and rtn)."},
    ("export", "w_bit"): {"optional": True, "help": "Weight bits: 8 or 4 (default: as calibrated)."},
    ("export", "a_bit"): {"optional": True, "help": "8 (W8A8) or 16 (weight-only; from any cache, no smoothing) "
                                                    "(default: as calibrated)."},
    ("export", "group_size"): {"optional": True, "help": "Weight-only: input columns per scale, 0 = per channel "
                                                         "(default: as calibrated)."},
    ("export", "w_sym"): {"optional": True, "help": "Weight-only: True/False, symmetric weights (default: as "
                                                    "calibrated)."},
    ("export", "anti_outlier"): {"optional": True, "help": "Derive none/m1 from cached float statistics."},
    ("export", "smooth_stat"): {"optional": True, "help": "Derive m1 with this activation statistic: absmax or "
                                                          "range (default: as calibrated)."},
    ("export", "smooth_vo"): {"optional": True, "decls": ("--smooth_vo/--no_smooth_vo",),
                              "help": "Derive with / without the v_proj -> o_proj smoothing (default: as "
                                      "calibrated)."},
}

#: the recipe flags ``quantize --recipe auto`` chooses itself (an error when given), in the order checked
AUTO_CHOSEN = ("group_size", "anti_outlier", "alpha", "act_method", "m2_search", "keep_float", "float_linears",
               "weight_method",
               "smooth_vo", "gptq_damp", "gptq_block_size", "gptq_act_order", "gptq_tokens")


def command_flags(command: str) -> tuple[RecipeFlag, ...]:
    """The recipe flags of ``command`` (``quantize``, ``calibrate`` or ``export``)."""
    return tuple(dataclasses.replace(RECIPE_FLAGS[name], **COMMAND_VARIANTS.get((command, name), {}))
                 for name in COMMAND_FIELDS[command])


@dataclass(frozen=True)
class RecipeArgs:
    """The recipe flags of one command line: ``raw`` holds each flag's parsed value."""

    flags: tuple[RecipeFlag, ...]
    raw: dict[str, Any]

    def values(self) -> dict[str, Any]:
        """Field -> value for every flag, except the optional ones left out."""
        return {f.field: f.value(self.raw[f.field]) for f in self.flags
                if not (f.optional and self.raw[f.field] is None)}

    def recipe(self) -> QuantRecipe:
        """The recipe the flags describe (the fields without a flag at QuantRecipe's defaults)."""
        return QuantRecipe(**self.values())

    def changed(self, fields: Iterable[str]) -> list[str]:
        """The flags of ``fields`` (in that order) whose value is not QuantRecipe's default."""
        by_name = {f.field: f for f in self.flags}
        return [by_name[n].flag for n in fields
                if by_name[n].value(self.raw[n]) != by_name[n].value(by_name[n].cli_default)]


F = TypeVar("F", bound=Callable[..., Any])


def recipe_options(command: str) -> Callable[[F], F]:
    """Replace the command's ``recipe: RecipeArgs`` parameter by one Typer option per recipe flag of ``command``.

    The decorated function is called with ``recipe=RecipeArgs(...)`` and its other parameters as Typer
    parsed them; ``--help`` lists the recipe options where the ``recipe`` parameter stands.
    """
    flags = command_flags(command)

    def decorate(fn: F) -> F:
        hints = typing.get_type_hints(fn)
        params: list[inspect.Parameter] = []
        for p in inspect.signature(fn).parameters.values():
            if p.name == "recipe":
                params += [f.parameter() for f in flags]
            else:
                params.append(p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=hints.get(p.name, p.annotation)))

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            raw = {f.field: kwargs.pop(f.field) for f in flags}
            return fn(recipe=RecipeArgs(flags, raw), **kwargs)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


# Options that are not recipe fields, shared by several commands ------------------------------------------
ModelPath = typer.Option(..., "--model_path", help="llava-hf LLaVA model directory (safetensors).")
SaveDirectory = typer.Option(..., "--save_directory", help="Output directory.")
CalibImages = typer.Option(Path(DEFAULT_CALIB), "--calib_images",
                           help="Folder of calibration photos (every image file in it, sorted by name).")
DeviceType = typer.Option("auto", "--device_type", help="cpu | cuda | npu | auto (npu, else cuda, else cpu).")
TrustRemote = typer.Option("False", "--trust_remote_code", help="True/False: allow custom model code (off).")
CacheDir = typer.Option(None, "--cache_dir", help="Session cache root (default $LLAVAQ_CACHE_DIR or ~/.cache/llavaq).")
StreamMemory = typer.Option(None, "--stream_memory_gb",
                            help="GB of RAM for the calibration samples' hidden states between layers; beyond it "
                                 "they are kept on disk in the session cache (default: a quarter of the available "
                                 "memory; 0 = all on disk).")
PartFileSize = typer.Option(None, "--part_file_size", help="Shard size in GB (default: one file).")
Overwrite = typer.Option(False, "--overwrite", help="Replace a non-empty save directory.")
Format = typer.Option("msmodelslim", "--format", help="msmodelslim | mindie | compressed-tensors | fakequant.")
