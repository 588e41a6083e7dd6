"""``llavaq verify``: fidelity of a W8A8 output against the float model, with integer-exact kernels.

Modules: :mod:`~llavaq.verify.data` (evaluation prompts and held-out text), :mod:`~llavaq.verify.outputs`
(reading an output), :mod:`~llavaq.verify.stages` (the float and the emulated int8 model, stage by stage),
:mod:`~llavaq.verify.streamed` (both advancing one stage at a time), :mod:`~llavaq.verify.generate` (the float
model's greedy answers, streamed), :mod:`~llavaq.verify.paired` (one run, scored sample by sample),
:mod:`~llavaq.verify.reference` (the float side kept in the session cache), :mod:`~llavaq.verify.emulated` (the
whole-model emulation, for small models in tests), :mod:`~llavaq.verify.layers` (per-Linear errors),
:mod:`~llavaq.verify.metrics` (per prompt, perplexity, the report), :mod:`~llavaq.verify.thresholds` (the one
pass/fail rule) and :mod:`~llavaq.verify.fidelity` (``verify``). Its tables are rendered by :mod:`llavaq.cli.render`.
Evaluation never imports the quantization pipeline: it reads outputs.
"""

from llavaq.verify.data import (
    DEFAULT_QUESTION,
    IMAGE_TEMPLATE,
    TEXT_TEMPLATE,
    EvalPrompt,
    load_eval_prompts,
    load_heldout_text,
    shipped_eval,
)
from llavaq.verify.emulated import build_quantized_model, load_float_model
from llavaq.verify.fidelity import verify
from llavaq.verify.layers import LayerError, LayerErrorHooks
from llavaq.verify.metrics import FidelityReport, PromptResult, TokenStats, perplexity_windows
from llavaq.verify.outputs import QUANT_SUFFIXES, QuantizedCheckpoint, read_quantized_output
from llavaq.verify.reference import FloatReference, float_side_dir
from llavaq.verify.thresholds import RULE_FIELDS, Miss, check_thresholds, report_score, target_misses

__all__ = [
    "DEFAULT_QUESTION", "IMAGE_TEMPLATE", "QUANT_SUFFIXES", "RULE_FIELDS", "TEXT_TEMPLATE", "EvalPrompt",
    "FidelityReport", "FloatReference", "LayerError", "LayerErrorHooks", "Miss", "PromptResult",
    "QuantizedCheckpoint", "TokenStats",
    "build_quantized_model", "check_thresholds", "float_side_dir", "load_eval_prompts", "load_float_model",
    "load_heldout_text",
    "perplexity_windows", "read_quantized_output", "report_score", "shipped_eval",
    "target_misses", "verify",
]
