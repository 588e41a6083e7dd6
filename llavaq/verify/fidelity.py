"""``llavaq verify``: fidelity of a W8A8 output against the float model, with integer-exact kernels.

The quantized model is a float32 ``LlavaForConditionalGeneration`` whose float parameters come from
the output's FLOAT tensors and whose quantized Linears are replaced by
:class:`~llavaq.quant.emulate.EmulatedW8A8Linear` (static int8 activations with the saved
input_scale/input_offset, int8×int8 accumulated exactly, rescaled with deq_scale and quant_bias),
i.e. what MindIE / vLLM int8 kernels compute from the saved tensors.

Measured, float (FP) vs quantized (Q):

* per prompt (image + question, or text only): the FP model's greedy answer is teacher-forced through
  both models; logits cosine, top-1 agreement and KL(FP‖Q) over the answer positions, and top-1 over
  all text positions of the sequence;
* held-out plain text: perplexity FP vs Q, top-1 agreement and KL per token;
* per quantized Linear: output MSE of the emulated Linear vs the float Linear on the *same* input
  (smoothing undone from the saved norms), relative to the float output power, and the fraction of
  activations clipped by the static range — the worst layers are listed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch

from llavaq.calib.coverage import range_drivers
from llavaq.calib.samples import load_processor
from llavaq.calib.streams import default_stream_budget
from llavaq.errors import LlavaqError, OutputError
from llavaq.files import RECORD_FILE
from llavaq.model.llava import LlavaArch
from llavaq.model.loading import model_for_recipe, open_model
from llavaq.recipe import QuantRecipe
from llavaq.safety import check_output_of_model
from llavaq.verify.data import EvalPrompt, load_eval_prompts, load_heldout_text
from llavaq.verify.layers import LayerErrorHooks
from llavaq.verify.metrics import FidelityReport, perplexity_windows
from llavaq.verify.outputs import QuantizedCheckpoint, read_quantized_output
from llavaq.verify.paired import StreamedVerify
from llavaq.verify.reference import FloatReference, float_side_dir


def verify(
    model_path: str | Path,
    quantized_dir: str | Path,
    *,
    images: str | Path | None = None,
    prompts: str | Path | list[EvalPrompt] | None = None,
    text: str | Path | None = None,
    mode: str = "static",
    answer_tokens: int = 16,
    ppl_window: int = 256,
    max_text_tokens: int = 4096,
    worst: int = 10,
    float_reference: MutableMapping | None = None,
    layer_errors: bool = True,
    force: bool = False,
    stream_budget: int | None = None,
    cache_dir: str | Path | None = None,
) -> FidelityReport:
    """Compare the float model with the quantized output as int8 kernels run it (see module docstring).

    ``mode="dynamic"`` replaces the saved static ranges with per-token dynamic int8 activations (what static
    ranges cost); ``mode="weight_only"`` keeps activations float: what the int8 weights alone cost.
    ``float_reference``: the float side shared between calls on the same model and evaluation inputs (e.g.
    comparing recipes; a :class:`~llavaq.verify.reference.FloatReference` keeps it in a session cache): the float
    model's answers and logits are computed once, and a later call streams the quantized model alone.
    ``layer_errors=False`` skips the per-Linear error hooks (same model-level numbers, less time); ``force``
    compares even an output made from another model. The float model is streamed from ``model_path``, one stage
    at a time. ``stream_budget``: bytes of hidden states kept in memory (default: a quarter of the available
    memory; beyond it they are read back from disk). ``cache_dir`` (without
    ``float_reference``): keep the float side in that session cache directory (:mod:`llavaq.verify.reference`),
    so the next call on this model streams the quantized model alone.
    """
    t0 = time.perf_counter()
    arch = open_model(model_path)
    q = read_quantized_output(quantized_dir)
    check_output_of_model(model_path, arch.ckpt.fingerprint(), quantized_dir, q.record, force)
    eval_prompts, heldout = _eval_inputs(prompts, images, text)
    processor = load_processor(model_path)
    if float_reference is None and cache_dir is not None:
        float_reference = FloatReference(float_side_dir(cache_dir, arch.ckpt.fingerprint()))
    run = StreamedVerify(arch, q, mode, processor, {} if float_reference is None else float_reference,
                         default_stream_budget() if stream_budget is None else stream_budget)
    hooks = LayerErrorHooks(q, arch, reference=_rotated_reference(arch, q)) if layer_errors else None
    windows = _windows(processor.tokenizer, heldout, ppl_window, max_text_tokens)
    results, acc, image_acc, textq_acc, text = run.score(eval_prompts, answer_tokens, windows or [], hooks)
    layers = sorted(hooks.result(), key=lambda e: e.rel_mse, reverse=True) if hooks is not None else []
    ppl_fp, ppl_q, text_n, text_stats = text.result() if windows else (None, None, 0, None)
    top1, kl, cos = acc.means()
    tt = text_stats.means() if text_stats is not None else (None, None, None)
    (image_top1, image_kl), (textq_top1, textq_kl) = image_acc.top1_kl(), textq_acc.top1_kl()
    return FidelityReport(
        model_path=str(model_path), quantized=str(quantized_dir), format=q.format, mode=mode, prompts=results,
        ppl_fp=ppl_fp, ppl_q=ppl_q, text_tokens=text_n, text_top1=tt[0], text_kl=tt[1], text_cosine=tt[2],
        top1=top1, kl=kl, cosine=cos, worst_layers=layers[:worst], quantized_linears=len(q.linears),
        seconds=time.perf_counter() - t0, range_drivers=_range_drivers_from_record(q.record),
        image_top1=image_top1, image_kl=image_kl, image_positions=image_acc.n,
        text_prompt_top1=textq_top1, text_prompt_kl=textq_kl, text_prompt_positions=textq_acc.n,
    )


def _windows(tokenizer, heldout: str | None, window: int, max_tokens: int) -> list[torch.Tensor] | None:
    if heldout is None:
        return None
    windows = perplexity_windows(tokenizer, heldout, window, max_tokens)
    if not windows:
        raise LlavaqError("held-out text is too short for perplexity (needs at least 2 tokens)")
    return windows


def _eval_inputs(prompts: str | Path | list[EvalPrompt] | None, images: str | Path | None,
                 text: str | Path | None) -> tuple[list[EvalPrompt], str | None]:
    """The evaluation prompts and held-out text; refuses none of either."""
    eval_prompts = load_eval_prompts(prompts, images)
    heldout = load_heldout_text(text)
    if not eval_prompts and heldout is None:
        raise LlavaqError("no evaluation inputs: pass --images/--prompts and/or --text "
                          "(the shipped held-out set is not installed)")
    return eval_prompts, heldout


def _rotated_reference(arch: LlavaArch, q: QuantizedCheckpoint) -> Callable[[str], torch.Tensor] | None:
    """For an output made with ``--rotation``: the rotated float model's tensors (what it was quantized from).

    Its logits equal the original's, so the logits are compared with the original float model; only the
    per-Linear reference needs the rotated weights.
    """
    recipe = (q.record or {}).get("recipe") or {}
    if recipe.get("rotation", "none") == "none":
        return None
    try:
        rotated = model_for_recipe(arch, QuantRecipe.from_dict(recipe))
    except LlavaqError as e:
        raise OutputError(f"{q.path / RECORD_FILE}: cannot rebuild its rotation ({e.message})") from None
    return rotated.ckpt.tensor


def _range_drivers_from_record(record: dict[str, Any]) -> dict[str, Any] | None:
    cache = record.get("cache")
    if not cache or not Path(cache).is_dir():
        return None
    try:
        return range_drivers(cache).to_dict()
    except (LlavaqError, ImportError, KeyError):
        return None
