"""LLaVA-1.5 (llava-hf, transformers 4.37 naming) architecture: what is quantized, how layers are built.

Everything that depends on module names lives here: the quantized/float module sets, the smoothing
groups (norm -> linears) and the builders that materialise one layer at a time from a
:class:`~llavaq.model.checkpoint.Checkpoint` (so a 7B model is never fully in memory).
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from llavaq.errors import ModelError
from llavaq.model.checkpoint import Checkpoint

VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
LM = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"
EMBED = LM + "embed_tokens.weight"


#: Smoothing groups whose source is a Linear (``--smooth_vo``), not a norm.
PAIR_KINDS = ("clip_vo", "llama_vo", "llama_up_down")


@dataclass(frozen=True)
class SmoothGroup:
    """A module whose output feeds ``linears``: smoothing divides its output by s and multiplies the linears.

    The source is a norm (``clip_qkv``, ``clip_fc1``, ``llama_qkv``, ``llama_gate_up``: the norm's weight is
    divided) or a Linear (:data:`PAIR_KINDS`, ``--smooth_vo``: v_proj's output rows feed o_proj through the
    attention, up_proj's feed down_proj through ``silu(gate)·``; the source's rows are divided).
    """

    name: str  # e.g. "vision.3.attn", "text.7.mlp", "text.7.vo"
    kind: str  # clip_qkv | clip_fc1 | llama_qkv | llama_gate_up | clip_vo | llama_vo | llama_up_down
    norm: str  # module name of the source: the norm, or the source Linear of a pair group
    linears: tuple[str, ...]  # module names, in concatenation order
    shift: bool  # groups with biases also move a channel shift z (norm or source bias -> the linears' biases)
    #: (query heads, KV heads, head dim) when the linears read a GQA attention output: one scale per KV channel
    heads: tuple[int, int, int] | None = None

    @property
    def from_linear(self) -> bool:
        return self.kind in PAIR_KINDS


@dataclass(frozen=True)
class Stage:
    """One unit of layer-streamed work."""

    kind: str  # vision_layer | projector | text_layer
    index: int
    prefix: str

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.index}" if self.kind != "projector" else "projector"


class LlavaArch:
    """Module layout of a llava-hf LLaVA checkpoint, validated against its config."""

    def __init__(self, ckpt: Checkpoint, *, trust_remote_code: bool = False) -> None:
        self.ckpt = ckpt
        self.trust_remote_code = trust_remote_code
        self.config = self._load_config()
        self.vision_config = self.config.vision_config
        self.text_config = self.config.text_config
        # What transformers 4.37 picks when loading the full model (and msModelSlim runs with):
        # SDPA attention in the language model, eager attention in CLIP.
        self.text_config._attn_implementation = "sdpa"
        self.vision_config._attn_implementation = "eager"
        self.n_vision_layers = self.vision_config.num_hidden_layers
        self.n_text_layers = self.text_config.num_hidden_layers
        self.tied_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False)) and not ckpt.has(LM_HEAD)
        self._validate_tensors()

    # ------------------------------------------------------------------ config
    def _load_config(self):
        from transformers import LlavaConfig

        cfg = self.ckpt.config_dict
        cfg_path = self.ckpt.path / "config.json"
        archs = cfg.get("architectures") or []
        mt = cfg.get("model_type")
        if cfg.get("auto_map") and not self.trust_remote_code:
            raise ModelError(
                f"{cfg_path}: this model needs custom code (auto_map); llavaq only runs the built-in LLaVA "
                "code. Pass --trust_remote_code True only if you trust it (llavaq still requires a "
                "llava-hf LLaVA architecture)"
            )
        if mt != "llava":
            what = f"model_type {mt!r}" + (f" ({archs[0]})" if archs else "")
            raise ModelError(
                f"{cfg_path}: {what} is not a LLaVA checkpoint; llavaq quantizes llava-hf "
                "LlavaForConditionalGeneration models (e.g. llava-hf/llava-1.5-7b-hf)"
            )
        if archs and archs[0] != "LlavaForConditionalGeneration":
            raise ModelError(f"{cfg_path}: architecture {archs[0]} is not supported (LlavaForConditionalGeneration)")
        try:
            config = LlavaConfig.from_dict(dict(cfg))
        except Exception as e:  # transformers raises many kinds here
            raise ModelError(f"{cfg_path}: invalid LLaVA config ({e})") from None
        vt = getattr(config.vision_config, "model_type", None)
        tt = getattr(config.text_config, "model_type", None)
        if vt != "clip_vision_model":
            raise ModelError(f"{cfg_path}: vision tower {vt!r} is not supported (CLIP vision model only)")
        if tt not in ("llama",):
            raise ModelError(f"{cfg_path}: language model {tt!r} is not supported (Llama-family only)")
        if config.image_token_index >= config.text_config.vocab_size:
            raise ModelError(
                f"{cfg_path}: image_token_index {config.image_token_index} is outside the embedding table "
                f"(vocab_size {config.text_config.vocab_size})"
            )
        return config

    @cached_property
    def meta_model(self) -> nn.Module:
        """The full model on the meta device: names, shapes and module order, no memory."""
        from transformers import LlavaForConditionalGeneration

        with torch.device("meta"):
            model = LlavaForConditionalGeneration(self.config)
        return model

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.meta_model.named_parameters(remove_duplicate=False)}

    def _validate_tensors(self) -> None:
        expected = self.expected_shapes()
        path = self.ckpt.path
        for name, shape in expected.items():
            if name == LM_HEAD and self.tied_embeddings:
                continue
            if not self.ckpt.has(name):
                raise ModelError(f"{path}: tensor {name!r} is missing from the weights")
            got = self.ckpt.shape(name)
            if got != shape:
                raise ModelError(
                    f"{path}: tensor {name!r} has shape {list(got)} but the config needs {list(shape)}"
                )

    # ------------------------------------------------------------------ module sets
    @cached_property
    def linear_names(self) -> list[str]:
        return [n for n, m in self.meta_model.named_modules() if isinstance(m, nn.Linear)]

    def quantized_linears(self, preset: str = "msmodelslim", keep_float: Iterable[str] = ()) -> list[str]:
        """The W8A8 Linears in named_modules order (msModelSlim: all but down_proj, lm_head, last Linear),
        less the ``keep_float`` names (``--float_linears`` / ``--keep_float``)."""
        names = self.linear_names
        last = names[-1]
        skip = set(keep_float)
        out = []
        for n in names:
            if n == last or n == "language_model.lm_head" or n in skip:
                continue
            if n.endswith("mlp.down_proj") and preset != "with_down_proj":
                continue
            if preset == "language_only" and not n.startswith(LM):
                continue
            out.append(n)
        return out

    def smooth_groups(self, stage: Stage) -> list[SmoothGroup]:
        p = stage.prefix
        if stage.kind == "vision_layer":
            return [
                SmoothGroup(f"vision.{stage.index}.attn", "clip_qkv", p + "layer_norm1",
                            tuple(p + f"self_attn.{x}_proj" for x in "qkv"), True),
                SmoothGroup(f"vision.{stage.index}.mlp", "clip_fc1", p + "layer_norm2", (p + "mlp.fc1",), True),
            ]
        if stage.kind == "text_layer":
            return [
                SmoothGroup(f"text.{stage.index}.attn", "llama_qkv", p + "input_layernorm",
                            tuple(p + f"self_attn.{x}_proj" for x in "qkv"), False),
                SmoothGroup(f"text.{stage.index}.mlp", "llama_gate_up", p + "post_attention_layernorm",
                            (p + "mlp.gate_proj", p + "mlp.up_proj"), False),
            ]
        return []

    def pair_groups(self, stage: Stage, preset: str = "msmodelslim") -> list[SmoothGroup]:
        """Linear -> Linear smoothing groups of a stage (``--smooth_vo``) whose destination the preset quantizes:
        v_proj -> o_proj (CLIP out_proj; with a shift, as both have biases) and, when down_proj is quantized,
        up_proj -> down_proj."""
        p = stage.prefix
        quantized = set(self.quantized_linears(preset))
        out = []
        if stage.kind == "vision_layer":
            out.append(SmoothGroup(f"vision.{stage.index}.vo", "clip_vo", p + "self_attn.v_proj",
                                   (p + "self_attn.out_proj",), True))
        elif stage.kind == "text_layer":
            tc = self.text_config
            n_kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
            heads = (tc.num_attention_heads, n_kv, tc.hidden_size // tc.num_attention_heads) \
                if n_kv != tc.num_attention_heads else None
            out.append(SmoothGroup(f"text.{stage.index}.vo", "llama_vo", p + "self_attn.v_proj",
                                   (p + "self_attn.o_proj",), False, heads))
            out.append(SmoothGroup(f"text.{stage.index}.down", "llama_up_down", p + "mlp.up_proj",
                                   (p + "mlp.down_proj",), False))
        return [g for g in out if all(n in quantized for n in g.linears)]

    def smoothing_groups(self, stage: Stage, preset: str = "msmodelslim", smooth_vo: bool = False
                         ) -> list[SmoothGroup]:
        """Every group a recipe smooths in ``stage``: the norm groups, plus the pair groups with ``smooth_vo``."""
        return self.smooth_groups(stage) + (self.pair_groups(stage, preset) if smooth_vo else [])

    def shared_inputs(self, stage: Stage) -> dict[str, str]:
        """Each Linear of ``stage`` -> the Linear whose input it reads (the first of its smoothing group, else
        itself): Linears that share an input share its statistics (activation rows, input moments)."""
        key = {n: n for n in self.linear_names if n.startswith(stage.prefix)}
        for g in self.smooth_groups(stage):
            key.update({n: g.linears[0] for n in g.linears})
        return key

    def stages(self) -> list[Stage]:
        out = [Stage("vision_layer", i, f"{VISION}encoder.layers.{i}.") for i in range(self.n_vision_layers)]
        out.append(Stage("projector", 0, PROJECTOR))
        out += [Stage("text_layer", i, f"{LM}layers.{i}.") for i in range(self.n_text_layers)]
        return out

    def all_smooth_groups(self, preset: str = "msmodelslim", smooth_vo: bool = False) -> list[SmoothGroup]:
        return [g for s in self.stages() for g in self.smoothing_groups(s, preset, smooth_vo)]

    def stage_of(self, module_name: str) -> Stage:
        for s in self.stages():
            if module_name.startswith(s.prefix):
                return s
        raise KeyError(module_name)

    # ------------------------------------------------------------------ builders
    def _materialise(self, module: nn.Module, prefix: str, dtype: torch.dtype = torch.float32) -> nn.Module:
        sd = {}
        for name in module.state_dict():
            full = prefix + name
            if full == LM_HEAD and self.tied_embeddings:
                full = EMBED
            sd[name] = self.ckpt.tensor(full, dtype)
        module.load_state_dict(sd, assign=True, strict=True)
        return module.eval()

    def build_vision_layer(self, i: int) -> nn.Module:
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        with torch.device("meta"):
            layer = CLIPEncoderLayer(self.vision_config)
        return self._materialise(layer, f"{VISION}encoder.layers.{i}.")

    def build_text_layer(self, i: int) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.text_config, layer_idx=i)
        layer = self._materialise(layer, f"{LM}layers.{i}.")
        layer.self_attn._init_rope()  # non-persistent RoPE buffers are rebuilt on the CPU
        return layer

    def build_projector(self) -> nn.Module:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        with torch.device("meta"):
            proj = LlavaMultiModalProjector(self.config)
        return self._materialise(proj, PROJECTOR)

    def build_vision_embeddings(self) -> nn.Module:
        """CLIP patch/class/position embeddings followed by ``pre_layrnorm`` (as CLIPVisionTransformer)."""
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

        with torch.device("meta"):
            emb = CLIPVisionEmbeddings(self.vision_config)
            pre = nn.LayerNorm(self.vision_config.hidden_size, eps=self.vision_config.layer_norm_eps)
        self._materialise(emb, VISION + "embeddings.")
        emb.register_buffer(
            "position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False
        )
        self._materialise(pre, VISION + "pre_layrnorm.")
        return nn.Sequential(emb, pre)

    def build_token_embedding(self) -> nn.Embedding:
        w = self.ckpt.tensor(EMBED)
        return nn.Embedding.from_pretrained(w, freeze=True, padding_idx=None)

    def build_final_norm(self) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        with torch.device("meta"):
            norm = LlamaRMSNorm(self.text_config.hidden_size, eps=self.text_config.rms_norm_eps)
        return self._materialise(norm, LM + "norm.")

    def lm_head_weight(self) -> torch.Tensor:
        return self.ckpt.tensor(EMBED if self.tied_embeddings else LM_HEAD)

    # ------------------------------------------------------------------ glue (as LlavaForConditionalGeneration)
    def merge_image_features(self, image_features, inputs_embeds, input_ids, attention_mask):
        """transformers 4.37 ``_merge_input_ids_with_image_features`` on a stand-in ``self``."""
        from transformers import LlavaForConditionalGeneration

        pad = self.config.pad_token_id if self.config.pad_token_id is not None else -1
        stand_in = types.SimpleNamespace(pad_token_id=pad, config=self.config)
        embeds, mask, _, pos = LlavaForConditionalGeneration._merge_input_ids_with_image_features(
            stand_in, image_features, inputs_embeds, input_ids, attention_mask, None
        )
        return embeds, mask, pos

    def select_image_features(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        feat = hidden_states[self.config.vision_feature_layer]
        strategy = self.config.vision_feature_select_strategy
        if strategy == "default":
            return feat[:, 1:]
        if strategy == "full":
            return feat
        raise ModelError(f"unsupported vision_feature_select_strategy {strategy!r}")

    def causal_mask(self, attention_mask: torch.Tensor, embeds: torch.Tensor):
        """The 4D mask LlamaModel (SDPA) builds; None when every token is attended (is_causal path)."""
        from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask_for_sdpa

        b, n = embeds.shape[:2]
        return _prepare_4d_causal_attention_mask_for_sdpa(attention_mask, (b, n), embeds, 0)

    # ------------------------------------------------------------------ export order
    #: msModelSlim's m2 wrapper (``LlavaClipVision``) re-registers a CLIP layer's children in this order,
    #: which is the order its saver walks them in (HF's is self_attn, layer_norm1, mlp, layer_norm2).
    M2_CLIP_CHILD_ORDER = ("layer_norm1", "layer_norm2", "self_attn", "mlp")

    def parameter_order(self, m2_wrapped: bool = False) -> list[tuple[str, str, list[str]]]:
        """(module name, class name, own parameter names) in the order msModelSlim saves them.

        That is ``named_modules`` order of the model it saved: with ``m2_wrapped`` the CLIP encoder layers
        are in the order of msModelSlim's anti-outlier wrappers (the Llama wrapper keeps HF's order).
        """
        out = []
        for name, mod in self.meta_model.named_modules(remove_duplicate=False):
            params = [p for p, _ in mod.named_parameters(recurse=False, remove_duplicate=False)]
            if params:
                out.append((name, type(mod).__name__, params))
        if not m2_wrapped:
            return out
        prefix = f"{VISION}encoder.layers."

        def key(item: tuple[int, tuple[str, str, list[str]]]):
            idx, (name, _, _) = item
            if not name.startswith(prefix):
                return (idx, 0, 0)
            layer, _, rest = name[len(prefix):].partition(".")
            first = first_index.setdefault(prefix + layer, idx)
            child = rest.split(".")[0]
            return (first, self.M2_CLIP_CHILD_ORDER.index(child), idx)

        first_index: dict[str, int] = {}
        return [item for _, item in sorted(enumerate(out), key=key)]
