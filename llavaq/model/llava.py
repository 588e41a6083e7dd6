"""A llava-hf LLaVA (transformers 4.37 naming): what is quantized, how its layers are built, in what order.

The language model and the vision tower are described by their families
(:mod:`llavaq.model.families`: Llama, Mistral, Qwen2; CLIP, SigLIP), picked from the config's
``model_type``. From those descriptions this module derives everything that depends on module
names: the quantized/float module sets, the smoothing groups (norm → Linears), the stages of the
layer-streamed work and the builders that materialise one stage at a time from a
:class:`~llavaq.model.checkpoint.Checkpoint` (so a 7B model is never fully in memory), the glue
``LlavaForConditionalGeneration`` runs between them, and msModelSlim's save order.
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
from llavaq.model.families import TEXT_FAMILIES, VISION_FAMILIES, DecoderFamily, EncoderFamily, LayerFamily
from llavaq.model.families.base import import_class

VISION = "vision_tower.vision_model."
PROJECTOR = "multi_modal_projector."
LANGUAGE = "language_model."
LM = LANGUAGE + "model."
LM_HEAD = "language_model.lm_head.weight"
EMBED = LM + "embed_tokens.weight"
FEATURE_STRATEGIES = ("default", "full")


#: Smoothing groups whose source is a Linear (``--smooth_vo``), not a norm.
PAIR_KINDS = ("clip_vo", "llama_vo", "llama_up_down")


@dataclass(frozen=True)
class SmoothGroup:
    """A module whose output feeds ``linears``: smoothing divides its output by s and multiplies the linears.

    The source is a norm (``clip_qkv``, ``clip_fc1``, ``llama_qkv``, ``llama_gate_up``: the norm's weight is
    divided) or a Linear (:data:`PAIR_KINDS`, ``--smooth_vo``: v_proj's output rows feed o_proj through the
    attention, up_proj's feed down_proj through ``silu(gate)·``; the source's rows are divided). The kind
    also names the m2 block of a norm group.
    """

    name: str  # e.g. "vision.3.attn", "text.7.mlp", "text.7.vo"
    kind: str  # clip_qkv | clip_fc1 | llama_qkv | llama_gate_up | clip_vo | llama_vo | llama_up_down
    norm: str  # module name of the source: the norm, or the source Linear of a pair group
    linears: tuple[str, ...]  # module names, in concatenation order
    shift: bool  # groups with biases also move a channel shift z (norm or source bias -> the linears' biases)
    #: (query heads, KV heads, head dim) when the linears read a GQA attention output: one scale per KV channel
    heads: tuple[int, int, int] | None = None
    #: msModelSlim's m2 smooths this group (its multimodal flow wraps the layer's class)
    m2: bool = True

    @property
    def from_linear(self) -> bool:
        return self.kind in PAIR_KINDS


@dataclass(frozen=True)
class Stage:
    """One unit of layer-streamed work: the modules under ``prefix`` (only the sub-modules ``parts`` if given)."""

    kind: str  # vision_layer | vision_head | projector | text_layer
    index: int
    prefix: str
    parts: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.index}" if self.kind in ("vision_layer", "text_layer") else self.kind

    def owns(self, module: str) -> bool:
        """Whether the module (or parameter) ``module`` belongs to this stage."""
        if not module.startswith(self.prefix):
            return False
        rel = module[len(self.prefix):]
        return not self.parts or any(rel == p or rel.startswith(p + ".") for p in self.parts)

    @property
    def tensor_prefixes(self) -> list[str]:
        return [self.prefix + p + "." for p in self.parts] or [self.prefix]


class _PostEncoder(nn.Module):
    """What a vision tower runs after its encoder (SigLIP: ``post_layernorm`` then the pooling ``head``)."""

    def __init__(self, names: tuple[str, str], norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self._names = names
        self.add_module(names[0], norm)
        self.add_module(names[1], head)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._names[1])(getattr(self, self._names[0])(h))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class LlavaArch:
    """Module layout of a llava-hf LLaVA checkpoint, validated against its config."""

    def __init__(self, ckpt: Checkpoint, *, trust_remote_code: bool = False) -> None:
        self.ckpt = ckpt
        self.trust_remote_code = trust_remote_code
        self.config = self._load_config()
        self.vision_config = self.config.vision_config
        self.text_config = self.config.text_config
        self.text: DecoderFamily = TEXT_FAMILIES[self.text_config.model_type]
        self.vision: EncoderFamily = VISION_FAMILIES[self.vision_config.model_type]
        # What transformers 4.37 picks when loading the full model (and msModelSlim runs with):
        # SDPA attention in the language model (all three families support it), eager in the tower.
        self.text_config._attn_implementation = "sdpa"
        self.vision_config._attn_implementation = "eager"
        self.n_vision_layers = self.vision_config.num_hidden_layers
        self.n_text_layers = self.text_config.num_hidden_layers
        self.tied_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False)) and not ckpt.has(LM_HEAD)
        self.absent_prefixes = self._absent_prefixes()
        self._validate_tensors()

    # ------------------------------------------------------------------ config
    def _load_config(self):
        import transformers
        from transformers import CONFIG_MAPPING, LlavaConfig

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
        tf = f"transformers {transformers.__version__}"
        for key, table, default in (("text_config", TEXT_FAMILIES, "llama"),
                                    ("vision_config", VISION_FAMILIES, "clip_vision_model")):
            sub = cfg.get(key)
            if sub is None:
                continue
            if not isinstance(sub, dict):
                raise ModelError(f"{cfg_path}: {key} must be a JSON object")
            sub_type = sub.get("model_type", default)
            if sub_type not in CONFIG_MAPPING:
                raise ModelError(f"{cfg_path}: {key}.model_type {sub_type!r} is not known to {tf}, which llavaq "
                                 f"runs LLaVA with (supported: {', '.join(table)})")
            if sub_type not in table:
                raise ModelError(f"{cfg_path}: {key}.model_type {sub_type!r} is not supported "
                                 f"(supported: {', '.join(table)})")
            try:
                CONFIG_MAPPING[sub_type](**dict(sub))
            except Exception as e:  # transformers raises many kinds here; its messages name the field
                raise ModelError(f"{cfg_path}: {key} ({sub_type}) cannot be built by {tf}: {_first_line(e)}") from None
        try:
            config = LlavaConfig.from_dict({k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()})
        except Exception as e:
            raise ModelError(f"{cfg_path}: invalid LLaVA config ({_first_line(e)})") from None
        self._check_fields(config, cfg_path, tf)
        return config

    @staticmethod
    def _check_fields(config, cfg_path, tf: str) -> None:
        """Fields transformers 4.37.2 accepts in the config but cannot run: one line naming the field."""
        tc, vc = config.text_config, config.vision_config
        strategy = config.vision_feature_select_strategy
        if strategy not in FEATURE_STRATEGIES:
            raise ModelError(f"{cfg_path}: vision_feature_select_strategy {strategy!r} is not supported by {tf}'s "
                             f"LLaVA ({', '.join(FEATURE_STRATEGIES)})")
        layer, n = config.vision_feature_layer, vc.num_hidden_layers
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ModelError(f"{cfg_path}: vision_feature_layer {layer!r} must be one integer for {tf}'s LLaVA")
        if not -(n + 1) <= layer <= n:
            raise ModelError(f"{cfg_path}: vision_feature_layer {layer} is outside the vision tower's hidden states "
                             f"({-(n + 1)}..{n} for {n} layers)")
        if config.image_token_index >= tc.vocab_size:
            raise ModelError(
                f"{cfg_path}: image_token_index {config.image_token_index} is outside the embedding table "
                f"(vocab_size {tc.vocab_size})"
            )
        for sub, name in ((tc, "text_config"), (vc, "vision_config")):
            if sub.hidden_size % sub.num_attention_heads:
                raise ModelError(f"{cfg_path}: {name}.hidden_size {sub.hidden_size} is not a multiple of "
                                 f"num_attention_heads {sub.num_attention_heads}")
        head_dim = getattr(tc, "head_dim", None)
        if head_dim is not None and head_dim != tc.hidden_size // tc.num_attention_heads:
            raise ModelError(f"{cfg_path}: text_config.head_dim {head_dim} differs from hidden_size / "
                             f"num_attention_heads = {tc.hidden_size // tc.num_attention_heads}, which {tf} uses")
        for name in TEXT_FAMILIES[tc.model_type].unsupported_fields:
            if getattr(tc, name, None) is not None:
                raise ModelError(f"{cfg_path}: text_config.{name} is set, but {tf}'s {tc.model_type} model ignores "
                                 "it (the model would compute something else)")
        kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
        if tc.num_attention_heads % kv:
            raise ModelError(f"{cfg_path}: text_config.num_attention_heads {tc.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads {kv}")

    @cached_property
    def meta_model(self) -> nn.Module:
        """The full model on the meta device: names, shapes and module order, no memory."""
        from transformers import LlavaForConditionalGeneration

        try:
            with torch.device("meta"):
                return LlavaForConditionalGeneration(self.config)
        except Exception as e:
            raise ModelError(f"{self.ckpt.path / 'config.json'}: transformers cannot build this model "
                             f"({_first_line(e)})") from None

    def _absent_prefixes(self) -> tuple[str, ...]:
        """Post-encoder parts the checkpoint has no tensor for (llava-interleave ships no SigLIP head):
        transformers 4.37.2 would build them with random weights; LLaVA never uses their output."""
        if self.vision.post_head is None:
            return ()
        names = self.ckpt.names
        out = []
        for part in self.vision.post_head:
            prefix = f"{VISION}{part}."
            if not any(n.startswith(prefix) for n in names):
                out.append(prefix)
        return tuple(out)

    def is_absent(self, name: str) -> bool:
        """Whether module/tensor ``name`` is left out (see :meth:`_absent_prefixes`)."""
        return any(name.startswith(p) or name + "." == p for p in self.absent_prefixes)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.meta_model.named_parameters(remove_duplicate=False)
                if not self.is_absent(n)}

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
        return [n for n, m in self.meta_model.named_modules() if isinstance(m, nn.Linear) and not self.is_absent(n)]

    @cached_property
    def uncalled_linears(self) -> frozenset[str]:
        """Linears no activation reaches (their weight is read by another module): always float."""
        return frozenset(VISION + n for n in self.vision.uncalled_linears) & frozenset(self.linear_names)

    def quantized_linears(self, preset: str = "msmodelslim", keep_float: Iterable[str] = ()) -> list[str]:
        """The W8A8 Linears in named_modules order (msModelSlim: all but down_proj, lm_head, last Linear),
        less the ``keep_float`` names (``--float_linears`` / ``--keep_float``)."""
        names = self.linear_names
        last = names[-1]
        skip = set(keep_float) | self.uncalled_linears
        down = {f"{LM}layers.{i}.{self.text.roles.down}" for i in range(self.n_text_layers)}
        out = []
        for n in names:
            if n == last or n == LANGUAGE + self.text.lm_head or n in skip:
                continue
            if n in down and preset != "with_down_proj":
                continue
            if preset == "language_only" and not n.startswith(LM):
                continue
            out.append(n)
        return out

    def family(self, stage: Stage) -> LayerFamily | None:
        """The family describing a layer stage (None for the projector and the vision head)."""
        return {"vision_layer": self.vision, "text_layer": self.text}.get(stage.kind)

    def smooth_groups(self, stage: Stage) -> list[SmoothGroup]:
        fam = self.family(stage)
        if fam is None:
            return []
        p, r, side = stage.prefix, fam.roles, "vision" if stage.kind == "vision_layer" else "text"
        return [
            SmoothGroup(f"{side}.{stage.index}.attn", fam.qkv_kind, p + r.attn_norm, tuple(p + x for x in r.qkv),
                        fam.shift, m2=fam.msmodelslim_m2),
            SmoothGroup(f"{side}.{stage.index}.mlp", fam.mlp_kind, p + r.mlp_norm, tuple(p + x for x in r.mlp_in),
                        fam.shift, m2=fam.msmodelslim_m2),
        ]

    def pair_groups(self, stage: Stage, preset: str = "msmodelslim") -> list[SmoothGroup]:
        """Linear -> Linear smoothing groups of a stage (``--smooth_vo``) whose destination the preset quantizes,
        from the family's roles: v -> o (one scale per KV channel with GQA; with a shift where both have a bias,
        as CLIP's and SigLIP's) and, for a gated MLP whose down Linear is quantized, up -> down."""
        fam = self.family(stage)
        if fam is None:
            return []
        p, r, side = stage.prefix, fam.roles, "vision" if stage.kind == "vision_layer" else "text"
        config = self.vision_config if side == "vision" else self.text_config
        h = fam.heads(config)
        heads = (h.heads, h.kv_heads, h.head_dim) if h.kv_heads != h.heads else None
        out = [SmoothGroup(f"{side}.{stage.index}.vo", "clip_vo" if side == "vision" else "llama_vo", p + r.v,
                           (p + r.o,), fam.qkv_bias and fam.o_bias, heads)]
        if r.gate is not None:
            # no shift: silu(gate)·(up − z) is not the output shifted by a constant
            out.append(SmoothGroup(f"{side}.{stage.index}.down", "llama_up_down", p + r.up, (p + r.down,), False))
        quantized = set(self.quantized_linears(preset))
        return [g for g in out if all(n in quantized for n in g.linears)]

    def smoothing_groups(self, stage: Stage, preset: str = "msmodelslim", smooth_vo: bool = False
                         ) -> list[SmoothGroup]:
        """Every group a recipe smooths in ``stage``: the norm groups, plus the pair groups with ``smooth_vo``."""
        return self.smooth_groups(stage) + (self.pair_groups(stage, preset) if smooth_vo else [])

    def shared_inputs(self, stage: Stage) -> dict[str, str]:
        """Each Linear of ``stage`` -> the Linear whose input it reads (the first of its smoothing group, else
        itself): Linears that share an input share its statistics (activation rows, input moments)."""
        key = {n: n for n in self.linear_names if stage.owns(n)}
        for g in self.smooth_groups(stage):
            key.update({n: g.linears[0] for n in g.linears})
        return key

    def stages(self) -> list[Stage]:
        out = [Stage("vision_layer", i, f"{VISION}{self.vision.layers}{i}.") for i in range(self.n_vision_layers)]
        if self.vision.post_head is not None and not self.absent_prefixes:
            out.append(Stage("vision_head", 0, VISION, self.vision.post_head))
        out.append(Stage("projector", 0, PROJECTOR))
        out += [Stage("text_layer", i, f"{LANGUAGE}{self.text.layers}{i}.") for i in range(self.n_text_layers)]
        return out

    def all_smooth_groups(self, preset: str = "msmodelslim", smooth_vo: bool = False) -> list[SmoothGroup]:
        return [g for s in self.stages() for g in self.smoothing_groups(s, preset, smooth_vo)]

    def stage_of(self, module_name: str) -> Stage:
        for s in self.stages():
            if s.owns(module_name):
                return s
        raise KeyError(module_name)

    def stage_tensors(self, stage: Stage) -> dict[str, torch.Tensor]:
        """Every float32 tensor of a stage, by full name (a fresh copy: callers fold smoothing in place)."""
        out = {}
        for prefix in stage.tensor_prefixes:
            out.update({prefix + k: v for k, v in self.ckpt.tensors(prefix).items()})
        return out

    # ------------------------------------------------------------------ features
    @property
    def feature_index(self) -> int:
        """Which hidden state of the tower LLaVA takes: 0 = the embeddings, n = after the last layer."""
        return self.config.vision_feature_layer % (self.n_vision_layers + 1)

    @property
    def image_tokens(self) -> int:
        """Language-model positions one ``<image>`` token expands to: the tower's positions, less position 0
        with the "default" strategy (the class token; on a tower without one, transformers 4.37.2 drops
        the first patch all the same)."""
        drop = 1 if self.config.vision_feature_select_strategy == "default" else 0
        return self.vision.positions(self.vision_config) - drop

    def image_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Which language-model positions of a one-sample prompt hold image features (bool, merged length):
        each ``<image>`` token expands to :attr:`image_tokens` positions, every other token to one."""
        ids = input_ids.reshape(-1)
        is_img = ids == self.config.image_token_index
        width = torch.where(is_img, torch.full_like(ids, self.image_tokens), torch.ones_like(ids))
        return torch.repeat_interleave(is_img, width)

    def select_image_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden_states[vision_feature_layer]`` → the features the projector gets (a copy)."""
        strategy = self.config.vision_feature_select_strategy
        if strategy == "default":
            return hidden[:, 1:].clone()
        if strategy == "full":
            return hidden.clone()
        raise ModelError(f"unsupported vision_feature_select_strategy {strategy!r}")

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
        return self._materialise(self.vision.build_layer(self.vision_config, i), f"{VISION}{self.vision.layers}{i}.")

    def build_text_layer(self, i: int) -> nn.Module:
        layer = self._materialise(self.text.build_layer(self.text_config, i), f"{LANGUAGE}{self.text.layers}{i}.")
        self.text.rebuild_rope(layer, self.text.roles)  # non-persistent RoPE buffers are rebuilt on the CPU
        return layer

    def build_projector(self) -> nn.Module:
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        with torch.device("meta"):
            proj = LlavaMultiModalProjector(self.config)
        return self._materialise(proj, PROJECTOR)

    def build_vision_head(self) -> nn.Module:
        """The post-encoder part of the tower's forward (SigLIP: post_layernorm → pooling head)."""
        norm_name, head_name = self.vision.post_head
        vc = self.vision_config
        with torch.device("meta"):
            module = _PostEncoder(self.vision.post_head, nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps),
                                  import_class(self.vision.head_class)(vc))
        return self._materialise(module, VISION)

    def build_stage(self, stage: Stage) -> nn.Module:
        if stage.kind == "vision_layer":
            return self.build_vision_layer(stage.index)
        if stage.kind == "text_layer":
            return self.build_text_layer(stage.index)
        if stage.kind == "vision_head":
            return self.build_vision_head()
        return self.build_projector()

    def build_vision_embeddings(self) -> nn.Module:
        """Patch (and class/position) embeddings, then the pre-norm if the tower has one (CLIP's ``pre_layrnorm``)."""
        vc = self.vision_config
        with torch.device("meta"):
            emb = import_class(self.vision.embeddings_class)(vc)
        self._materialise(emb, VISION + "embeddings.")
        emb.register_buffer("position_ids", torch.arange(emb.num_positions).expand((1, -1)), persistent=False)
        if self.vision.pre_norm is None:
            return emb
        with torch.device("meta"):
            pre = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self._materialise(pre, f"{VISION}{self.vision.pre_norm}.")
        return nn.Sequential(emb, pre)

    def token_embedder(self):
        """``ids -> float32 token embeddings``. The table stays in the checkpoint's dtype and only the rows
        used are cast (a Qwen2 table is 2.5 GB in float32): the values are exactly those of the float32
        ``nn.Embedding``."""
        table = self.ckpt.tensor(EMBED, None)
        return lambda input_ids: table[input_ids].float()

    def build_final_norm(self) -> nn.Module:
        return self._materialise(self.text.build_final_norm(self.text_config), LANGUAGE + self.text.final_norm + ".")

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

    def causal_mask(self, attention_mask: torch.Tensor, embeds: torch.Tensor):
        """The 4-D mask the language model hands its layers (see :meth:`DecoderFamily.attention_mask`)."""
        return self.text.attention_mask(attention_mask, embeds)

    # ------------------------------------------------------------------ export order
    def parameter_order(self, m2_wrapped: bool = False) -> list[tuple[str, str, list[str]]]:
        """(module name, class name, own parameter names) in the order msModelSlim saves them.

        That is ``named_modules`` order of the model it saved: with ``m2_wrapped`` the layers msModelSlim's
        anti-outlier wrappers replaced are in the wrapper's child order (CLIP's ``LlavaClipVision``:
        layer_norm1, layer_norm2, self_attn, mlp; HF's is self_attn, layer_norm1, mlp, layer_norm2).
        """
        out = []
        for name, mod in self.meta_model.named_modules(remove_duplicate=False):
            params = [p for p, _ in mod.named_parameters(recurse=False, remove_duplicate=False)]
            if params and not self.is_absent(name):
                out.append((name, type(mod).__name__, params))
        if not m2_wrapped:
            return out
        wrapped = [(f"{root}{fam.layers}", fam.m2_child_order)
                   for root, fam in ((VISION, self.vision), (LANGUAGE, self.text))
                   if fam.msmodelslim_m2 and fam.m2_child_order]
        first_index: dict[str, int] = {}

        def key(item: tuple[int, tuple[str, str, list[str]]]):
            idx, (name, _, _) = item
            for prefix, order in wrapped:
                if name.startswith(prefix):
                    layer, _, rest = name[len(prefix):].partition(".")
                    first = first_index.setdefault(prefix + layer, idx)
                    return (first, order.index(rest.split(".")[0]), idx)
            return (idx, 0, 0)

        return [item for _, item in sorted(enumerate(out), key=key)]
