"""The rotated model as a weight source: a checkpoint view that returns rotated tensors by name.

``RotatedCheckpoint`` wraps a :class:`~llavaq.model.checkpoint.Checkpoint` and answers the same questions
(names, shapes, ``tensor(name)``), but the language model's tensors come back with the rotation folded in
(:mod:`llavaq.algorithms.rotation`): norms folded into the Linears that read them and set to 1, the residual
stream rotated by Q (embeddings, q/k/v/gate/up inputs, o/down/projector ``linear_2`` outputs, ``lm_head``), and
the per-head R2 between ``v_proj`` and ``o_proj``. Everything that reads weights through the checkpoint —
the calibration engine's layer builders, the export's per-layer re-reads — therefore sees the rotated model,
one tensor at a time: rotating a tensor needs that tensor, at most one norm weight and Q.

The CLIP tower and the projector's ``linear_1`` are not rotated: LayerNorm subtracts the channel mean, which
does not commute with Q, and CLIP's ``pre_layrnorm`` writes its residual stream with an affine map whose
output mean could only be removed by a full matrix, not folded into the LayerNorm weights.

Tied input/output embeddings come back untied: ``lm_head`` = ``E·diag(γ_final)·Q`` but the embedding is
``E·Q``; the view's config says ``tie_word_embeddings: false`` (what the writers copy into config.json). The
view keeps the original checkpoint's fingerprint (the session cache is keyed by the model it was made from;
the rotation is a recipe field).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from llavaq.algorithms.rotation import (
    Rotation,
    fold_norm,
    make_rotation,
    rotate_head_inputs,
    rotate_head_outputs,
    rotate_input,
    rotate_output,
    rotate_vector,
)
from llavaq.errors import ModelError
from llavaq.model.checkpoint import Checkpoint
from llavaq.model.llava import EMBED, LM, LM_HEAD, PROJECTOR, LlavaArch

#: rows of an input-side-rotated tensor rotated at a time (float64 working memory: ROWS x hidden x 8 bytes)
ROWS = 4096


@dataclass(frozen=True)
class DecoderLayerNames:
    """Module names of one decoder layer, by role."""

    input_norm: str
    post_norm: str
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class RotationLayout:
    """Where the residual stream is read and written: every name the rotation touches, and the head counts."""

    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    embed: str  # tensor name
    final_norm: str  # module name
    lm_head: str  # module name
    tied: bool  # the checkpoint has no lm_head: it is the embedding
    projector_out: str  # module name of the Linear writing image features into the stream
    layers: tuple[DecoderLayerNames, ...]

    @classmethod
    def from_arch(cls, arch: LlavaArch) -> RotationLayout:
        tc = arch.text_config
        heads = tc.num_attention_heads
        layers = tuple(
            DecoderLayerNames(
                input_norm=p + "input_layernorm", post_norm=p + "post_attention_layernorm",
                q=p + "self_attn.q_proj", k=p + "self_attn.k_proj", v=p + "self_attn.v_proj", o=p + "self_attn.o_proj",
                gate=p + "mlp.gate_proj", up=p + "mlp.up_proj", down=p + "mlp.down_proj",
            )
            for p in (f"{LM}layers.{i}." for i in range(arch.n_text_layers))
        )
        return cls(hidden=tc.hidden_size, n_heads=heads,
                   n_kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
                   head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // heads,
                   embed=EMBED, final_norm=LM + "norm", lm_head=LM_HEAD.removesuffix(".weight"),
                   tied=arch.tied_embeddings, projector_out=PROJECTOR + "linear_2", layers=layers)


@dataclass(frozen=True)
class _Rule:
    """How one tensor of the rotated model is computed from the original checkpoint."""

    op: str  # ones | in (row-wise: see RotatedCheckpoint.tensor) | in_v | v_bias | o | out | out_bias
    source: str  # original tensor name
    norm: str | None = None  # norm weight folded in (input side)


class RotatedCheckpoint:
    """A :class:`Checkpoint` view of the rotated model (same names, shapes and fingerprint as the original)."""

    def __init__(self, inner: Checkpoint, layout: RotationLayout, seed: int) -> None:
        heads, kv, hd = layout.n_heads, layout.n_kv_heads, layout.head_dim
        ly = layout.layers[0] if layout.layers else None
        shapes = (inner.shape(ly.v + ".weight"), inner.shape(ly.o + ".weight")) if ly is not None else None
        if heads % kv or (shapes is not None and shapes != ((kv * hd, layout.hidden), (layout.hidden, heads * hd))):
            raise ModelError(f"{inner.path / 'config.json'}: {heads} heads and {kv} KV heads of size {hd} do not "
                             f"match v_proj/o_proj {shapes}: cannot rotate per head")
        self.inner = inner
        self.layout = layout
        self.seed = seed
        self.residual: Rotation = make_rotation(layout.hidden, seed, "residual")
        self.head: Rotation = make_rotation(layout.head_dim, seed, "head")
        self.rules = self._rules()

    def _rules(self) -> dict[str, _Rule]:
        lay = self.layout
        final = lay.final_norm + ".weight"
        rules = {
            lay.embed: _Rule("in", lay.embed),
            final: _Rule("ones", final),
            lay.lm_head + ".weight": _Rule("in", lay.embed if lay.tied else lay.lm_head + ".weight", final),
            lay.projector_out + ".weight": _Rule("out", lay.projector_out + ".weight"),
            lay.projector_out + ".bias": _Rule("out_bias", lay.projector_out + ".bias"),
        }
        for ly in lay.layers:
            rules[ly.input_norm + ".weight"] = _Rule("ones", ly.input_norm + ".weight")
            rules[ly.post_norm + ".weight"] = _Rule("ones", ly.post_norm + ".weight")
            for m in (ly.q, ly.k):
                rules[m + ".weight"] = _Rule("in", m + ".weight", ly.input_norm + ".weight")
            rules[ly.v + ".weight"] = _Rule("in_v", ly.v + ".weight", ly.input_norm + ".weight")
            rules[ly.v + ".bias"] = _Rule("v_bias", ly.v + ".bias")
            rules[ly.o + ".weight"] = _Rule("o", ly.o + ".weight")
            rules[ly.o + ".bias"] = _Rule("out_bias", ly.o + ".bias")
            for m in (ly.gate, ly.up):
                rules[m + ".weight"] = _Rule("in", m + ".weight", ly.post_norm + ".weight")
            rules[ly.down + ".weight"] = _Rule("out", ly.down + ".weight")
            rules[ly.down + ".bias"] = _Rule("out_bias", ly.down + ".bias")
        # q/k/gate/up biases (Qwen2 q/k/v) read the stream on their input side only: unchanged
        return {n: r for n, r in rules.items() if self.inner.has(r.source)}

    # ------------------------------------------------------------------ the Checkpoint interface
    @property
    def path(self) -> Path:
        return self.inner.path

    @cached_property
    def config_dict(self) -> dict:
        """The original config, with tied embeddings untied (the rotated lm_head differs from the embedding)."""
        cfg = copy.deepcopy(self.inner.config_dict)
        if self.layout.tied:
            cfg["tie_word_embeddings"] = False
            if isinstance(cfg.get("text_config"), dict):
                cfg["text_config"]["tie_word_embeddings"] = False
        return cfg

    @property
    def names(self) -> list[str]:
        extra = [self.layout.lm_head + ".weight"] if self.layout.tied else []
        return self.inner.names + extra

    def has(self, name: str) -> bool:
        return self.inner.has(name) or (self.layout.tied and name == self.layout.lm_head + ".weight")

    def _source(self, name: str) -> str:
        rule = self.rules.get(name)
        return rule.source if rule is not None else name

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(self._source(name))

    def dtype_of(self, name: str) -> torch.dtype:
        return self.inner.dtype_of(self._source(name))

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.inner.torch_dtype

    @property
    def total_bytes(self) -> int:
        return self.inner.total_bytes

    def fingerprint(self) -> dict[str, str]:
        return self.inner.fingerprint()

    def close(self) -> None:
        self.inner.close()

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        rule = self.rules.get(name)
        if rule is None:
            return self.inner.tensor(name, dtype)
        out_dtype = dtype or self.inner.dtype_of(rule.source)
        if rule.op != "in":
            return self._rotated(rule).to(out_dtype)
        # row by row: a large table (embeddings, lm_head: 32000 x 4096 for 7B) is rotated ROWS rows at a time in
        # float64 instead of all at once
        w = self.inner.tensor(rule.source, None)
        gamma = self.inner.tensor(rule.norm, torch.float64) if rule.norm is not None else None
        out = torch.empty(w.shape, dtype=out_dtype)
        for i in range(0, w.shape[0], ROWS):
            block = w[i:i + ROWS].to(torch.float64)
            out[i:i + ROWS] = rotate_input(block if gamma is None else fold_norm(block, gamma), self.residual)
        return out

    def tensors(self, prefix: str, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self.tensor(n, dtype) for n in self.names if n.startswith(prefix)}

    def iter_tensors(self, names: Iterable[str], dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        for n in names:
            yield self.tensor(n, dtype)

    # ------------------------------------------------------------------ the rotation, tensor by tensor
    def _rotated(self, rule: _Rule) -> torch.Tensor:
        """The rotated tensor in float64."""
        q, r2, lay = self.residual, self.head, self.layout
        if rule.op == "ones":
            return torch.ones(self.inner.shape(rule.source), dtype=torch.float64)
        w = self.inner.tensor(rule.source, torch.float64)
        if rule.norm is not None:
            w = fold_norm(w, self.inner.tensor(rule.norm, torch.float64))
        if rule.op == "in_v":
            return rotate_head_outputs(rotate_input(w, q), r2, lay.n_kv_heads)
        if rule.op == "v_bias":
            return rotate_head_outputs(w, r2, lay.n_kv_heads)
        if rule.op == "o":
            return rotate_output(rotate_head_inputs(w, r2, lay.n_heads), q)
        if rule.op == "out":
            return rotate_output(w, q)
        if rule.op == "out_bias":
            return rotate_vector(w, q)
        raise AssertionError(rule.op)

    def describe(self) -> dict[str, object]:
        """What ``llavaq_record.json`` says about the rotation."""
        return {
            "method": "hadamard",
            "seed": self.seed,
            "residual": self.residual.describe(),
            "head": self.head.describe(),
            "rotated": "language model: residual stream (embeddings, q/k/v/gate/up inputs with the RMSNorm weights "
                       "folded in, o_proj/down_proj/multi_modal_projector.linear_2 outputs, lm_head) and per head "
                       "between v_proj and o_proj",
            "not_rotated": "CLIP vision tower and multi_modal_projector.linear_1 (LayerNorm mean subtraction does "
                           "not commute with a rotation)",
            "untied_embeddings": self.layout.tied,
        }


def rotated_arch(arch: LlavaArch, seed: int) -> LlavaArch:
    """The same model with the rotation folded into its weights (a new :class:`LlavaArch` over the view)."""
    view = RotatedCheckpoint(arch.ckpt, RotationLayout.from_arch(arch), seed)
    return LlavaArch(view, trust_remote_code=arch.trust_remote_code)  # type: ignore[arg-type]
