"""Layer streaming: streamed == in-memory output bytes; peak live weight bytes do not grow with depth."""

from __future__ import annotations

import weakref

import pytest

import llavaq.model.loading as loading_mod
import llavaq.pipeline.calibration as calibration_mod
from llavaq import api
from llavaq.model.checkpoint import Checkpoint, InMemoryCheckpoint
from llavaq.recipe import QuantRecipe
from llavaq.testing import build_tiny_llava


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "llavaq_record.json"}


@pytest.mark.parametrize("part", [None, 0.00002])
def test_streamed_and_in_memory_quantization_are_byte_identical(tiny_model, calib_dir, tmp_path, monkeypatch, part):
    streamed = tmp_path / "streamed"
    api.quantize(tiny_model, calib_dir, streamed, cache_dir=tmp_path / "c1", device_type="cpu", part_file_size=part)
    monkeypatch.setattr(loading_mod, "Checkpoint", InMemoryCheckpoint)  # everything read into RAM first
    in_mem = tmp_path / "in_memory"
    api.quantize(tiny_model, calib_dir, in_mem, cache_dir=tmp_path / "c2", device_type="cpu", part_file_size=part)
    a, b = _files(streamed), _files(in_mem)
    assert a.keys() == b.keys() and any(n.endswith(".safetensors") for n in a)
    if part:
        assert sum(n.endswith(".safetensors") for n in a) > 1
    for name in a:
        assert a[name] == b[name], name


class LiveWeights:
    """Live bytes of the tensors ``Checkpoint.tensor`` handed out (freed ones subtracted), and the peak."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def wrap(self, real):
        def tensor(ckpt, name, dtype=Checkpoint.tensor.__defaults__[0]):
            t = real(ckpt, name, dtype)
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
            return t

        return tensor


def _peak(model, calib, tmp, monkeypatch) -> tuple[int, int]:
    lw = LiveWeights()
    monkeypatch.setattr(Checkpoint, "tensor", lw.wrap(REAL_TENSOR))
    api.quantize(model, calib, tmp / "out", QuantRecipe(anti_outlier="m1"), cache_dir=tmp / "cache",
                 device_type="cpu")
    monkeypatch.setattr(Checkpoint, "tensor", REAL_TENSOR)
    return lw.peak, lw.live


REAL_TENSOR = Checkpoint.tensor


def test_peak_weight_memory_does_not_grow_with_layers(calib_dir, tmp_path, monkeypatch):
    peaks = {}
    for n in (8, 24):
        model = build_tiny_llava(tmp_path / f"m{n}", text_layers=n, vision_layers=n // 4, hidden=96,
                                 intermediate=192, seed=n)
        total = Checkpoint(model).total_bytes
        peak, _ = _peak(model, calib_dir, tmp_path / f"q{n}", monkeypatch)
        peaks[n] = (peak, total)
    (p8, t8), (p24, t24) = peaks[8], peaks[24]
    assert t24 > 2.5 * t8  # the model really is three times as deep
    assert p24 <= 1.05 * p8, peaks  # ... but the most weight bytes alive at once did not grow
    assert p24 < 0.25 * 2 * t24  # and is a small fraction of the fp32 model


def test_summary_line_reports_time_memory_and_size(monkeypatch):
    import resource

    from llavaq import progress

    class RU:
        def __init__(self, kib):
            self.ru_maxrss = kib

    monkeypatch.setattr(resource, "getrusage",
                        lambda who: RU(3 * 2**20 if who == resource.RUSAGE_SELF else 2**19))
    line = progress.summary_line(125.25, 7 * 2**30 + 2**29, 3)
    assert line == "done in 2m05.2s; peak memory 3.00 GiB (process, children 0.50 GiB); output 7.50 GiB in 3 files"


def test_round_robin_devices_give_the_same_output(tiny_model, calib_dir, tmp_path, monkeypatch):
    import torch

    from llavaq.calib.engine import CalibrationEngine
    from llavaq.device import resolve_devices

    assert resolve_devices("cpu") == [torch.device("cpu")]
    one = tmp_path / "one"
    api.quantize(tiny_model, calib_dir, one, cache_dir=tmp_path / "c1", device_type="cpu")
    seen = []
    real = CalibrationEngine.run_stage

    def spy(self, stage, *args):
        seen.append((stage.name, self.device))
        return real(self, stage, *args)

    monkeypatch.setattr(CalibrationEngine, "run_stage", spy)
    monkeypatch.setattr(calibration_mod, "resolve_devices", lambda dt: [torch.device("cpu", 0), torch.device("cpu", 1)])
    two = tmp_path / "two"
    api.quantize(tiny_model, calib_dir, two, cache_dir=tmp_path / "c2", device_type="cpu")
    assert [d.index for _, d in seen] == [i % 2 for i in range(len(seen))] and len(seen) == 5
    assert _files(one) == _files(two)


class ProgressLog:
    """A Progress that records what the bars would show."""

    def __init__(self) -> None:
        self.stages: list[list] = []  # [description, total, advanced]
        self.subs: list[list] = []

    def stage(self, description, total):
        self.stages.append([description, total, 0])

    def advance(self, n=1):
        self.stages[-1][2] += n

    def sub(self, description, total):
        self.subs.append([description, total, 0])

    def sub_advance(self, n=1):
        self.subs[-1][2] += n

    def log(self, message):
        pass


def test_progress_goes_over_every_layer_and_sample(tiny_model, calib_dir, quantized, tmp_path):
    log = ProgressLog()
    api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu", progress=log)
    stages = quantized[0].cache.manifest["stages_done"]
    assert log.stages == [["Calibrating layers", len(stages), len(stages)]]
    n = len(list(calib_dir.iterdir()))
    # per layer: the float pass and the fake-quant pass over every sample, and the m2 search (the
    # projector has no smoothing group)
    m2 = {name: int(name != "projector") for name in stages}
    assert log.subs == [[name, 2 * n + m2[name], 2 * n + m2[name]] for name in stages]
