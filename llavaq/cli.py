"""``llavaq`` console app: a thin Typer + rich shell over :mod:`llavaq.api`.

Flags keep msModelSlim's LLaVA script names (``--model_path --calib_images --save_directory
--part_file_size --w_bit --a_bit --device_type --trust_remote_code --mindie_format``).
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llavaq import api
from llavaq.calib.cache import SessionCache
from llavaq.calib.coverage import range_drivers
from llavaq.calib.prompts import read_text_prompts
from llavaq.device import resolve_device
from llavaq.errors import CacheError, Interrupted, LlavaqError, VerificationFailed
from llavaq.inspect import gptq_summary, run_inspect
from llavaq.progress import RichProgress, summary_line
from llavaq.recipe import DEFAULT_PROMPT, QuantRecipe
from llavaq.tuning import tuning_table
from llavaq.verify import run_verify

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Quantize LLaVA vision-language models to W8A8 (int8 weights, int8 static activations).",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()

DEFAULT_CALIB = "calibImages"


def _bool(value: str, flag: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise LlavaqError(f"{flag} takes True or False, not {value!r}")


def _float_linears(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


def _recipe(w_bit: int, a_bit: int, anti_outlier: str, alpha: str, act_method: int, modules: str,
            m2_search: str, float_dtype: str, text_prompts: Path | None, keep_float: int = 0,
            float_linears: str | None = None, image_loading: str = "upright", m2_scope: str = "msmodelslim",
            rotation: str = "none", rotation_seed: int = 0,
            **weight_options) -> QuantRecipe:
    prompts: tuple[str, ...] = ()
    if text_prompts is not None:
        prompts = read_text_prompts(text_prompts)
    return QuantRecipe(w_bit=w_bit, a_bit=a_bit, anti_outlier=anti_outlier, alpha=alpha, act_method=act_method,
                       modules=modules, m2_search=m2_search, float_dtype=float_dtype, text_prompts=prompts,
                       prompt=DEFAULT_PROMPT, keep_float=keep_float, float_linears=_float_linears(float_linears),
                       image_loading=image_loading, m2_scope=m2_scope, rotation=rotation, rotation_seed=rotation_seed,
                       **_recipe_options(**weight_options))


def _recipe_options(smooth_vo: bool = False, weight_method: str = "rtn", gptq_damp: float = 0.01,
                    gptq_block_size: int = 128, gptq_act_order: str = "True", smooth_stat: str = "absmax",
                    gptq_tokens: str = "all") -> dict:
    return {"smooth_vo": smooth_vo, "weight_method": weight_method, "gptq_damp": gptq_damp,
            "gptq_block_size": gptq_block_size,
            "gptq_act_order": _bool(gptq_act_order, "--gptq_act_order"), "smooth_stat": smooth_stat,
            "gptq_tokens": gptq_tokens}


# Options shared by calibrate / quantize / export ------------------------------------------------
ModelPath = typer.Option(..., "--model_path", help="llava-hf LLaVA model directory (safetensors).")
CalibImages = typer.Option(Path(DEFAULT_CALIB), "--calib_images",
                           help="Folder of calibration photos (every image file in it, sorted by name).")
WBit = typer.Option(8, "--w_bit", help="Weight bits (only 8 is supported).")
ABit = typer.Option(8, "--a_bit", help="Activation bits (only 8 is supported).")
DeviceType = typer.Option("auto", "--device_type", help="cpu | cuda | npu | auto (npu, else cuda, else cpu).")
TrustRemote = typer.Option("False", "--trust_remote_code", help="True/False: allow custom model code (off).")
AntiOutlier = typer.Option("m2", "--anti_outlier", help="m2 (msModelSlim OS+ search), m1 (SmoothQuant), none.")
Alpha = typer.Option("0.5", "--alpha", help="SmoothQuant alpha for m1: a number in [0,1] or 'auto'.")
ActMethod = typer.Option(2, "--act_method", help="Activation observer: 2 = histogram (msModelSlim), 1 = min-max.")
Modules = typer.Option("msmodelslim", "--modules",
                       help="Quantized set: msmodelslim (down_proj float), with_down_proj, language_only.")
KeepFloat = typer.Option(0, "--keep_float", help="Keep the N Linears with the largest W8A8 error on the cached "
                         "activation rows in float (export-time; no new calibration).")
FloatLinears = typer.Option(None, "--float_linears", help="Comma-separated Linear names to keep in float.")
M2Search = typer.Option("full", "--m2_search",
                        help="m2 threshold search: full (msModelSlim's threshold, integer-screened), fast "
                             "(coarse-to-fine, not msModelSlim-exact) or exhaustive (every candidate in float).")
M2Scope = typer.Option("msmodelslim", "--m2_scope",
                       help="Groups m2 smooths: msmodelslim (the Llama and CLIP layers msModelSlim's m2 wraps; "
                            "Mistral, Qwen2 and SigLIP layers stay unsmoothed, as there) or all.")
FloatDtype = typer.Option("auto", "--float_dtype", help="Dtype of float tensors and weight scales in the output: "
                          "auto = as the format's consumer gets them (msmodelslim/mindie: float32 like "
                          "msModelSlim's CPU run, the checkpoint dtype with --device_type npu; HF formats: the "
                          "checkpoint dtype), or float16 | bfloat16 | float32.")
TextPrompts = typer.Option(None, "--text_prompts", help="JSON list or text file (one per line) of text-only "
                           "calibration prompts, added after the image samples.")
SmoothStat = typer.Option("absmax", "--smooth_stat", help="m1's per-channel activation statistic: absmax "
                          "(max|X|, SmoothQuant's) or range (max - min, llm-compressor's); export-time for derived m1.")
SmoothVO = typer.Option(False, "--smooth_vo", help="Also smooth v_proj -> o_proj (CLIP out_proj) and, with "
                        "--modules with_down_proj, up_proj -> down_proj (m1: its alpha; m2: searched per group).")
WeightMethod = typer.Option("rtn", "--weight_method", help="int8 weight codes: rtn (round to nearest, msModelSlim) "
                            "or gptq (error-compensated on the same grid, from input moments recorded at "
                            "calibration; export-time: one gptq calibration serves both).")
GptqDamp = typer.Option(0.01, "--gptq_damp", help="GPTQ dampening: fraction of the mean Hessian diagonal added to it.")
GptqBlock = typer.Option(128, "--gptq_block_size", help="GPTQ columns per lazy update (speed only).")
GptqActOrder = typer.Option("True", "--gptq_act_order", help="GPTQ: quantize input columns in decreasing order of "
                            "their activation power (True/False).")
GptqTokens = typer.Option("all", "--gptq_tokens", help="How the language model's calibration tokens weigh in GPTQ's "
                          "Hessian: all (each once; a photo's 576 image tokens dominate) or balanced (image and "
                          "text tokens half each). Calibration-time.")
ImageLoading = typer.Option("upright", "--image_loading",
                            help="How calibration photos become RGB: upright (EXIF orientation applied, transparent "
                                 "pixels on white) or msmodelslim (exactly msModelSlim's example: as decoded, then "
                                 "convert('RGB'): no EXIF transpose, alpha dropped).")
CacheDir = typer.Option(None, "--cache_dir", help="Session cache root (default $LLAVAQ_CACHE_DIR or ~/.cache/llavaq).")
StreamMemory = typer.Option(None, "--stream_memory_gb",
                            help="GB of RAM for the calibration samples' hidden states between layers; beyond it "
                                 "they are kept on disk in the session cache (default: a quarter of the available "
                                 "memory; 0 = all on disk).")
Rotation = typer.Option("none", "--rotation", help="none | hadamard: rotate the language model's residual stream "
                        "(randomised Hadamard, folded into the weights) before calibration, so static int8 "
                        "activations have no outlier channels. down_proj stays float.")
RotationSeed = typer.Option(0, "--rotation_seed", help="Seed of the random signs of the --rotation (recorded).")
PartFileSize = typer.Option(None, "--part_file_size", help="Shard size in GB (default: one file).")
Overwrite = typer.Option(False, "--overwrite", help="Replace a non-empty save directory.")


def _progress():
    return RichProgress(err)


def _print_calibration(cal) -> None:
    state = "reused cached calibration" if cal.reused else f"calibrated in {cal.seconds:.1f}s"
    err.print(f"[green]✓[/] {state}: {cal.num_samples} sample(s), {escape(cal.images_summary)}", soft_wrap=True)
    err.print(f"  session cache: {escape(str(cal.cache.path))}", soft_wrap=True, highlight=False)


def _print_range_drivers(cache) -> None:
    try:
        err.print("  " + range_drivers(cache).summary, soft_wrap=True)
    except CacheError:
        pass


def _print_export(res, peak_rss: bool = True) -> None:
    t = Table(title=f"llavaq → {res.save_directory}", show_header=False)
    t.add_row("format", res.format + (" (derived from cached float statistics)" if res.derived else ""))
    t.add_row("quantized Linears (W8A8)", str(res.quantized))
    t.add_row("float Linears", str(res.float_modules))
    for name, e in res.kept_float.items():
        t.add_row("  kept float", name + (f" (W8A8 rel. error {e:.1e})" if e is not None else ""))
    if res.gptq_error:
        t.add_row("weights", _gptq_line(res.gptq_error))
    t.add_row("tensors", str(res.num_tensors))
    t.add_row("output size", f"{res.bytes_written / 2**20:.1f} MiB in {len(res.files)} files")
    t.add_row("export time", f"{res.seconds:.1f}s")
    if peak_rss:
        t.add_row("peak RSS", f"{_peak_rss_mib():.0f} MiB")
    out.print(t)


def _gptq_line(errors: dict[str, dict[str, float]]) -> str:
    return gptq_summary(errors)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _device_line(device_type: str) -> None:
    dev = resolve_device(device_type)
    err.print(f"device: [bold]{dev.type}[/] (--device_type {device_type})")


@app.command()
def quantize(
    model_path: Path = ModelPath,
    save_directory: Path = typer.Option(..., "--save_directory", help="Output directory."),
    calib_images: Path = CalibImages,
    part_file_size: float = PartFileSize,
    w_bit: int = WBit,
    a_bit: int = ABit,
    device_type: str = DeviceType,
    trust_remote_code: str = TrustRemote,
    mindie_format: bool = typer.Option(False, "--mindie_format", help="MindIE-compatible output (safe_tensor)."),
    format: str = typer.Option(None, "--format", help="msmodelslim | mindie | compressed-tensors | fakequant."),
    anti_outlier: str = AntiOutlier,
    alpha: str = Alpha,
    act_method: int = ActMethod,
    modules: str = Modules,
    m2_search: str = M2Search,
    m2_scope: str = M2Scope,
    float_dtype: str = FloatDtype,
    text_prompts: Path = TextPrompts,
    image_loading: str = ImageLoading,
    keep_float: int = KeepFloat,
    float_linears: str = FloatLinears,
    smooth_vo: bool = SmoothVO,
    smooth_stat: str = SmoothStat,
    weight_method: str = WeightMethod,
    gptq_damp: float = GptqDamp,
    gptq_block_size: int = GptqBlock,
    gptq_act_order: str = GptqActOrder,
    gptq_tokens: str = GptqTokens,
    rotation: str = Rotation,
    rotation_seed: int = RotationSeed,
    cache_dir: Path = CacheDir,
    stream_memory_gb: float = StreamMemory,
    overwrite: bool = Overwrite,
    recipe_name: str = typer.Option("msmodelslim", "--recipe", help="msmodelslim: the recipe the flags above "
                                    "describe (default: msModelSlim's, byte for byte); auto: calibrate once, score "
                                    "candidate recipes with verify and write the best that meets the target."),
    max_ppl_increase: float = typer.Option(None, "--max_ppl_increase", help="--recipe auto: largest held-out "
                                           "perplexity increase in percent (default 1.0)."),
    min_top1: float = typer.Option(None, "--min_top1", help="--recipe auto: smallest top-1 agreement (0..1) on the "
                                   "held-out text and on the answers to image prompts, each (default 0.95)."),
    eval_prompts: Path = typer.Option(None, "--eval_prompts", help="--recipe auto: evaluation prompts (JSON, as "
                                      "verify --prompts; default: the shipped held-out set)."),
    eval_images: Path = typer.Option(None, "--eval_images", help="--recipe auto: evaluation photos (as verify "
                                     "--images)."),
    eval_text: Path = typer.Option(None, "--eval_text", help="--recipe auto: held-out plain text for perplexity "
                                   "(as verify --text)."),
    time_budget: float = typer.Option(None, "--time_budget", help="--recipe auto: minutes for the whole run; "
                                      "dear calibrations (msModelSlim's m2) run when they fit, candidates and "
                                      "fallback steps that would not fit are skipped (default: no limit; the base "
                                      "and the rotation calibration only)."),
) -> None:
    """Calibrate (reusing a matching session cache) and write the W8A8 model."""
    auto = {"max_ppl_increase": max_ppl_increase, "min_top1": min_top1, "eval_prompts": eval_prompts,
            "eval_images": eval_images, "eval_text": eval_text, "time_budget": time_budget}
    if recipe_name == "auto":
        fixed = {"--anti_outlier": anti_outlier != "m2", "--alpha": alpha != "0.5", "--act_method": act_method != 2,
                 "--m2_search": m2_search != "full", "--keep_float": keep_float != 0, "--float_linears": float_linears,
                 "--weight_method": weight_method != "rtn", "--smooth_vo": smooth_vo,
                 "--gptq_damp": gptq_damp != 0.01, "--gptq_block_size": gptq_block_size != 128,
                 "--gptq_act_order": _bool(gptq_act_order, "--gptq_act_order") is not True,
                 "--gptq_tokens": gptq_tokens != "all"}
        given = [flag for flag, on in fixed.items() if on]
        if given:
            raise LlavaqError(f"{given[0]} is chosen by --recipe auto; leave it out (or use --recipe msmodelslim)")
        return _quantize_auto(model_path, save_directory, calib_images, w_bit, a_bit, device_type,
                              _bool(trust_remote_code, "--trust_remote_code"),
                              format or ("mindie" if mindie_format else "msmodelslim"), modules, float_dtype,
                              text_prompts, part_file_size, cache_dir, stream_memory_gb, overwrite, auto)
    if recipe_name != "msmodelslim":
        raise LlavaqError(f"--recipe must be msmodelslim or auto, not {recipe_name!r}")
    given = [key for key, v in auto.items() if v is not None]
    if given:
        raise LlavaqError(f"--{given[0]} applies to --recipe auto only")
    recipe = _recipe(w_bit, a_bit, anti_outlier, alpha, act_method, modules, m2_search, float_dtype, text_prompts,
                     keep_float, float_linears, image_loading=image_loading, m2_scope=m2_scope, rotation=rotation,
                     rotation_seed=rotation_seed, smooth_vo=smooth_vo, weight_method=weight_method, gptq_damp=gptq_damp,
                     gptq_block_size=gptq_block_size, gptq_act_order=gptq_act_order, smooth_stat=smooth_stat,
                     gptq_tokens=gptq_tokens)
    trust = _bool(trust_remote_code, "--trust_remote_code")
    fmt = format or ("mindie" if mindie_format else "msmodelslim")
    _device_line(device_type)
    with _progress() as progress:
        cal, res = api.quantize(model_path, calib_images, save_directory, recipe, format=fmt,
                                part_file_size=part_file_size, overwrite=overwrite, cache_dir=cache_dir,
                                device_type=device_type, trust_remote_code=trust, progress=progress,
                                stream_memory_gb=stream_memory_gb)
    _print_calibration(cal)
    _print_export(res)
    _summary(0.0 if cal.reused else cal.seconds, res)


def _quantize_auto(model_path: Path, save_directory: Path, calib_images: Path, w_bit: int, a_bit: int,
                   device_type: str, trust: bool, fmt: str, modules: str, float_dtype: str, text_prompts: Path | None,
                   part_file_size: float | None, cache_dir: Path | None, stream_memory_gb: float | None,
                   overwrite: bool, auto: dict) -> None:
    """``quantize --recipe auto``: print the tuning table; exit 1 (best model written) when the target is missed."""
    QuantRecipe(w_bit=w_bit, a_bit=a_bit)  # one-line error for anything but W8A8
    prompts = read_text_prompts(text_prompts) if text_prompts is not None else None
    _device_line(device_type)
    with _progress() as progress:
        res = api.tune(model_path, calib_images, save_directory, format=fmt, **auto, text_prompts=prompts,
                       modules=modules, float_dtype=float_dtype, part_file_size=part_file_size, overwrite=overwrite,
                       cache_dir=cache_dir, device_type=device_type, trust_remote_code=trust, progress=progress,
                       stream_memory_gb=stream_memory_gb)
    for c in res.calibrations:
        state = "reused" if c.reused else f"calibrated in {c.seconds:.1f}s"
        err.print(f"[green]✓[/] {escape(c.label)}: {state}", soft_wrap=True)
        err.print(f"  session cache: {escape(c.cache)}", soft_wrap=True, highlight=False)
    out.print(tuning_table(res.table()))
    for note in res.notes:
        err.print(f"  note: {escape(note)}", soft_wrap=True, highlight=False)
    resumed = sum(r.status == "resumed" for r in res.rows)
    again = f", {resumed} read back from the session cache" if resumed else ""
    table = escape(str(res.save_directory / "llavaq_tuning.json"))
    err.print(f"{res.verify_calls} scoring(s) run{again}; table saved as {table}", soft_wrap=True, highlight=False)
    _print_export(res.export)
    _summary(res.seconds - res.export.seconds, res.export)
    if not res.met:
        raise VerificationFailed(f"target missed; the best candidate ({res.chosen.candidate}) was written to "
                                 f"{res.save_directory}: " + "; ".join(res.missed))
    err.print(f"[green]✓[/] {escape(res.chosen.candidate)} meets the target", soft_wrap=True)


def _summary(calib_seconds: float, res) -> None:
    err.print(summary_line(calib_seconds + res.seconds, res.bytes_written, len(res.files)), highlight=False,
              soft_wrap=True)


@app.command()
def calibrate(
    model_path: Path = ModelPath,
    calib_images: Path = CalibImages,
    cache_dir: Path = CacheDir,
    w_bit: int = WBit,
    a_bit: int = ABit,
    device_type: str = DeviceType,
    trust_remote_code: str = TrustRemote,
    anti_outlier: str = AntiOutlier,
    alpha: str = Alpha,
    act_method: int = ActMethod,
    modules: str = Modules,
    m2_search: str = M2Search,
    m2_scope: str = M2Scope,
    text_prompts: Path = TextPrompts,
    smooth_vo: bool = SmoothVO,
    smooth_stat: str = SmoothStat,
    weight_method: str = typer.Option("rtn", "--weight_method", help="gptq: also record the input moments GPTQ "
                                      "needs, so exports can use --weight_method gptq (and rtn)."),
    gptq_tokens: str = GptqTokens,
    image_loading: str = ImageLoading,
    rotation: str = Rotation,
    rotation_seed: int = RotationSeed,
    stream_memory_gb: float = StreamMemory,
) -> None:
    """Run calibration once and store the session cache (resumes if interrupted)."""
    recipe = _recipe(w_bit, a_bit, anti_outlier, alpha, act_method, modules, m2_search, "auto", text_prompts,
                     smooth_vo=smooth_vo, weight_method=weight_method, image_loading=image_loading,
                     smooth_stat=smooth_stat, m2_scope=m2_scope, rotation=rotation, rotation_seed=rotation_seed,
                     gptq_tokens=gptq_tokens)
    _device_line(device_type)
    with _progress() as progress:
        cal = api.calibrate(model_path, calib_images, recipe, cache_dir=cache_dir, device_type=device_type,
                            trust_remote_code=_bool(trust_remote_code, "--trust_remote_code"), progress=progress,
                            stream_memory_gb=stream_memory_gb)
    _print_calibration(cal)
    _print_range_drivers(cal.cache)
    out.print(str(cal.cache.path))


@app.command()
def export(
    model_path: Path = ModelPath,
    cache: Path = typer.Option(..., "--cache", help="Session cache directory (printed by calibrate)."),
    save_directory: Path = typer.Option(..., "--save_directory", help="Output directory."),
    format: str = typer.Option("msmodelslim", "--format",
                               help="msmodelslim | mindie | compressed-tensors | fakequant."),
    part_file_size: float = PartFileSize,
    anti_outlier: str = typer.Option(None, "--anti_outlier", help="Derive none/m1 from cached float statistics."),
    alpha: str = Alpha,
    smooth_stat: str = typer.Option(None, "--smooth_stat", help="Derive m1 with this activation statistic: absmax "
                                    "or range (default: as calibrated)."),
    float_dtype: str = FloatDtype,
    keep_float: int = KeepFloat,
    float_linears: str = FloatLinears,
    smooth_vo: bool = typer.Option(None, "--smooth_vo/--no_smooth_vo", help="Derive with / without the "
                                   "v_proj -> o_proj smoothing (default: as calibrated)."),
    weight_method: str = WeightMethod,
    gptq_damp: float = GptqDamp,
    gptq_block_size: int = GptqBlock,
    gptq_act_order: str = GptqActOrder,
    device_type: str = typer.Option("cpu", "--device_type", help="Target device: recorded in MindIE's "
                                    "quantization_config; with --float_dtype auto, npu keeps the checkpoint dtype."),
    trust_remote_code: str = TrustRemote,
    overwrite: bool = Overwrite,
) -> None:
    """Write any format from a session cache, with no forward pass."""
    sc = SessionCache.load(cache)
    cached = QuantRecipe.from_dict(sc.manifest["recipe"])
    smoothing = {} if anti_outlier is None else {"anti_outlier": anti_outlier, "alpha": alpha}
    recipe = cached.replace(
        float_dtype=float_dtype, keep_float=keep_float, float_linears=_float_linears(float_linears), **smoothing,
        **_recipe_options(cached.smooth_vo if smooth_vo is None else smooth_vo, weight_method, gptq_damp,
                          gptq_block_size, gptq_act_order, cached.smooth_stat if smooth_stat is None else smooth_stat))
    res = api.export(model_path, sc, save_directory, format=format, recipe=recipe, part_file_size=part_file_size,
                     overwrite=overwrite, device_type=device_type,
                     trust_remote_code=_bool(trust_remote_code, "--trust_remote_code"))
    _print_export(res)
    _summary(0.0, res)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="An output directory (any format) or a session cache."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
) -> None:
    """Audit a quantized model or session cache: modules, scales, consistency checks."""
    raise typer.Exit(run_inspect(path, json_out=json_out, console=out))


@app.command()
def verify(
    model_path: Path = typer.Option(..., "--model_path", help="The float model."),
    quantized: Path = typer.Option(..., "--quantized", help="A quantized output directory (any format)."),
    images: Path = typer.Option(None, "--images", help="Evaluation photos (default: the shipped held-out set)."),
    prompts: Path = typer.Option(None, "--prompts", help="JSON list of {image, question} / text prompts."),
    text: Path = typer.Option(None, "--text", help="Held-out plain text for perplexity."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    max_ppl_increase: float = typer.Option(None, "--max_ppl_increase", help="Exit 1 if the held-out perplexity "
                                           "rises by more than this many percent."),
    min_top1: float = typer.Option(None, "--min_top1", help="Exit 1 if top-1 agreement (0..1) on the held-out text "
                                   "or on the answers to image prompts is below this (each must hold)."),
    max_ppl_increase_alias: float = typer.Option(None, "--max-ppl-increase", hidden=True),
    min_top1_alias: float = typer.Option(None, "--min-top1", hidden=True),
    mode: str = typer.Option("static", "--mode", help="static (as the kernels run the output); dynamic "
                             "(per-token activations) or weight_only (float activations): references that "
                             "separate what the static ranges and the int8 weights cost."),
) -> None:
    """Measure W8A8 fidelity against the float model with integer-exact kernel emulation."""
    max_ppl_increase = max_ppl_increase if max_ppl_increase is not None else max_ppl_increase_alias
    min_top1 = min_top1 if min_top1 is not None else min_top1_alias
    raise typer.Exit(run_verify(model_path, quantized, images=images, prompts=prompts, text=text,
                                json_out=json_out, max_ppl_increase=max_ppl_increase, min_top1=min_top1,
                                mode=mode, console=out))


_INTERRUPTED = ("[yellow]interrupted:[/] no output was written; the session cache keeps every finished layer "
                "(and tuning score): run the same command again to resume")


def main() -> None:
    """Entry point: one-line errors, exit 130 on Ctrl-C, never a traceback (LLAVAQ_DEBUG=1 shows it)."""
    debug = os.environ.get("LLAVAQ_DEBUG") == "1"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Non-standalone Typer turns KeyboardInterrupt into a *returned* 130 and ``typer.Exit(n)`` into a
        # returned n, so the return value is the exit status.
        rv = app(standalone_mode=False)
        if rv == 130:
            err.print(_INTERRUPTED, soft_wrap=True)
            sys.exit(130)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except LlavaqError as e:
        if debug:
            raise
        err.print(f"[red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
        if isinstance(e, Interrupted):
            sys.exit(130)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print(_INTERRUPTED, soft_wrap=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and anything unexpected
        if isinstance(e, _click_exceptions("ClickException")):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, _click_exceptions("Abort")):  # click's wrapper of KeyboardInterrupt / EOF
            err.print(_INTERRUPTED, soft_wrap=True)
            sys.exit(130)
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        err.print(f"[red]error:[/] {e.__class__.__name__}: {escape(msg)} (set LLAVAQ_DEBUG=1 for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


def _click_exceptions(name: str) -> tuple[type, ...]:
    """``name`` from click and from the copy of click that newer Typer releases vendor (``typer._click``)."""
    found = []
    for mod in ("click.exceptions", "typer._click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


if __name__ == "__main__":
    main()
