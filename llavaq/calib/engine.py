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

from llavaq.calib.cache import SessionCache
from llavaq.calib.fakequant import FakeQuantLinear, InputRecorder, set_submodule
from llavaq.calib.samples import Sample
from llavaq.calib.smoothing import LayerSmoothing
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


class CalibrationEngine(LayerSmoothing):
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
        #: the last stage whose groups the m2 search smooths: the m2 stream (sample 0) is dropped after it
        stages = arch.stages()
        self._m2_last = max((i for i, st in enumerate(stages) if self._m2_groups(st)), default=-1)
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
                if i > self._m2_last:  # no later group is searched on sample 0: stop carrying it
                    streams.m2 = streams.feat_m2 = None
                record = self.run_stage(stage, streams, gen)
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

    def _maybe_capture(self, s: Streams, hidden_index: int, gen: Generation) -> None:
        """Keep ``hidden_states[vision_feature_layer]`` (selected as LLaVA does) for the projector."""
        if hidden_index != self.arch.feature_index:
            return
        s.feat_fq, s.feat_flt = gen.new_list("feat_fq"), gen.new_list("feat_flt")
        for h in s.fq:
            s.feat_fq.append(self._select(h))
        for h in s.flt:
            s.feat_flt.append(self._select(h))
        s.feat_m2 = self._select(s.m2) if s.m2 is not None else None

    def _select(self, h: torch.Tensor) -> torch.Tensor:
        return self.arch.select_image_features(h)

    def _enter_language_model(self, s: Streams, gen: Generation) -> None:
        """Token embeddings merged with projected image features, as LlavaForConditionalGeneration."""
        embed = self.arch.token_embedder()
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

    def _token_weights(self) -> list[torch.Tensor] | None:
        """``--gptq_tokens balanced``: per sample, each language-model row's weight in the input moments, so
        that image and text tokens weigh half each over the calibration set (their counts keep the total)."""
        if self.recipe.gptq_tokens != "balanced":
            return None
        with_image = set(self.image_idx)
        masks = [self.arch.image_rows(smp.input_ids) if j in with_image
                 else torch.zeros(smp.input_ids.numel(), dtype=torch.bool) for j, smp in enumerate(self.samples)]
        n_img = sum(int(m.sum()) for m in masks)
        n_all = sum(m.numel() for m in masks)
        if n_img in (0, n_all):
            return None
        w_img, w_txt = n_all / (2 * n_img), n_all / (2 * (n_all - n_img))
        return [torch.where(m, w_img, w_txt).double() for m in masks]

    # ------------------------------------------------------------------ one stage
    def _m2_groups(self, stage: Stage) -> list[SmoothGroup]:
        """The stage's groups the m2 search smooths: msModelSlim's (the layer classes its multimodal flow
        wraps) or, with ``--m2_scope all``, every group."""
        if self.recipe.anti_outlier != "m2":
            return []
        every = self.recipe.m2_scope == "all"
        return [g for g in self.arch.smooth_groups(stage) if g.m2 or every]

    def _forward(self, stage: Stage, layer: nn.Module, h: torch.Tensor, j: int, s: Streams,
                 count: bool = True) -> torch.Tensor:
        if count:
            ForwardCounter.count += 1
        h = h.to(self.device)
        if stage.kind == "vision_layer":
            out = self.arch.vision.call_layer(layer, h)
        elif stage.kind == "text_layer":
            mask = s.masks[j]
            out = self.arch.text.call_layer(layer, h, None if mask is None else mask.to(self.device),
                                            s.positions[j].to(self.device))
        else:  # projector, vision head
            out = layer(h)
        out = out.cpu()
        self._trim()  # RSS follows the live tensors, not the number of samples seen (llavaq/memory.py)
        return out

    def run_stage(self, stage: Stage, s: Streams, gen: Generation) -> dict[str, torch.Tensor]:
        """Calibrate one layer over every sample; its outputs go to the streams of ``gen``.

        The vision head (SigLIP) runs on the last hidden states and changes no stream: LLaVA never uses
        its output, only its Linears are calibrated (as msModelSlim does, on the pooled token).
        """
        layer = self.arch.build_stage(stage).to(self.device)
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        m2_groups = self._m2_groups(stage)
        on_features = stage.kind == "projector"
        self.progress.sub(stage.name, total=len(s.feat_fq if on_features else s.fq) * 2 + (1 if m2_groups else 0))
        # 1. float statistics on the original layer (all samples); input moments for GPTQ if asked
        out, float_stats = self._float_pass(stage, layer, linears, s, gen)
        record: dict[str, torch.Tensor] = {self._full(stage, k): v for k, v in float_stats.items()}
        # 2. anti-outlier smoothing (m2 also carries sample 0 through the smoothed layer)
        m2_out = self._smooth_stage(stage, layer, m2_groups, float_stats, s, record)
        # 3. fake-quant calibration (all samples, in order)
        fq_out = self._fake_quant_pass(stage, layer, linears, s, gen, record)
        # 4. advance the streams
        if on_features:
            s.feat_fq, s.feat_flt, s.feat_m2 = fq_out, out, m2_out
        elif stage.kind != "vision_head":
            s.fq, s.flt, s.m2 = fq_out, out, m2_out
            if stage.kind == "vision_layer":
                self._maybe_capture(s, stage.index + 1, gen)
        del layer
        return record

    @staticmethod
    def _outputs(stage: Stage, gen: Generation, key: str) -> list:
        """The new stream list ``key`` (``feat_``-prefixed for the projector); the vision head's are dropped."""
        if stage.kind == "vision_head":
            return []
        return gen.new_list(("feat_" if stage.kind == "projector" else "") + key)

    def _float_pass(self, stage: Stage, layer: nn.Module, linears: dict[str, nn.Linear], s: Streams,
                    gen: Generation) -> tuple[list, dict[str, torch.Tensor]]:
        """Every sample through the float layer: its outputs and the float statistics (input moments if asked)."""
        moments_for = sorted({self.arch.shared_inputs(stage)[n][len(stage.prefix):]
                              for n in self.quantized if stage.owns(n)}) if self.recipe.input_moments else ()
        rec = InputRecorder(linears, self.rows_per_call, moments_for)
        weights = self._token_weights() if moments_for and stage.kind == "text_layer" else None
        out = self._outputs(stage, gen, "flt")
        for j, h in enumerate(s.feat_flt if stage.kind == "projector" else s.flt):
            rec.row_weights = None if weights is None else weights[j]
            out.append(self._forward(stage, layer, h, j, s))
            self.progress.sub_advance()
        rec.remove()
        float_stats = rec.result()
        for g in self.arch.smooth_groups(stage):  # Linears of one group share their input: keep one copy of the rows
            for name in g.linears[1:]:
                float_stats.pop(f"float.{name[len(stage.prefix):]}.rows", None)
        return out, float_stats

    def _smooth_stage(self, stage: Stage, layer: nn.Module, m2_groups: list[SmoothGroup], float_stats: dict,
                      s: Streams, record: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Fold the recipe's smoothing into ``layer`` and record it; returns sample 0's m2 stream output."""
        groups = self.arch.smooth_groups(stage)
        m2_in = s.feat_m2 if stage.kind == "projector" else s.m2
        m2_out = None
        if m2_groups:
            m2_out, smooth = self._m2_layer(stage, layer, m2_in, s, m2_groups)
            self.progress.sub_advance()
        elif self.recipe.anti_outlier == "m1" and groups:
            smooth = self._m1_layer(stage, layer, groups, float_stats)
        else:
            smooth = {}
            if m2_in is not None and stage.kind != "vision_head":  # a layer m2 leaves as it is: sample 0, float
                m2_out = self._forward(stage, layer, m2_in, 0, s, count=False)
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
        return m2_out

    def _fake_quant_pass(self, stage: Stage, layer: nn.Module, linears: dict[str, nn.Linear], s: Streams,
                         gen: Generation, record: dict[str, torch.Tensor]) -> list:
        """Every sample through the smoothed layer with fake-quant Linears; records their observers' results."""
        fq_mods = {}
        for rel, lin in linears.items():
            full = stage.prefix + rel
            if full in self.quantized:
                fq_mods[full] = FakeQuantLinear(lin, self.recipe.observer)
                set_submodule(layer, rel, fq_mods[full])
        fq_out = self._outputs(stage, gen, "fq")
        for j, h in enumerate(s.feat_fq if stage.kind == "projector" else s.fq):
            fq_out.append(self._forward(stage, layer, h, j, s))
            self.progress.sub_advance()
        for full, m in fq_mods.items():
            record[f"act.{full}.input_scale"] = m.input_scale.reshape(1).float()
            record[f"act.{full}.input_offset"] = m.input_offset.reshape(1).float()
            record[f"act.{full}.x_min"] = m.x_min.reshape(1).float()
            record[f"act.{full}.x_max"] = m.x_max.reshape(1).float()
            for k, v in m.observer.state_dict().items():
                record[f"obs.{full}.{k}"] = v
        return fq_out

    @staticmethod
    def _full(stage: Stage, key: str) -> str:
        kind, _, rest = key.partition(".")
        return f"{kind}.{stage.prefix}{rest}"
