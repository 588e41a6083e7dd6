"""What llavaq needs to know about one layer family of a LLaVA (a language model or a vision tower).

A family is a *description*, not code paths: the module roles of its pre-norm transformer layer
(which Linear is q, k, v, o, which are the MLP's input and output Linears, which norm feeds which),
its norm type and biases, how transformers 4.37.2 builds and calls the layer, and what msModelSlim
26.1.0 does with it. The calibration engine, the export stream, the formats, ``verify`` and
``inspect`` ask these descriptions instead of assuming Llama + CLIP; a new family is one new
description registered in :mod:`llavaq.model.families`.

Every family here is a pre-norm transformer layer::

    h = h + o(attention(q, k, v of attn_norm(h)))      # attention block
    h = h + down(mlp_act(gate, up of mlp_norm(h)))     # MLP block (ViTs: fc2(act(fc1(...))))

so the smoothing groups (norm → the Linears it feeds), the m2 blocks and the linear→linear pairs
other recipes may add (v → o per KV head, up → down) all follow from the roles.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: The norm types. ``layer`` norms have a bias, so smoothing can also move a per-channel shift z into
#: it (and into the fed Linears' biases); ``rms`` norms have none, so they take the scale s only.
NORM_TYPES = ("rms", "layer")


def import_class(path: str) -> type:
    """``"package.module:Class"`` → the class (transformers is imported only when a layer is built)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class LayerRoles:
    """Module names, relative to one layer, by role. ``gate`` is None for a plain (non-gated) MLP, where
    ``up`` is the MLP's input Linear (``fc1``) and ``down`` its output Linear (``fc2``)."""

    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp: str = "mlp"
    gate: str | None = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"

    @property
    def fc1(self) -> str:
        return self.up

    @property
    def fc2(self) -> str:
        return self.down

    @property
    def qkv(self) -> tuple[str, str, str]:
        return self.q, self.k, self.v

    @property
    def mlp_in(self) -> tuple[str, ...]:
        """The Linears the MLP norm feeds, in concatenation order (gate before up)."""
        return (self.up,) if self.gate is None else (self.gate, self.up)

    def linears(self) -> tuple[str, ...]:
        return (*self.qkv, self.o, *self.mlp_in, self.down)


@dataclass(frozen=True)
class Heads:
    """Attention geometry of a layer (GQA when ``kv_heads < heads``)."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class LayerFamily:
    """A pre-norm transformer layer family (shared by language models and vision towers).

    ``qkv_kind`` / ``mlp_kind`` name the m2 block the calibration engine builds for the two smoothing
    groups (:mod:`llavaq.algorithms.blocks`): ``llama_qkv`` (RoPE, GQA, causal mask, optional biases),
    ``clip_qkv`` (biases, no mask), ``llama_gate_up`` (act(gate)·up), ``clip_fc1`` (GELU(fc1)).
    """

    model_type: str  # the config's model_type (text_config / vision_config)
    name: str  # for messages and the README table
    layer_class: str  # "module:Class" of the transformers 4.37.2 layer
    roles: LayerRoles
    norm: str  # "rms" | "layer"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qkv_kind: str
    mlp_kind: str
    #: msModelSlim 26.1.0's multimodal m2 wraps the layer by class name (``LlamaDecoderLayer``,
    #: ``CLIPEncoderLayer``); on any other class its m2 smooths nothing and the layer runs as is.
    msmodelslim_m2: bool
    #: with m2, msModelSlim's wrapper re-registers the layer's children in this order, which is the
    #: order its saver walks them in (None: transformers' order)
    m2_child_order: tuple[str, ...] | None = None
    #: "module:Class" of the family's norm (used for the language model's final norm)
    norm_class: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.norm not in NORM_TYPES:
            raise ValueError(f"{self.name}: norm must be one of {NORM_TYPES}")

    @property
    def shift(self) -> bool:
        """Smoothing also moves a channel shift z (only a norm with a bias can absorb −z)."""
        return self.norm == "layer"

    def heads(self, config: Any) -> Heads:
        h = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or h
        return Heads(h, kv, config.hidden_size // h)

    def layer_cls(self) -> type:
        return import_class(self.layer_class)


@dataclass(frozen=True)
class DecoderFamily(LayerFamily):
    """A causal language model (``language_model.*`` of a LLaVA): decoder layers + embeddings, final norm,
    lm_head, RoPE positions and the 4-D attention mask its model builds."""

    #: names relative to ``language_model.``
    layers: str = "model.layers."
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    #: text_config fields transformers 4.37.2 accepts but ignores for this family, harmlessly: (field, why)
    inert_fields: tuple[tuple[str, str], ...] = ()
    #: text_config fields transformers 4.37.2 ignores for this family although they change the model (a
    #: config that sets one is refused, naming it)
    unsupported_fields: tuple[str, ...] = ()

    def build_layer(self, config: Any, index: int) -> nn.Module:
        """The decoder layer on the meta device (weights are assigned by the caller)."""
        with torch.device("meta"):
            return self.layer_cls()(config, layer_idx=index)

    def build_final_norm(self, config: Any) -> nn.Module:
        with torch.device("meta"):
            return import_class(self.norm_class)(config.hidden_size, eps=config.rms_norm_eps)

    @staticmethod
    def rebuild_rope(layer: nn.Module, roles: LayerRoles) -> None:
        """Rebuild the attention's non-persistent RoPE buffers on the CPU (they were made on meta)."""
        attn = layer.get_submodule(roles.attn)
        if hasattr(attn, "_init_rope"):  # Llama: also the rope_scaling variants
            attn._init_rope()
            return
        rot = attn.rotary_emb
        attn.rotary_emb = type(rot)(rot.dim, max_position_embeddings=rot.max_position_embeddings, base=rot.base)

    @staticmethod
    def attention_mask(mask2d: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor | None:
        """The 4-D mask the model hands its layers: transformers 4.37.2's SDPA mask, which is what
        ``LlavaForConditionalGeneration`` runs its language model with (Llama, Mistral and Qwen2 all
        support SDPA). None when every token is attended (the kernel's ``is_causal`` path).

        Mistral's and Qwen2's ``sliding_window`` is applied by 4.37.2 only in the eager and flash
        masks, not in this one, so the float model llavaq rebuilds attends to the whole prefix, exactly
        as transformers does (checked by the tests with sequences longer than the window).
        """
        from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask_for_sdpa

        b, n = embeds.shape[:2]
        return _prepare_4d_causal_attention_mask_for_sdpa(mask2d, (b, n), embeds, 0)

    @staticmethod
    def call_layer(layer: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        return layer(h, attention_mask=mask, position_ids=positions)[0]

    @staticmethod
    def call_attention(attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor):
        return attn(hidden_states=x, attention_mask=mask, position_ids=positions)[0]


@dataclass(frozen=True)
class EncoderFamily(LayerFamily):
    """A ViT vision tower (``vision_tower.vision_model.*``): patch embeddings, encoder layers, and what the
    tower's forward runs after the encoder."""

    embeddings_class: str = ""
    #: LayerNorm between the embeddings and the first layer (CLIP's ``pre_layrnorm``), or None
    pre_norm: str | None = None
    #: a class token is prepended to the patches (CLIP); "default" feature selection drops position 0
    class_token: bool = False
    #: post-encoder modules the tower's forward runs whose Linears msModelSlim calibrates although
    #: LLaVA uses only ``hidden_states[vision_feature_layer]``: (norm, head) names under the tower, or None
    post_head: tuple[str, str] | None = None
    head_class: str = ""
    #: Linears (names relative to the tower) that are never *called* as modules: their weight is read by
    #: another module's forward, so no activation reaches them and they stay float
    uncalled_linears: tuple[str, ...] = ()
    #: positional arguments after the hidden states in the layer call (attention masks: None)
    layer_args: tuple[Any, ...] = (None,)
    attn_kwargs: dict[str, Any] = field(default_factory=dict)
    layers: str = "encoder.layers."

    def build_layer(self, config: Any, index: int) -> nn.Module:
        del index
        with torch.device("meta"):
            return self.layer_cls()(config)

    def call_layer(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer(h, *self.layer_args)[0]

    def call_attention(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return attn(hidden_states=x, attention_mask=None, **self.attn_kwargs)[0]

    def positions(self, config: Any) -> int:
        """Hidden-state positions per image: the patches, plus the class token if any."""
        return (config.image_size // config.patch_size) ** 2 + (1 if self.class_token else 0)
