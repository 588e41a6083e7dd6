"""The smoothing the calibration engine folds into one layer: m2 (OS+ search on sample 0, group by group as
msModelSlim's wrappers do), m1 (SmoothQuant from the float statistics) and ``--smooth_vo`` pair groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llavaq.algorithms.blocks import Block, clip_fc1_block, clip_qkv_block, gate_up_block, llama_qkv_block
from llavaq.algorithms.m2 import os_plus_search
from llavaq.algorithms.smoothing import channel_shift, fold_pair, fold_scale, fold_shift
from llavaq.algorithms.smoothquant import smoothquant_group
from llavaq.calib.streams import Streams
from llavaq.errors import LlavaqError
from llavaq.model.llava import LlavaArch, SmoothGroup, Stage
from llavaq.recipe import QuantRecipe


class LayerSmoothing:
    """Smoothing of one layer (a mixin of :class:`~llavaq.calib.engine.CalibrationEngine`: it reads the
    engine's ``arch``, ``recipe`` and ``device`` and fills its ``m2_info`` and ``alphas``)."""

    arch: LlavaArch
    recipe: QuantRecipe
    device: Any
    m2_info: dict[str, dict[str, float]]
    alphas: dict[str, float]

    def _m2_layer(self, stage: Stage, layer: nn.Module, h: torch.Tensor, s: Streams, m2_groups: list[SmoothGroup]):
        """Sample 0 through a pre-norm layer, searching and folding each group's smoothing on the way
        (msModelSlim's wrappers: the attention group before the attention runs, the MLP group before
        the MLP runs), with the family's roles naming the modules."""
        fam = self.arch.family(stage)
        r = fam.roles
        text = stage.kind == "text_layer"
        h = h.to(self.device)
        mask = pos = None
        if text:
            mask = s.masks[0].to(self.device) if s.masks[0] is not None else None
            pos = s.positions[0].to(self.device)
        attn_group, mlp_group = self.arch.smooth_groups(stage)
        chosen = {g.name for g in m2_groups}
        smooth: dict = {}
        residual = h
        x = layer.get_submodule(r.attn_norm)(h)
        if attn_group.name in chosen:
            x = self._m2_group(stage, layer, attn_group, x, smooth, mask, pos)
        attn = layer.get_submodule(r.attn)
        x = fam.call_attention(attn, x, mask, pos) if text else fam.call_attention(attn, x)
        h = residual + x
        residual = h
        x = layer.get_submodule(r.mlp_norm)(h)
        if mlp_group.name in chosen:
            x = self._m2_group(stage, layer, mlp_group, x, smooth, mask, pos)
        h = residual + layer.get_submodule(r.mlp)(x)
        return h.cpu(), smooth

    def _pair_layer(self, stage: Stage, layer: nn.Module, stats: dict):
        """``--smooth_vo``: SmoothQuant between v_proj and o_proj (and up_proj, down_proj) from the float
        statistics of the destination's input; m1 uses its alpha, m2 searches one per group (``auto``)."""
        alpha = self.recipe.alpha if self.recipe.anti_outlier == "m1" else "auto"
        smooth = {}
        rel = lambda n: n[len(stage.prefix):]  # noqa: E731
        for g in self.arch.pair_groups(stage, self.recipe.modules):
            src, dst = layer.get_submodule(rel(g.norm)), layer.get_submodule(rel(g.linears[0]))
            key = rel(g.linears[0])
            info: dict = {}
            scale, shift = smoothquant_group(g, stats[f"float.{key}.min"], stats[f"float.{key}.max"],
                                             [dst.weight.data], alpha, stats.get(f"float.{key}.rows"), info=info,
                                             stat=self.recipe.smooth_stat if self.recipe.anti_outlier == "m1"
                                             else "absmax")
            self.alphas[g.name] = info["alpha"]
            fold_pair(src.weight.data, None if src.bias is None else src.bias.data, dst.weight.data,
                      None if dst.bias is None else dst.bias.data, scale, shift, g.heads)
            smooth[g.name] = (scale.cpu(), None if shift is None else shift.cpu())
        return smooth

    def _m2_group(self, stage: Stage, layer: nn.Module, g: SmoothGroup, x: torch.Tensor, smooth: dict,
                  mask, pos) -> torch.Tensor:
        """One group: shift (LayerNorm groups), OS+ range search on the group's block, fold; returns x/s."""
        mods = [layer.get_submodule(n[len(stage.prefix):]) for n in g.linears]
        norm = layer.get_submodule(g.norm[len(stage.prefix):])
        weights = [m.weight.data for m in mods]
        shift = None
        if g.shift:
            shift = channel_shift(x)
            x -= shift
            fold_shift(weights, [m.bias.data for m in mods], shift)
        w = torch.cat(weights) if len(weights) > 1 else weights[0]
        block = self._m2_block(stage, layer, g, mods, mask, pos)
        scale = os_plus_search(x, w, block, mode=self.recipe.m2_search, info=self.m2_info.setdefault(g.name, {}))
        x /= scale
        fold_scale(norm.weight.data, norm.bias.data if g.shift else None, weights, scale, shift)
        smooth[g.name] = (scale.cpu(), None if shift is None else shift.cpu())
        return x

    def _m2_block(self, stage: Stage, layer: nn.Module, g: SmoothGroup, mods: list[nn.Module], mask, pos) -> Block:
        """The block whose output error the search minimises (msModelSlim's migration module types)."""
        fam = self.arch.family(stage)
        config = self.arch.text_config if stage.kind == "text_layer" else self.arch.vision_config
        heads = fam.heads(config)
        biases = [m.bias.data for m in mods if m.bias is not None]
        bias = torch.cat(biases) if len(biases) == len(mods) else None
        if g.kind == "llama_qkv":
            rope = layer.get_submodule(fam.roles.attn).rotary_emb
            return llama_qkv_block(heads.heads, heads.kv_heads, heads.head_dim, rope.cos_cached, rope.sin_cached,
                                   pos, mask, bias=bias)
        if g.kind == "llama_gate_up":
            return gate_up_block(layer.get_submodule(fam.roles.mlp).act_fn)
        if g.kind == "clip_qkv":
            return clip_qkv_block(heads.heads * heads.head_dim, heads.heads, heads.head_dim, bias)
        if g.kind == "clip_fc1":
            return clip_fc1_block(mods[0].bias.data)
        raise LlavaqError(f"no m2 block for smoothing group kind {g.kind!r} ({g.name})")

    def _m1_layer(self, stage: Stage, layer: nn.Module, groups: list[SmoothGroup], stats: dict):
        """SmoothQuant with the calibrated float statistics (LayerNorm groups also centre by z)."""
        smooth = {}
        for g in groups:
            key = g.linears[0][len(stage.prefix):]
            mods = [layer.get_submodule(n[len(stage.prefix):]) for n in g.linears]
            norm = layer.get_submodule(g.norm[len(stage.prefix):])
            weights = [m.weight.data for m in mods]
            info: dict = {}
            scale, shift = smoothquant_group(
                g, stats[f"float.{key}.min"], stats[f"float.{key}.max"], weights, self.recipe.alpha,
                stats.get(f"float.{key}.rows"), info=info, stat=self.recipe.smooth_stat,
            )
            self.alphas[g.name] = info["alpha"]
            if shift is not None:
                fold_shift(weights, [m.bias.data for m in mods], shift)
            fold_scale(norm.weight.data, norm.bias.data if g.shift else None, weights, scale, shift)
            smooth[g.name] = (scale.cpu(), None if shift is None else shift.cpu())
        return smooth
