"""What LLaVA runs, built one stage at a time from the checkpoint: the layer builders, the image-feature
selection and the glue ``LlavaForConditionalGeneration`` runs between the stages (transformers 4.37)."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from llavaq.errors import ModelError
from llavaq.model.families import DecoderFamily, EncoderFamily
from llavaq.model.families.base import import_class
from llavaq.model.layout import EMBED, LANGUAGE, LM_HEAD, PROJECTOR, VISION, Stage


class PostEncoder(nn.Module):
    """What a vision tower runs after its encoder (SigLIP: ``post_layernorm`` then the pooling ``head``)."""

    def __init__(self, names: tuple[str, str], norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self._names = names
        self.add_module(names[0], norm)
        self.add_module(names[1], head)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self, self._names[1])(getattr(self, self._names[0])(h))


class LlavaModules:
    """The builders and glue of :class:`~llavaq.model.llava.LlavaArch` (a mixin: it reads the arch's
    ``ckpt``, ``config``, ``text`` / ``vision`` families and ``tied_embeddings``)."""

    ckpt: Any
    config: Any
    vision_config: Any
    text_config: Any
    text: DecoderFamily
    vision: EncoderFamily
    n_vision_layers: int
    tied_embeddings: bool

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
            module = PostEncoder(self.vision.post_head, nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps),
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
