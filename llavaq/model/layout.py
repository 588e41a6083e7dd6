"""Names and units of a llava-hf LLaVA's layout (transformers 4.37 naming): module prefixes, smoothing groups
(norm or Linear → the Linears it feeds) and stages (the units of layer-streamed work)."""

from __future__ import annotations

from dataclasses import dataclass

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
