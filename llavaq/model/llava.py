"""A llava-hf LLaVA (transformers 4.37 naming): what is quantized, how its layers are built, in what order.

The language model and the vision tower are described by their families
(:mod:`llavaq.model.families`: Llama, Mistral, Qwen2; CLIP, SigLIP), picked from the config's
``model_type``. From those descriptions this module derives everything that depends on module
names: the quantized/float module sets, the smoothing groups (norm → Linears), the stages of the
layer-streamed work and msModelSlim's save order. The names and units are in :mod:`llavaq.model.layout`,
the config checks in :mod:`llavaq.model.config`, and the builders that materialise one stage at a time
from a :class:`~llavaq.model.checkpoint.Checkpoint` (so a 7B model is never fully in memory) with the glue
``LlavaForConditionalGeneration`` runs between them in :mod:`llavaq.model.modules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cached_property

import torch
from torch import nn

from llavaq.errors import ModelError
from llavaq.model.checkpoint import Checkpoint
from llavaq.model.config import first_line, load_llava_config
from llavaq.model.families import TEXT_FAMILIES, VISION_FAMILIES, DecoderFamily, EncoderFamily, LayerFamily
from llavaq.model.layout import (
    EMBED,
    FEATURE_STRATEGIES,
    LANGUAGE,
    LM,
    LM_HEAD,
    PAIR_KINDS,
    PROJECTOR,
    VISION,
    SmoothGroup,
    Stage,
)
from llavaq.model.modules import LlavaModules

# the layout's names, re-exported: most callers import them from here
__all__ = ["EMBED", "FEATURE_STRATEGIES", "LANGUAGE", "LM", "LM_HEAD", "PAIR_KINDS", "PROJECTOR", "VISION",
           "LlavaArch", "SmoothGroup", "Stage"]


class LlavaArch(LlavaModules):
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
        return load_llava_config(self.ckpt, self.trust_remote_code)

    @cached_property
    def meta_model(self) -> nn.Module:
        """The full model on the meta device: names, shapes and module order, no memory."""
        from transformers import LlavaForConditionalGeneration

        try:
            with torch.device("meta"):
                return LlavaForConditionalGeneration(self.config)
        except Exception as e:
            raise ModelError(f"{self.ckpt.path / 'config.json'}: transformers cannot build this model "
                             f"({first_line(e)})") from None

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
