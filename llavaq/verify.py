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

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llavaq.calib.prompts import read_user_text
from llavaq.errors import ImageError, LlavaqError, OutputError
from llavaq.quant.emulate import (
    EmulatedW8A8Linear,
    QuantLinearParams,
    kernel_mode,
    quantize_input,
)

QUANT_SUFFIXES = ("weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")
IMAGE_TEMPLATE = "USER: <image>\n{q} ASSISTANT:"
TEXT_TEMPLATE = "USER: {q} ASSISTANT:"
DEFAULT_QUESTION = "Describe this image in detail."


# ---------------------------------------------------------------------------------------------- reading outputs
@dataclass
class QuantizedCheckpoint:
    """A quantized output directory: float tensors + per-Linear integer-kernel tensors."""

    path: Path
    format: str
    float_tensors: dict[str, torch.Tensor]
    linears: dict[str, QuantLinearParams]
    record: dict[str, Any] = field(default_factory=dict)


def read_quantized_output(path: str | Path) -> QuantizedCheckpoint:
    """Read any W8A8 output llavaq writes (msmodelslim, mindie, compressed-tensors, fakequant), msModelSlim's own
    and llm-compressor's int8 compressed-tensors outputs (either transformers key layout)."""
    from llavaq.formats.reader import read_quantized

    path = Path(path)
    if not path.is_dir():
        raise OutputError(f"quantized model directory {path} does not exist")
    view = read_quantized(path)
    floats = {n: view.tensor(n) for n in view.float_names}
    linears: dict[str, QuantLinearParams] = {}
    for lv in view.linears():
        if lv.quant_bias is not None:  # msModelSlim formats: bias folded into the int32 quant_bias
            qb, post = lv.quant_bias, None
        else:  # zero point subtracted in integers, float bias added after rescaling
            qb = (-lv.input_offset.double() * lv.weight.double().sum(1)).round().to(torch.int32)
            post = lv.bias
        linears[lv.name] = QuantLinearParams(lv.weight, lv.weight_scale.float(), lv.input_scale.float(),
                                             lv.input_offset.float(), qb, lv.deq_scale.float(), lv.bias, post,
                                             lv.activation)
    return QuantizedCheckpoint(path, view.format, floats, linears, view.record or {})


# ---------------------------------------------------------------------------------------------- models
def load_float_model(model_path: str | Path) -> nn.Module:
    """The float LLaVA in float32 (what the quantized model is compared with)."""
    import logging

    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from llavaq.api import open_model

    open_model(model_path)  # validated: one-line errors for bad model dirs
    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(model_path), torch_dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(prev)
    return model.eval()


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def build_quantized_model(float_model: nn.Module, q: QuantizedCheckpoint, *, mode: str = "static",
                          absent=None) -> nn.Module:
    """A float32 LLaVA with the output's FLOAT tensors and emulated int8 kernels for its W8A8 Linears.

    ``absent(name)`` (optional) tells parameters the checkpoint has no tensor for (a SigLIP head
    llava-interleave does not ship): they keep the float model's values, as transformers gives them.
    """
    import copy

    model = copy.deepcopy(float_model)
    _untie_differing(model, q.float_tensors)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, lq in q.linears.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise OutputError(f"{q.path}: quantized module {name} does not exist in the float model") from None
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != tuple(lq.weight.shape):
            raise OutputError(f"{q.path}: {name}.weight has shape {list(lq.weight.shape)}, the float model's "
                              f"is {list(getattr(lin, 'weight', torch.empty(0)).shape)}")
    covered = set()
    with torch.no_grad():
        for name, t in q.float_tensors.items():
            p = params.get(name)
            if p is None:
                raise OutputError(f"{q.path}: tensor {name} does not belong to the float model")
            if tuple(p.shape) != tuple(t.shape):
                raise OutputError(f"{q.path}: tensor {name} has shape {list(t.shape)}, expected {list(p.shape)}")
            p.copy_(t.float())
            covered.add(name)
    for name in q.linears:
        covered.update({f"{name}.weight", f"{name}.bias"})
    missing = [n for n in params if n not in covered and not n.endswith("lm_head.weight")
               and not (absent is not None and absent(n))]
    if missing:
        raise OutputError(f"{q.path}: the output has no tensor for {missing[0]} ({len(missing)} missing)")
    for name, lq in q.linears.items():
        _set_submodule(model, name, EmulatedW8A8Linear(lq, kernel_mode(mode, lq)))
    return model.eval()


def _untie_differing(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give a shared parameter (tied embeddings) its own copy where the output stores different values for it.

    A rotated output unties the float model's tied ``lm_head`` (``E·diag(γ)·Q`` vs the embedding ``E·Q``).
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for shared in names.values():
        given = [n for n in shared if n in tensors]
        for n in given[1:]:
            if not torch.equal(tensors[n], tensors[given[0]]):
                parent, _, attr = n.rpartition(".")
                mod = model.get_submodule(parent)
                setattr(mod, attr, nn.Parameter(getattr(mod, attr).detach().clone(), requires_grad=False))


# ---------------------------------------------------------------------------------------------- evaluation inputs
@dataclass
class EvalPrompt:
    question: str
    image: Path | None = None

    @property
    def label(self) -> str:
        return (self.image.name + ": " if self.image else "[text] ") + self.question


def _shipped(name: str) -> Path | None:
    """A file/dir under llavaq/data/eval shipped with the package, if present."""
    try:
        from importlib.resources import files

        p = files("llavaq").joinpath("data", "eval", name)
        p = Path(str(p))
    except (ModuleNotFoundError, TypeError):
        return None
    return p if p.exists() else None


def load_eval_prompts(prompts: str | Path | list[EvalPrompt] | None, images: str | Path | None) -> list[EvalPrompt]:
    """Evaluation prompts: a JSON list of ``{"image": file, "question": q}`` / ``{"question": q}`` / strings.

    Image files are resolved against ``images`` (default: the prompts file's folder, then the shipped
    held-out images). Without a prompts file every image in ``images`` gets "Describe this image in detail."
    A list of :class:`EvalPrompt` (already resolved) is used as it is.
    """
    from llavaq.calib.images import IMAGE_SUFFIXES

    if isinstance(prompts, list):
        return list(prompts)

    img_dir = Path(images) if images is not None else None
    if img_dir is not None and not img_dir.is_dir():
        raise ImageError(f"evaluation image folder {img_dir} does not exist")
    if prompts is None:
        prompts = _shipped("prompts.json") if images is None else None
        if img_dir is None:
            img_dir = _shipped("images")
    if prompts is None:
        if img_dir is None:
            return []
        files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"evaluation image folder {img_dir} has no images")
        return [EvalPrompt(DEFAULT_QUESTION, f) for f in files]
    prompts = Path(prompts)
    if not prompts.is_file():
        raise LlavaqError(f"prompt file {prompts} does not exist")
    try:
        data = json.loads(prompts.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlavaqError(f"prompt file {prompts}: invalid JSON ({e.__class__.__name__})") from None
    if not isinstance(data, list) or not data:
        raise LlavaqError(f"prompt file {prompts}: expected a non-empty JSON list")
    bases = [d for d in (img_dir, prompts.parent, prompts.parent / "images", _shipped("images")) if d is not None]
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(EvalPrompt(item))
            continue
        if not isinstance(item, dict):
            raise LlavaqError(f"prompt file {prompts}: item {i} is not an object or a string")
        q = item.get("question", item.get("text", item.get("prompt")))
        if not isinstance(q, str) or not q.strip():
            raise LlavaqError(f"prompt file {prompts}: item {i} has no \"question\"")
        img = item.get("image")
        if img is None:
            out.append(EvalPrompt(q))
            continue
        found = next((b / img for b in bases if (b / img).is_file()), None)
        if found is None:
            raise ImageError(f"prompt file {prompts}: image {img!r} (item {i}) not found in "
                             f"{', '.join(str(b) for b in bases)}")
        out.append(EvalPrompt(q, found))
    return out


def load_heldout_text(text: str | Path | None) -> str | None:
    path = Path(text) if text is not None else _shipped("heldout.txt")
    if path is None:
        return None
    s = read_user_text(path, "held-out text file")
    if not s.strip():
        raise LlavaqError(f"held-out text file {path} is empty")
    return s


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class PromptResult:
    prompt: str
    image: str | None
    answer: str
    answer_tokens: int
    cosine: float
    top1: float
    top1_all: float
    kl: float
    positions_all: int


@dataclass
class LayerError:
    name: str
    mse: float
    rel_mse: float
    clip_fraction: float


@dataclass
class FidelityReport:
    model_path: str
    quantized: str
    format: str
    mode: str
    prompts: list[PromptResult]
    ppl_fp: float | None
    ppl_q: float | None
    text_tokens: int
    text_top1: float | None
    text_kl: float | None
    text_cosine: float | None
    top1: float
    kl: float
    cosine: float
    worst_layers: list[LayerError]
    quantized_linears: int
    seconds: float
    range_drivers: dict[str, Any] | None = None
    #: answers to prompts with an image, pooled over their answer positions (None: no image prompt)
    image_top1: float | None = None
    image_kl: float | None = None
    image_positions: int = 0
    #: answers to text-only prompts, pooled likewise
    text_prompt_top1: float | None = None
    text_prompt_kl: float | None = None
    text_prompt_positions: int = 0

    @property
    def ppl_increase(self) -> float | None:
        if self.ppl_fp is None or self.ppl_q is None:
            return None
        return (self.ppl_q / self.ppl_fp - 1.0) * 100.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ppl_increase_percent"] = self.ppl_increase
        return d


class _Acc:
    """Pooled next-token statistics over positions."""

    def __init__(self) -> None:
        self.n = 0
        self.agree = 0
        self.kl = 0.0
        self.cos = 0.0

    def add(self, lf: torch.Tensor, lq: torch.Tensor) -> None:
        lf, lq = lf.double(), lq.double()
        self.n += lf.shape[0]
        self.agree += int((lf.argmax(-1) == lq.argmax(-1)).sum())
        pf, pq = F.log_softmax(lf, -1), F.log_softmax(lq, -1)
        self.kl += float((pf.exp() * (pf - pq)).sum(-1).clamp(min=0).sum())
        self.cos += float(F.cosine_similarity(lf, lq, dim=-1).sum())

    def means(self) -> tuple[float, float, float]:
        n = max(self.n, 1)
        return self.agree / n, self.kl / n, self.cos / n

    def top1_kl(self) -> tuple[float | None, float | None]:
        """(top-1, KL) or (None, None) when nothing was scored."""
        if not self.n:
            return None, None
        t1, kl, _ = self.means()
        return t1, kl


class LayerErrorHooks:
    """Per quantized Linear: emulated output vs the float Linear on the same (smoothed) input.

    The float reference undoes the smoothing using the float model's norms and the output's smoothed
    norms: for a group norm → Linears, ``s = γ/γ'`` and (LayerNorm) ``z = β − β'·s``, so the float
    Linear sees ``x·s + z`` — the original activation — and computes ``W x + b`` with the float model's
    own W and b. For a Linear → Linear group (``--smooth_vo``) the scale of each source row is read off the
    source's weight scale (``s_c = max|W_c|/(127·ws_c)``, ``W`` the float source row with its own input
    smoothing applied) and the shift off its bias (``z = b − b'·s``).

    ``reference`` (tensor name → float tensor) gives the float model the output was quantized from when
    it is not ``float_model`` itself: for a rotated output, the rotated float model (its norms are 1 and its
    Linears read and write the rotated stream), read through :class:`~llavaq.model.rotated.RotatedCheckpoint`.
    The quantized Linears' reference weights are then held in float32 beside the float model.
    """

    def __init__(self, qmodel: nn.Module, float_model: nn.Module, q: QuantizedCheckpoint, arch,
                 reference: Callable[[str], torch.Tensor] | None = None) -> None:
        self.stats: dict[str, list[float]] = {}
        self._handles = []
        undo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        fparams = _ReferenceParams(float_model, reference)
        recipe = q.record.get("recipe") or {}
        from llavaq.quant.state import group_input_smoothing

        #: a Linear -> Linear group's source -> (scale, shift) per output row its smoothed output carries
        smoothed_out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for g in arch.all_smooth_groups(recipe.get("modules", "msmodelslim"), bool(recipe.get("smooth_vo"))):
            if g.from_linear:
                raw = _pair_scale(g, fparams, q, undo)
                found = None if raw is None else group_input_smoothing(g, *raw)
                if raw is not None:
                    smoothed_out[g.norm] = raw
            else:
                found = _undo_norm(g, fparams, q)
            if found is not None:
                undo.update({lin: found for lin in g.linears})
        #: Linear -> (scale, shift) per input column that maps its smoothed input back to the float model's
        self.undo = undo
        for name, mod in qmodel.named_modules():
            if isinstance(mod, EmulatedW8A8Linear):
                flin = float_model.get_submodule(name)
                w, b = flin.weight, flin.bias
                if reference is not None:
                    w = fparams[name + ".weight"]
                    b = fparams[name + ".bias"] if b is not None else None
                self._handles.append(mod.register_forward_hook(
                    self._hook(name, mod, w, b, undo.get(name), smoothed_out.get(name))))

    def _hook(self, name, mod: EmulatedW8A8Linear, weight: torch.Tensor, bias: torch.Tensor | None, undo,
              smoothed_out=None):
        def hook(_m, args, out):
            x = args[0].detach().float()
            xf = x
            if undo is not None:
                s, z = undo
                xf = x * s + (z if z is not None else 0)
            ref = F.linear(xf, weight, bias)
            if smoothed_out is not None:  # the source of --smooth_vo writes (y − z)/s: compare like with like
                s_out, z_out = smoothed_out
                ref = (ref - (z_out if z_out is not None else 0)) / s_out
            st = self.stats.setdefault(name, [0.0, 0.0, 0, 0, 0])
            st[0] += float(((out.float() - ref) ** 2).sum())
            st[1] += float((ref**2).sum())
            st[2] += ref.numel()
            if mod.mode == "static":
                p = mod.params
                xq = quantize_input(x, p.input_scale, p.input_offset)
                st[3] += int(((xq == -128) | (xq == 127)).sum())
            st[4] += x.numel()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def result(self) -> list[LayerError]:
        out = []
        for name, (se, sr, n, clipped, nx) in self.stats.items():
            if n:
                out.append(LayerError(name, se / n, se / max(sr, 1e-30), clipped / max(nx, 1)))
        return out


class _ReferenceParams(Mapping):
    """The float model's parameters (float32) by name, or, with ``reference``, the tensors it gives (read once)."""

    def __init__(self, model: nn.Module, reference: Callable[[str], torch.Tensor] | None) -> None:
        self._params = dict(model.named_parameters())
        self._reference = reference
        self._read: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._reference is None:
            return self._params[name].detach().float()
        if name not in self._params:
            raise KeyError(name)
        if name not in self._read:
            self._read[name] = self._reference(name).float()
        return self._read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num/den`` where both are non-zero, else 1 (a channel that carries nothing is not smoothed)."""
    ok = (num != 0) & (den != 0)
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


def _undo_norm(g, fparams: dict[str, torch.Tensor], q: QuantizedCheckpoint):
    """(s, z) of a norm group from the float and the output's norm."""
    wq = q.float_tensors.get(g.norm + ".weight")
    if wq is None:
        return None
    s = _ratio(fparams[g.norm + ".weight"], wq.float())
    z = None
    if g.shift and g.norm + ".bias" in q.float_tensors:
        z = fparams[g.norm + ".bias"] - q.float_tensors[g.norm + ".bias"].float() * s
    return s, z


def _pair_scale(g, fparams: Mapping[str, torch.Tensor], q: QuantizedCheckpoint, undo: dict):
    """(s, z) per output row of a Linear → Linear group's source, from its float and saved weights.

    The destination's input columns take them through :func:`~llavaq.quant.state.group_input_smoothing`.
    """
    src = g.norm
    w = fparams[src + ".weight"]
    b = fparams.get(src + ".bias")
    if src in undo:  # the source's own input smoothing, as the export folded it (shift into the bias first)
        s_in, z_in = undo[src]
        if z_in is not None and b is not None:
            b = b + z_in @ w.T
        w = w * s_in
    if src in q.linears:
        lq = q.linears[src]
        s = _ratio(w.abs().amax(1), 127 * lq.weight_scale.float().reshape(-1))
        b_out = lq.bias
    elif src + ".weight" in q.float_tensors:
        s = _ratio(w.abs().amax(1), q.float_tensors[src + ".weight"].float().abs().amax(1))
        b_out = q.float_tensors.get(src + ".bias")
    else:
        return None
    z = b - b_out.float() * s if g.shift and b is not None and b_out is not None else None
    return s, z


def _text_positions(input_ids: torch.Tensor, image_token: int, image_tokens: int, seq_len: int) -> torch.Tensor:
    """Merged-sequence index of every input token: an ``<image>`` token expands to ``image_tokens``
    positions (the tower's patches, less the class token with the "default" feature strategy)."""
    ids = input_ids[0]
    n_img = int((ids == image_token).sum())
    width = torch.where(ids == image_token, torch.full_like(ids, image_tokens), torch.ones_like(ids))
    pos = torch.cumsum(width, 0) - 1
    if int(pos[-1]) + 1 != seq_len:
        raise LlavaqError(f"the model's output has {seq_len} positions, {n_img} image(s) of {image_tokens} "
                          f"tokens and {ids.numel() - n_img} text tokens make {int(pos[-1]) + 1}")
    return pos


@torch.no_grad()
def _prompt_result(fp: nn.Module, qm: nn.Module, processor, p: EvalPrompt, answer_tokens: int,
                   image: tuple[int, int], accs: list[_Acc], reference: dict | None = None) -> PromptResult:
    """One prompt: FP greedy answer, then FP and Q logits teacher-forced on prompt + answer.

    ``reference`` (optional, shared between calls on the same float model) memoises the float side:
    the answer and the FP logits at the text positions.
    """
    from llavaq.calib.images import load_image

    image_token, image_tokens = image
    tok = processor.tokenizer
    if p.image is not None:
        img = load_image(p.image)
        enc = processor(images=img, text=IMAGE_TEMPLATE.format(q=p.question), return_tensors="pt")
        pixel_values = enc["pixel_values"].float()
    else:
        enc = tok(TEXT_TEMPLATE.format(q=p.question), return_tensors="pt")
        pixel_values = None
    ids = enc["input_ids"]
    key = ("prompt", str(p.image), p.question, answer_tokens)
    if reference is not None and key in reference:
        answer, lf_tok = reference[key]
        full = torch.cat([ids, answer], 1)
    else:
        gen = fp.generate(input_ids=ids, pixel_values=pixel_values, attention_mask=enc["attention_mask"],
                          max_new_tokens=answer_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          bad_words_ids=[[image_token]])
        answer = gen[:, ids.shape[1]:]
        full = torch.cat([ids, answer], 1)
        lf = fp(input_ids=full, pixel_values=pixel_values, attention_mask=torch.ones_like(full)).logits[0]
        lf_tok = lf[_text_positions(full, image_token, image_tokens, lf.shape[0])]  # one row per input token
        if reference is not None:
            reference[key] = (answer, lf_tok)
    lq = qm(input_ids=full, pixel_values=pixel_values, attention_mask=torch.ones_like(full)).logits[0]
    lq_tok = lq[_text_positions(full, image_token, image_tokens, lq.shape[0])]
    a = answer.shape[1]
    ans = slice(ids.shape[1] - 1, full.shape[1] - 1)
    one = _Acc()
    for acc in [one, *accs]:
        acc.add(lf_tok[ans], lq_tok[ans])
    every = _Acc()
    every.add(lf_tok[:-1], lq_tok[:-1])
    t1, kl, cos = one.means()
    return PromptResult(p.question, p.image.name if p.image else None,
                        tok.decode(answer[0], skip_special_tokens=True), a, cos, t1, every.means()[0], kl, every.n)


def perplexity_windows(tokenizer, text: str, window: int = 256, max_tokens: int = 4096) -> list[torch.Tensor]:
    """The held-out text as ``verify`` scores it: the first ``max_tokens`` tokens in chunks of ``window − 1``,
    each after a BOS token (when the tokenizer has one); every token but the first of a window is predicted."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:max_tokens]
    bos = tokenizer.bos_token_id
    out = []
    for start in range(0, ids.numel(), window - 1):
        chunk = ids[start: start + window - 1]
        if chunk.numel() < 2:
            break
        out.append(torch.cat([torch.tensor([bos]), chunk]) if bos is not None else chunk)
    return out


@torch.no_grad()
def _perplexity(fp: nn.Module, qm: nn.Module, tokenizer, text: str, window: int, max_tokens: int,
                acc: _Acc, reference: dict | None = None) -> tuple[float, float, int, _Acc]:
    nll_f = nll_q = 0.0
    n = 0
    local = _Acc()
    for w in perplexity_windows(tokenizer, text, window, max_tokens):
        x = w.unsqueeze(0)
        key = ("text", tuple(x[0].tolist()))
        if reference is not None and key in reference:
            lf = reference[key]
        else:
            lf = fp(input_ids=x).logits[0, :-1].double()
            if reference is not None:
                reference[key] = lf
        lq = qm(input_ids=x).logits[0, :-1].double()
        tgt = x[0, 1:]
        nll_f += float(F.cross_entropy(lf, tgt, reduction="sum"))
        nll_q += float(F.cross_entropy(lq, tgt, reduction="sum"))
        n += tgt.numel()
        local.add(lf, lq)
        acc.add(lf, lq)
    if n == 0:
        raise LlavaqError("held-out text is too short for perplexity (needs at least 2 tokens)")
    return math.exp(nll_f / n), math.exp(nll_q / n), n, local


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
    float_model: nn.Module | None = None,
    float_reference: dict | None = None,
    layer_errors: bool = True,
    force: bool = False,
) -> FidelityReport:
    """Compare the float model with the quantized output as int8 kernels run it (see module docstring).

    ``mode="dynamic"`` replaces the saved static activation ranges with per-token dynamic int8
    quantization (same int8 weights): a reference for what static activations cost;
    ``mode="weight_only"`` keeps activations float: what the int8 weights alone cost.
    ``float_reference``: a dict shared between calls with the same ``float_model`` and evaluation inputs
    (e.g. comparing recipes); the float model's answers and logits are computed once and reused.
    ``layer_errors=False`` skips the per-Linear error hooks (``worst_layers`` stays empty): the model-level
    numbers are the same, in less time.
    """
    from llavaq.api import open_model
    from llavaq.calib.samples import load_processor
    from llavaq.safety import check_output_of_model

    t0 = time.perf_counter()
    arch = open_model(model_path)
    q = read_quantized_output(quantized_dir)
    check_output_of_model(model_path, arch.ckpt.fingerprint(), quantized_dir, q.record, force)  # (hostile)
    eval_prompts = load_eval_prompts(prompts, images)
    heldout = load_heldout_text(text)
    if not eval_prompts and heldout is None:
        raise LlavaqError("no evaluation inputs: pass --images/--prompts and/or --text "
                          "(the shipped held-out set is not installed)")
    processor = load_processor(model_path)
    fp = float_model if float_model is not None else load_float_model(model_path)
    qm = build_quantized_model(fp, q, mode=mode, absent=arch.is_absent)
    hooks = LayerErrorHooks(qm, fp, q, arch, reference=_rotated_reference(arch, q)) if layer_errors else None
    image = (arch.config.image_token_index, arch.image_tokens)
    acc, image_acc, textq_acc = _Acc(), _Acc(), _Acc()
    try:
        results = [_prompt_result(fp, qm, processor, p, answer_tokens, image,
                                  [acc, image_acc if p.image is not None else textq_acc], float_reference)
                   for p in eval_prompts]
        ppl_fp = ppl_q = None
        text_n = 0
        text_stats = None
        if heldout is not None:
            ppl_fp, ppl_q, text_n, text_stats = _perplexity(fp, qm, processor.tokenizer, heldout, ppl_window,
                                                           max_text_tokens, acc, float_reference)
    finally:
        if hooks is not None:
            hooks.remove()
    layers = sorted(hooks.result(), key=lambda e: e.rel_mse, reverse=True) if hooks is not None else []
    top1, kl, cos = acc.means()
    tt = text_stats.means() if text_stats is not None else (None, None, None)
    image_top1, image_kl = image_acc.top1_kl()
    textq_top1, textq_kl = textq_acc.top1_kl()
    return FidelityReport(
        model_path=str(model_path), quantized=str(quantized_dir), format=q.format, mode=mode, prompts=results,
        ppl_fp=ppl_fp, ppl_q=ppl_q, text_tokens=text_n, text_top1=tt[0], text_kl=tt[1], text_cosine=tt[2],
        top1=top1, kl=kl, cosine=cos, worst_layers=layers[:worst], quantized_linears=len(q.linears),
        seconds=time.perf_counter() - t0, range_drivers=_range_drivers_from_record(q.record),
        image_top1=image_top1, image_kl=image_kl, image_positions=image_acc.n,
        text_prompt_top1=textq_top1, text_prompt_kl=textq_kl, text_prompt_positions=textq_acc.n,
    )


def _rotated_reference(arch, q: QuantizedCheckpoint) -> Callable[[str], torch.Tensor] | None:
    """For an output made with ``--rotation``: the rotated float model's tensors (what it was quantized from).

    Its logits equal the original's, so the logits are compared with the original float model; only the
    per-Linear reference needs the rotated weights.
    """
    from llavaq.api import model_for_recipe
    from llavaq.recipe import QuantRecipe

    recipe = (q.record or {}).get("recipe") or {}
    if recipe.get("rotation", "none") == "none":
        return None
    try:
        rotated = model_for_recipe(arch, QuantRecipe.from_dict(recipe))
    except LlavaqError as e:
        raise OutputError(f"{q.path / 'llavaq_record.json'}: cannot rebuild its rotation ({e.message})") from None
    return rotated.ckpt.tensor


def _range_drivers_from_record(record: dict[str, Any]) -> dict[str, Any] | None:
    cache = record.get("cache")
    if not cache or not Path(cache).is_dir():
        return None
    try:
        from llavaq.calib.coverage import range_drivers

        return range_drivers(cache).to_dict()
    except (LlavaqError, ImportError, KeyError):
        return None


def check_thresholds(report: FidelityReport, max_ppl_increase: float | None, min_top1: float | None) -> list[str]:
    """The failed checks, as one-line messages.

    ``min_top1`` must hold for the held-out text *and* for the answers to image prompts, each (a recipe that
    buys text fidelity with image fidelity is not a pass); with neither scored, for the pooled top-1.
    """
    failed = []
    inc = report.ppl_increase
    if max_ppl_increase is not None:
        if inc is None:
            failed.append("--max_ppl_increase needs held-out text (--text)")
        elif inc > max_ppl_increase:
            failed.append(f"perplexity +{inc:.2f}% > {max_ppl_increase:g}%")
    if min_top1 is not None:
        parts = [(what, t1) for what, t1 in (("held-out text", report.text_top1),
                                             ("image-prompt answers", report.image_top1)) if t1 is not None]
        for what, t1 in parts or [("all scored positions", report.top1)]:
            if t1 < min_top1:
                failed.append(f"top-1 agreement on {what} {t1:.4f} < {min_top1:g}")
    return failed
