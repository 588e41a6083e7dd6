"""QuantRecipe: every knob of a quantization, validated, serialisable to JSON.

The recipe is the single source of truth shared by the CLI, the library API, the session cache key
and the output's own record of how it was made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llavaq.errors import LlavaqError

ANTI_OUTLIER_METHODS = ("m2", "m1", "none")
ACT_METHODS = {1: "minmax", 2: "histogram"}
MODULE_PRESETS = ("msmodelslim", "with_down_proj", "language_only")
M2_SEARCH_MODES = ("full", "fast", "exhaustive")
WEIGHT_METHODS = ("rtn", "gptq")
SMOOTH_STATS = ("absmax", "range")
GPTQ_TOKENS = ("all", "balanced")
#: which smoothing groups m2 searches: msModelSlim's (the layer classes its multimodal flow wraps:
#: Llama decoder and CLIP encoder layers) or every group of every family
M2_SCOPES = ("msmodelslim", "all")
FLOAT_DTYPES = ("auto", "float16", "bfloat16", "float32")
#: how calibration photos become RGB (llavaq.calib.images.load_image); the first is the default
IMAGE_LOADING = ("upright", "msmodelslim")
ROTATIONS = ("none", "hadamard")
#: (w_bit, a_bit) pairs some output format carries: W8A8 static, and weight-only W8A16 / W4A16 (a_bit 16 = float
#: activations)
BIT_PAIRS = ((8, 8), (8, 16), (4, 16))
DEFAULT_PROMPT = "USER: <image>\nDescribe this image in detail. ASSISTANT:"


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize. Defaults reproduce msModelSlim's LLaVA-1.5 W8A8 case exactly."""

    w_bit: int = 8
    #: 8: static int8 activations (W8A8); 16: float activations, weight-only (W8A16 / W4A16)
    a_bit: int = 8
    #: weight-only: input columns per weight scale (0 = one per output channel); export-time
    group_size: int = 0
    #: weight-only: symmetric weights (True) or asymmetric with a zero point per group (False); export-time
    w_sym: bool = True
    anti_outlier: str = "m2"
    #: SmoothQuant migration strength for m1: a float in [0, 1] or "auto" (per-group search).
    alpha: float | str = 0.5
    #: Activation observer: 1 = msModelSlim StatMinMax (mean of per-batch min/max), 2 = histogram.
    act_method: int = 2
    modules: str = "msmodelslim"
    m2_search: str = "full"
    #: m2 smooths msModelSlim's groups ("msmodelslim": Llama and CLIP layers; none on Mistral, Qwen2,
    #: SigLIP) or every group ("all")
    m2_scope: str = "msmodelslim"
    prompt: str = DEFAULT_PROMPT
    #: Text-only calibration prompts added after the image samples (the LM sees both in use).
    text_prompts: tuple[str, ...] = field(default_factory=tuple)
    #: Float tensors in the output: "auto" = the checkpoint's dtype (what MindIE/vLLM load).
    float_dtype: str = "auto"
    #: Activation rows kept per Linear input in the session cache (for derived recipes).
    activation_sample_tokens: int = 256
    #: Linears kept in float on top of the module preset (export-time: the cache still serves).
    float_linears: tuple[str, ...] = field(default_factory=tuple)
    #: Also keep the N quantized Linears with the largest W8A8 error on the cached activation rows in float.
    keep_float: int = 0
    #: How int8 weight codes are chosen on the per-row grid: "rtn" (round to nearest, msModelSlim) or "gptq"
    #: (error-compensated, from the cached input moments). Export-time: one calibration serves both.
    weight_method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    #: Also smooth Linear -> Linear: v_proj -> o_proj (CLIP out_proj) and, when down_proj is quantized,
    #: up_proj -> down_proj; scales by m1's alpha (m2: searched per group, as --alpha auto). Calibration-time.
    smooth_vo: bool = False
    #: SmoothQuant's per-channel activation statistic for m1 (llavaq.algorithms.smoothquant): "absmax"
    #: (max|X_c|, the paper's) or "range" (max_c − min_c, llm-compressor's); same for centred LayerNorm groups.
    smooth_stat: str = "absmax"
    #: How the language model's calibration tokens weigh in GPTQ's Hessian: "all" (every token once: a photo's
    #: 576 image tokens outweigh its prompt ~40 to 1) or "balanced" (image and text tokens half each).
    #: Calibration-time (the recorded moments); implies ``input_moments``.
    gptq_tokens: str = "all"
    #: Record each quantized Linear's input moments (the Hessian GPTQ needs) in the session cache.
    #: Calibration-time; implied by ``weight_method="gptq"``.
    input_moments: bool = False
    #: How calibration photos become RGB: "upright" (EXIF orientation applied, alpha composited on white) or
    #: "msmodelslim" (upstream's example exactly: as decoded, then convert("RGB")). Changes the calibration inputs.
    image_loading: str = "upright"
    #: Rotate the language model's residual stream (randomised Hadamard, folded into the weights) before
    #: calibration: "none" or "hadamard"; the seed draws the random signs.
    rotation: str = "none"
    rotation_seed: int = 0

    def __post_init__(self) -> None:
        self._check_calibration()
        self._check_weights_and_rest()

    def _check_calibration(self) -> None:
        """The bits, the anti-outlier method and the activation observers (one-line errors)."""
        self._check_bits()
        if self.anti_outlier not in ANTI_OUTLIER_METHODS:
            raise LlavaqError(
                f"unknown anti-outlier method {self.anti_outlier!r}; choose one of {', '.join(ANTI_OUTLIER_METHODS)}"
            )
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                try:
                    object.__setattr__(self, "alpha", float(self.alpha))
                except ValueError:
                    raise LlavaqError(f"--alpha must be a number in [0, 1] or 'auto', not {self.alpha!r}") from None
        if not isinstance(self.alpha, str) and not 0.0 <= float(self.alpha) <= 1.0:
            raise LlavaqError(f"--alpha must be in [0, 1], not {self.alpha}")
        if self.act_method not in ACT_METHODS:
            raise LlavaqError(f"--act_method must be 1 (min-max) or 2 (histogram), not {self.act_method}")
        if self.modules not in MODULE_PRESETS:
            raise LlavaqError(f"unknown module preset {self.modules!r}; choose one of {', '.join(MODULE_PRESETS)}")
        if self.m2_search not in M2_SEARCH_MODES:
            raise LlavaqError(f"--m2_search must be one of {', '.join(M2_SEARCH_MODES)}")
        if self.m2_scope not in M2_SCOPES:
            raise LlavaqError(f"--m2_scope must be one of {', '.join(M2_SCOPES)}, not {self.m2_scope!r}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise LlavaqError(f"--float_dtype must be one of {', '.join(FLOAT_DTYPES)}")

    def _check_bits(self) -> None:
        """w_bit / a_bit / group_size / w_sym: only what an output format carries (one-line errors)."""
        for name in ("w_bit", "a_bit", "group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise LlavaqError(f"--{name} must be an integer, not {v!r}")
        if (self.w_bit, self.a_bit) not in BIT_PAIRS:
            raise LlavaqError(
                f"--w_bit {self.w_bit} --a_bit {self.a_bit} is not supported: no output format carries it; choose "
                "W8A8 (--w_bit 8 --a_bit 8), W8A16 (--w_bit 8 --a_bit 16) or W4A16 (--w_bit 4 --a_bit 16)")
        if self.group_size < 0:
            raise LlavaqError(f"--group_size must be 0 (per channel) or a positive number of input columns, "
                              f"not {self.group_size}")
        if self.a_bit == 8 and (self.group_size or not self.w_sym):
            raise LlavaqError("W8A8 weights are per-channel and symmetric (msModelSlim's int8 kernel): "
                              "--group_size and --w_sym false need weight-only --a_bit 16")
        if self.weight_only:
            if self.anti_outlier == "m1" or self.smooth_vo:
                raise LlavaqError(
                    "--a_bit 16 quantizes no activation, so there is nothing to smooth for: --anti_outlier m1 and "
                    "--smooth_vo apply to W8A8 only (weight-only recipes use --anti_outlier none)")
            # the default m2 is W8A8's anti-outlier; weight-only recipes calibrate without smoothing
            object.__setattr__(self, "anti_outlier", "none")

    @property
    def weight_only(self) -> bool:
        """W8A16 / W4A16: weights quantized, activations float."""
        return self.a_bit == 16

    @property
    def quant_type(self) -> str:
        """msModelSlim's name of the quantization: ``W8A8``, ``W8A16`` or ``W4A16``."""
        return f"W{self.w_bit}A{self.a_bit}"

    def check_group_size(self, linear: str, in_features: int) -> None:
        """Refuse a ``group_size`` that does not divide a quantized Linear's input columns."""
        if self.group_size and in_features % self.group_size:
            raise LlavaqError(f"--group_size {self.group_size} does not divide the {in_features} input columns of "
                              f"{linear}; choose a divisor, or keep that Linear in float with --float_linears")

    def _check_weights_and_rest(self) -> None:
        """The weight method, smoothing, fallback and rotation fields (one-line errors)."""
        if self.weight_method not in WEIGHT_METHODS:
            raise LlavaqError(f"--weight_method must be one of {', '.join(WEIGHT_METHODS)}, not {self.weight_method!r}")
        if not 0.0 <= float(self.gptq_damp) <= 1.0:
            raise LlavaqError(f"--gptq_damp must be in [0, 1] (a fraction of the mean Hessian diagonal), "
                              f"not {self.gptq_damp}")
        if int(self.gptq_block_size) < 1:
            raise LlavaqError(f"--gptq_block_size must be >= 1, not {self.gptq_block_size}")
        if self.gptq_tokens not in GPTQ_TOKENS:
            raise LlavaqError(f"--gptq_tokens must be one of {', '.join(GPTQ_TOKENS)}, not {self.gptq_tokens!r}")
        if self.weight_method == "gptq" or self.gptq_tokens != "all":
            object.__setattr__(self, "input_moments", True)
        if self.smooth_stat not in SMOOTH_STATS:
            raise LlavaqError(f"--smooth_stat must be one of {', '.join(SMOOTH_STATS)}, not {self.smooth_stat!r}")
        if self.smooth_vo and self.anti_outlier == "none":
            raise LlavaqError("--smooth_vo needs an anti-outlier method (--anti_outlier m1 or m2): it smooths "
                              "v_proj -> o_proj the way the method smooths the norm groups")
        if self.image_loading not in IMAGE_LOADING:
            raise LlavaqError(f"--image_loading must be one of {', '.join(IMAGE_LOADING)}, "
                              f"not {self.image_loading!r}")
        if isinstance(self.keep_float, bool) or not isinstance(self.keep_float, int) or self.keep_float < 0:
            raise LlavaqError(f"--keep_float must be an integer >= 0, not {self.keep_float!r}")
        object.__setattr__(self, "float_linears", tuple(self.float_linears))
        if self.rotation not in ROTATIONS:
            raise LlavaqError(f"--rotation must be one of {', '.join(ROTATIONS)}, not {self.rotation!r}")
        if isinstance(self.rotation_seed, bool) or not isinstance(self.rotation_seed, int) or self.rotation_seed < 0:
            raise LlavaqError(f"--rotation_seed must be an integer >= 0, not {self.rotation_seed!r}")
        if self.rotation != "none" and self.modules == "with_down_proj":
            raise LlavaqError(
                "--rotation hadamard cannot be used with --modules with_down_proj: down_proj's input (the SwiGLU "
                "product) is not in the rotated basis, and rotating it would need an online Hadamard transform in "
                "the kernel, which no output format llavaq writes can express; keep down_proj float (--modules "
                "msmodelslim or language_only)"
            )
        if self.activation_sample_tokens < 0:
            raise LlavaqError("--activation_sample_tokens must be >= 0")
        object.__setattr__(self, "text_prompts", tuple(self.text_prompts))

    def check_quantizes(self, n_candidates: int) -> None:
        """Refuse a recipe that would keep every Linear of its module set in float (a "W8A8" model with no
        quantized Linear): ``n_candidates`` = the Linears the module set quantizes, less ``float_linears``."""
        if n_candidates <= self.keep_float:
            raise LlavaqError(f"--keep_float {self.keep_float} keeps every one of the {n_candidates} quantizable "
                              "Linears in float: nothing would be quantized; give a smaller --keep_float")

    @property
    def observer(self) -> str:
        return ACT_METHODS[self.act_method]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text_prompts"] = list(self.text_prompts)
        d["float_linears"] = list(self.float_linears)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LlavaqError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("text_prompts", "float_linears"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def replace(self, **changes: Any) -> QuantRecipe:
        return dataclasses.replace(self, **changes)

    #: Fields that change what the calibration pass computes (and so key the session cache).
    CALIBRATION_FIELDS = ("anti_outlier", "act_method", "modules", "m2_search", "prompt", "text_prompts",
                          "activation_sample_tokens")
    #: Calibration fields added after caches existed: part of the key only when not at their default, so the
    #: session caches of earlier recipes keep their ids.
    OPTIONAL_CALIBRATION_FIELDS: ClassVar[dict[str, Any]] = {"input_moments": False, "smooth_vo": False,
                                                             "image_loading": "upright", "gptq_tokens": "all"}

    def calibration_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        out = {k: d[k] for k in self.CALIBRATION_FIELDS}
        out.update({k: d[k] for k, default in self.OPTIONAL_CALIBRATION_FIELDS.items() if d[k] != default})
        if self.anti_outlier == "m1":
            out["alpha"] = self.alpha
            if self.smooth_stat != "absmax":  # calibrated m1 smooths with it (absent by default: old cache ids)
                out["smooth_stat"] = self.smooth_stat
        if self.anti_outlier == "m2" and self.m2_scope != "msmodelslim":  # (older caches keep their key)
            out["m2_scope"] = self.m2_scope
        if self.rotation != "none":  # only then: the keys of caches made without a rotation do not change
            out["rotation"] = self.rotation
            out["rotation_seed"] = self.rotation_seed
        return out

    def calibration_key(self) -> str:
        blob = json.dumps(self.calibration_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


#: smallest shard (--part_file_size, GB): 1 KiB; anything smaller is a typo (1e-300 would be 0 bytes)
MIN_PART_FILE_SIZE_GB = 1 / 2**20
#: largest in-memory stream budget accepted (--stream_memory_gb): 1 PiB, i.e. "all of it"
MAX_STREAM_MEMORY_GB = float(1 << 20)


def check_part_file_size(gb: float | None) -> None:
    """``--part_file_size``: None (one file) or a finite number of GB >= 1 MiB."""
    if gb is None:
        return
    if isinstance(gb, bool) or not isinstance(gb, int | float) or not math.isfinite(gb) or \
            not MIN_PART_FILE_SIZE_GB <= gb <= MAX_STREAM_MEMORY_GB:
        raise LlavaqError(f"--part_file_size must be a positive, finite number of GB between "
                          f"{MIN_PART_FILE_SIZE_GB:.6g} (1 KiB) and {MAX_STREAM_MEMORY_GB:.0f}, not {gb}")


def check_stream_memory_gb(gb: float | None) -> None:
    """``--stream_memory_gb``: None (a quarter of the available memory) or a finite number of GB >= 0."""
    if gb is None:
        return
    if isinstance(gb, bool) or not isinstance(gb, int | float) or not math.isfinite(gb) or \
            not 0 <= gb <= MAX_STREAM_MEMORY_GB:
        if isinstance(gb, int | float) and gb < 0:
            raise LlavaqError(f"--stream_memory_gb must be a number of GB >= 0, not {gb}")
        raise LlavaqError(f"--stream_memory_gb must be a finite number of GB between 0 and "
                          f"{MAX_STREAM_MEMORY_GB:.0f}, not {gb}")
