"""Layer-streamed calibration: anti-outlier smoothing + fake-quant activation calibration.

msModelSlim runs (1) one float forward of calibration sample 0 in which every decoder/encoder
layer computes and applies its smoothing on first call (m2), then (2) a full forward of every
sample with each quantized Linear fake-quantizing its weight and input while its observer
watches. Both passes are sequential in the layers, so we run them **one layer at a time** over
all samples, with identical arithmetic:

* stream ``m2``  - sample 0, float, through the already-smoothed layers (drives the m2 search),
* stream ``fq``  - every sample, through the smoothed layers with fake-quant Linears (calibration),
* stream ``flt`` - every sample, float, through the original layers (float statistics and activation
  row samples for recipes derived at export time without a forward pass).

Only one layer's weights are in memory at a time.  The streams (tokens × hidden per sample) stay in
memory within a budget and are read back from disk beyond it (:mod:`llavaq.calib.streams`).
After each layer its results are written to the session cache, and its output streams are sealed
there as the resume point.
"""

from __future__ import annotations

import torch
from torch import nn

from llavaq.algorithms.blocks import clip_fc1_block, clip_qkv_block, gate_up_block, llama_qkv_block
from llavaq.algorithms.m2 import os_plus_search
from llavaq.algorithms.smoothing import channel_shift, fold_pair, fold_scale, fold_shift
from llavaq.algorithms.smoothquant import smoothquant_group
from llavaq.calib.cache import SessionCache
from llavaq.calib.fakequant import FakeQuantLinear, InputRecorder, set_submodule
from llavaq.calib.samples import Sample
from llavaq.calib.streams import Generation, Streams, StreamStore, default_stream_budget
from llavaq.errors import LlavaqError
from llavaq.memory import IdleMemoryTrimmer
from llavaq.model.llava import LlavaArch, SmoothGroup, Stage
from llavaq.progress import NullProgress, Progress
from llavaq.recipe import QuantRecipe


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


#: memory held but unused that may pile up between sample forwards before it is given back to the OS
IDLE_MEMORY_SLACK = 128 << 20


class ForwardCounter:
    """Counts per-sample layer forwards (tests assert that exports run none)."""

    count = 0


class CalibrationEngine:
    def __init__(
        self,
        arch: LlavaArch,
        samples: list[Sample],
        recipe: QuantRecipe,
        cache: SessionCache,
        *,
        progress: Progress | None = None,
        device: torch.device | str | list[torch.device | str] = "cpu",
        stream_budget: int | None = None,
        release_images: bool = False,
    ) -> None:
        if not samples:
            raise LlavaqError("no calibration samples")
        self.arch = arch
        self.samples = samples
        self.recipe = recipe
        self.cache = cache
        self.progress = progress or NullProgress()
        # Several devices: stage i runs on devices[i % n] (its weights are moved there; streams stay on the CPU)
        self.devices = [torch.device(d) for d in (device if isinstance(device, list | tuple) else [device])]
        if not self.devices:
            raise LlavaqError("no device to calibrate on")
        self.device = self.devices[0]
        self.quantized = set(arch.quantized_linears(recipe.modules))
        self.alphas: dict[str, float] = {}
        #: per smoothing group, what the m2 search found: threshold, block loss, block forwards, grid size
        self.m2_info: dict[str, dict] = {}
        self.image_idx = [j for j, s in enumerate(samples) if s.pixel_values is not None]
        if recipe.anti_outlier == "m2" and samples[0].pixel_values is None:
            raise LlavaqError("m2 needs an image sample first: the anti-outlier pass runs on calibration sample 0")
        self.rows_per_call = max(1, recipe.activation_sample_tokens // len(samples)) \
            if recipe.activation_sample_tokens else 0
        self._trim = IdleMemoryTrimmer(IDLE_MEMORY_SLACK)
        #: drop each sample's pixel values once embedded (the caller does not need them again)
        self.release_images = release_images
        #: the per-sample hidden states between layers: in memory up to the budget, read back from disk beyond it
        budget = default_stream_budget() if stream_budget is None else stream_budget
        self.streams = StreamStore(cache.path / "streams", budget, on_spill=lambda: self.progress.log(
            f"the calibration samples' hidden states exceed the stream budget ({_size(budget)}): "
            f"keeping the rest on disk in {cache.path / 'streams'} (--stream_memory_gb)"))

    # ------------------------------------------------------------------ driver
    @torch.no_grad()
    def run(self) -> SessionCache:
        stages = self.arch.stages()
        ForwardCounter.count = int(self.cache.manifest.get("forward_passes", 0))
        if self.cache.complete:
            return self.cache
        store = self.streams
        # Resume exactly after the stage the newest sealed streams follow (see SessionCache.write_stage).
        sealed = store.latest_sealed()
        streams, n_done = sealed.load() if sealed is not None else (None, 0)
        done = {s.name for s in stages[:n_done]}
        self.cache.manifest["stages_done"] = [s.name for s in stages[:n_done]]
        self.progress.stage("Calibrating layers", total=len(stages))
        try:
            if not n_done:
                streams = self._initial_streams(store.begin(0))
            for i, stage in enumerate(stages):
                if stage.name in done:
                    self.progress.advance()
                    continue
                gen = store.begin(i + 1)
                if stage.kind == "text_layer" and (i == 0 or stages[i - 1].kind != "text_layer"):
                    self._enter_language_model(streams, gen)
                self.device = self.devices[i % len(self.devices)]
                record = self._run_stage(stage, streams, gen)
                streams.carry_into(gen)
                last = i + 1 == len(stages)
                self.cache.write_stage(stage.name, record, ForwardCounter.count,
                                       None if last else (lambda n, s=streams, g=gen: g.seal(s, n)))
                store.keep_only(i + 1)
                self.progress.advance()
        except BaseException:
            store.discard_unsealed()  # nothing half-written is left behind: the sealed resume point stays
            raise
        self.cache.finish(ForwardCounter.count)  # removes the streams
        return self.cache

    # ------------------------------------------------------------------ streams
    def _initial_streams(self, gen: Generation) -> Streams:
        self.device = self.devices[0]
        s = Streams(fq=gen.new_list("fq"), flt=gen.new_list("flt"))
        if not self.image_idx:
            return s
        emb = self.arch.build_vision_embeddings().to(self.device)
        for j in self.image_idx:
            h = emb(self.samples[j].pixel_values.to(self.device)).cpu()
            if self.release_images:
                self.samples[j].pixel_values = None
            s.fq.append(h)
            s.flt.append(h.clone())
            if j == 0 and self.recipe.anti_outlier == "m2":
                s.m2 = h.clone()
        self._maybe_capture(s, 0, gen)
        return s

    def _feature_index(self) -> int:
        return self.arch.config.vision_feature_layer % (self.arch.n_vision_layers + 1)

    def _maybe_capture(self, s: Streams, hidden_index: int, gen: Generation) -> None:
        if hidden_index != self._feature_index():
            return
        s.feat_fq, s.feat_flt = gen.new_list("feat_fq"), gen.new_list("feat_flt")
        for h in s.fq:
            s.feat_fq.append(self._select(h))
        for h in s.flt:
            s.feat_flt.append(self._select(h))
        s.feat_m2 = self._select(s.m2) if s.m2 is not None else None

    def _select(self, h: torch.Tensor) -> torch.Tensor:
        strategy = self.arch.config.vision_feature_select_strategy
        return h[:, 1:].clone() if strategy == "default" else h.clone()

    def _enter_language_model(self, s: Streams, gen: Generation) -> None:
        """Token embeddings merged with projected image features, as LlavaForConditionalGeneration."""
        embed = self.arch.build_token_embedding()
        fq, flt, masks, positions = gen.new_list("lm_fq"), gen.new_list("lm_flt"), gen.new_list("masks"), []
        img_pos = {j: k for k, j in enumerate(self.image_idx)}
        m2_h = None
        for j, smp in enumerate(self.samples):
            tok = embed(smp.input_ids)
            if j in img_pos:
                k = img_pos[j]
                h_fq, mask2d, pos = self.arch.merge_image_features(s.feat_fq[k], tok, smp.input_ids,
                                                                   smp.attention_mask)
                h_flt, _, _ = self.arch.merge_image_features(s.feat_flt[k], tok, smp.input_ids,
                                                             smp.attention_mask)
                if j == 0 and s.feat_m2 is not None:
                    m2_h, _, _ = self.arch.merge_image_features(s.feat_m2, tok, smp.input_ids,
                                                                smp.attention_mask)
            else:
                h_fq, h_flt, mask2d = tok, tok.clone(), smp.attention_mask
                pos = torch.arange(tok.shape[1]).unsqueeze(0)
            fq.append(h_fq)
            flt.append(h_flt)
            masks.append(self.arch.causal_mask(mask2d, h_fq))
            positions.append(pos)
        s.fq, s.flt, s.masks, s.positions, s.m2 = fq, flt, masks, positions, m2_h
        s.feat_fq, s.feat_flt, s.feat_m2 = [], [], None
        del embed

    # ------------------------------------------------------------------ one stage
    def _build(self, stage: Stage) -> nn.Module:
        if stage.kind == "vision_layer":
            return self.arch.build_vision_layer(stage.index)
        if stage.kind == "text_layer":
            return self.arch.build_text_layer(stage.index)
        return self.arch.build_projector()

    def _forward(self, stage: Stage, layer: nn.Module, h: torch.Tensor, j: int, s: Streams) -> torch.Tensor:
        ForwardCounter.count += 1
        h = h.to(self.device)
        if stage.kind == "vision_layer":
            out = layer(h, None, None)[0]
        elif stage.kind == "text_layer":
            mask = s.masks[j]
            out = layer(h, attention_mask=None if mask is None else mask.to(self.device),
                        position_ids=s.positions[j].to(self.device))[0]
        else:
            out = layer(h)
        out = out.cpu()
        self._trim()  # RSS follows the live tensors, not the number of samples seen (llavaq/memory.py)
        return out

    def _run_stage(self, stage: Stage, s: Streams, gen: Generation) -> dict[str, torch.Tensor]:
        """Calibrate one layer over every sample; its outputs go to the streams of ``gen``."""
        layer = self._build(stage).to(self.device)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        groups = self.arch.smooth_groups(stage)
        record: dict[str, torch.Tensor] = {}
        is_vision_side = stage.kind in ("vision_layer", "projector")
        n_stream = len(s.fq) if stage.kind != "projector" else len(s.feat_fq)
        self.progress.sub(stage.name, total=n_stream * 2 + (1 if groups and self.recipe.anti_outlier == "m2" else 0))

        # 1. float statistics on the original layer (all samples); input moments for GPTQ if asked
        moments_for = sorted({self.arch.shared_inputs(stage)[n][len(stage.prefix):]
                              for n in self.quantized if n.startswith(stage.prefix)}) \
            if self.recipe.input_moments else ()
        rec = InputRecorder(linears, self.rows_per_call, moments_for)
        src = s.feat_flt if stage.kind == "projector" else s.flt
        out = gen.new_list("feat_flt" if stage.kind == "projector" else "flt")
        for j, h in enumerate(src):
            out.append(self._forward(stage, layer, h, j if not is_vision_side else j, s))
            self.progress.sub_advance()
        rec.remove()
        float_stats = rec.result()
        for g in groups:  # Linears of one group share their input: keep one copy of the rows
            for name in g.linears[1:]:
                float_stats.pop(f"float.{name[len(stage.prefix):]}.rows", None)
        record.update({self._full(stage, k): v for k, v in float_stats.items()})

        # 2. anti-outlier smoothing
        method = self.recipe.anti_outlier
        if groups and method == "m2":
            m2_in = s.m2 if stage.kind != "projector" else s.feat_m2
            m2_out, smooth = self._m2_layer(stage, layer, m2_in, s)
            self.progress.sub_advance()
        elif groups and method == "m1":
            smooth = self._m1_layer(stage, layer, groups, float_stats)
            m2_out = None
        else:
            smooth = {}
            m2_out = s.feat_m2 if stage.kind == "projector" else s.m2
            if stage.kind == "projector" and s.feat_m2 is not None:
                m2_out = layer(s.feat_m2.to(self.device)).cpu()
        if self.recipe.smooth_vo:  # Linear -> Linear groups, after the norm groups (exact in float either way)
            smooth.update(self._pair_layer(stage, layer, float_stats))
        for gname, (scale, shift) in smooth.items():
            for key, value in self.m2_info.pop(gname, {}).items():
                record[f"m2.{gname}.{key}"] = torch.tensor([value], dtype=torch.float64)
            record[f"smooth.{gname}.scale"] = scale
            if gname in self.alphas:
                record[f"smooth.{gname}.alpha"] = torch.tensor([self.alphas[gname]], dtype=torch.float64)
            if shift is not None:
                record[f"smooth.{gname}.shift"] = shift

        # 3. fake-quant calibration (all samples, in order)
        fq_mods = {}
        for rel, lin in linears.items():
            full = stage.prefix + rel
            if full in self.quantized:
                fq_mods[full] = FakeQuantLinear(lin, self.recipe.observer)
                set_submodule(layer, rel, fq_mods[full])
        src = s.feat_fq if stage.kind == "projector" else s.fq
        fq_out = gen.new_list("feat_fq" if stage.kind == "projector" else "fq")
        for j, h in enumerate(src):
            fq_out.append(self._forward(stage, layer, h, j, s))
            self.progress.sub_advance()
        for full, m in fq_mods.items():
            record[f"act.{full}.input_scale"] = m.input_scale.reshape(1).float()
            record[f"act.{full}.input_offset"] = m.input_offset.reshape(1).float()
            record[f"act.{full}.x_min"] = m.x_min.reshape(1).float()
            record[f"act.{full}.x_max"] = m.x_max.reshape(1).float()
            for k, v in m.observer.state_dict().items():
                record[f"obs.{full}.{k}"] = v

        # 4. advance the streams
        if stage.kind == "projector":
            s.feat_fq, s.feat_flt = fq_out, out
            s.feat_m2 = m2_out
        else:
            s.fq, s.flt = fq_out, out
            s.m2 = m2_out if method == "m2" else None
            if stage.kind == "vision_layer":
                self._maybe_capture(s, stage.index + 1, gen)
        del layer
        return record

    @staticmethod
    def _full(stage: Stage, key: str) -> str:
        kind, _, rest = key.partition(".")
        return f"{kind}.{stage.prefix}{rest}"

    # ------------------------------------------------------------------ smoothing per layer
    def _m2_layer(self, stage: Stage, layer: nn.Module, h: torch.Tensor, s: Streams):
        mode = self.recipe.m2_search
        h = h.to(self.device)
        smooth = {}
        if stage.kind == "vision_layer":
            g_attn, g_mlp = self.arch.smooth_groups(stage)
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            residual = h
            x = layer.layer_norm1(h)
            shift = channel_shift(x)
            x -= shift
            fold_shift([m.weight.data for m in qkv], [m.bias.data for m in qkv], shift)
            w = torch.cat([m.weight.data for m in qkv])
            b = torch.cat([m.bias.data for m in qkv])
            fn = clip_qkv_block(attn.embed_dim, attn.num_heads, attn.head_dim, b)
            scale = os_plus_search(x, w, fn, mode=mode, info=self.m2_info.setdefault(g_attn.name, {}))
            x /= scale
            fold_scale(layer.layer_norm1.weight.data, layer.layer_norm1.bias.data,
                       [m.weight.data for m in qkv], scale, shift)
            smooth[g_attn.name] = (scale.cpu(), shift.cpu())
            x, _ = attn(hidden_states=x, attention_mask=None, causal_attention_mask=None)
            h = residual + x
            residual = h
            x = layer.layer_norm2(h)
            shift = channel_shift(x)
            x -= shift
            fold_shift([mlp.fc1.weight.data], [mlp.fc1.bias.data], shift)
            fn = clip_fc1_block(mlp.fc1.bias.data)
            scale = os_plus_search(x, mlp.fc1.weight.data, fn, mode=mode, info=self.m2_info.setdefault(g_mlp.name, {}))
            x /= scale
            fold_scale(layer.layer_norm2.weight.data, layer.layer_norm2.bias.data, [mlp.fc1.weight.data],
                       scale, shift)
            smooth[g_mlp.name] = (scale.cpu(), shift.cpu())
            h = residual + mlp(x)
        elif stage.kind == "text_layer":
            g_attn, g_mlp = self.arch.smooth_groups(stage)
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            mask = s.masks[0].to(self.device) if s.masks[0] is not None else None
            pos = s.positions[0].to(self.device)
            residual = h
            x = layer.input_layernorm(h)
            w = torch.cat([m.weight.data for m in qkv])
            fn = llama_qkv_block(attn.num_heads, attn.num_key_value_heads, attn.head_dim,
                                 attn.rotary_emb.cos_cached, attn.rotary_emb.sin_cached, pos, mask)
            scale = os_plus_search(x, w, fn, mode=mode, info=self.m2_info.setdefault(g_attn.name, {}))
            x /= scale
            fold_scale(layer.input_layernorm.weight.data, None, [m.weight.data for m in qkv], scale)
            smooth[g_attn.name] = (scale.cpu(), None)
            x = attn(hidden_states=x, attention_mask=mask, position_ids=pos)[0]
            h = residual + x
            residual = h
            x = layer.post_attention_layernorm(h)
            w = torch.cat([mlp.gate_proj.weight.data, mlp.up_proj.weight.data])
            scale = os_plus_search(x, w, gate_up_block(mlp.act_fn), mode=mode,
                                   info=self.m2_info.setdefault(g_mlp.name, {}))
            x /= scale
            fold_scale(layer.post_attention_layernorm.weight.data, None,
                       [mlp.gate_proj.weight.data, mlp.up_proj.weight.data], scale)
            smooth[g_mlp.name] = (scale.cpu(), None)
            h = residual + mlp(x)
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
