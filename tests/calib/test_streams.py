"""Calibration streams on disk: same results as in memory, memory flat in the number of samples, resumable."""

from __future__ import annotations

import gc
import os
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llavaq.calib.streams as streams_mod
from llavaq import api
from llavaq.calib.cache import SessionCache
from llavaq.calib.engine import CalibrationEngine
from llavaq.calib.streams import StateList, Streams, StreamStore
from llavaq.cli import main
from llavaq.errors import CacheError
from llavaq.progress import NullProgress
from llavaq.recipe import QuantRecipe
from llavaq.testing import build_tiny_llava, write_test_images


class Logs(NullProgress):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def _spilled(logs: Logs) -> bool:
    return any("keeping the rest on disk" in ln for ln in logs.lines)


def _same_cache(a: SessionCache, b: SessionCache) -> None:
    assert a.manifest["stages_done"] == b.manifest["stages_done"]
    assert a.manifest["forward_passes"] == b.manifest["forward_passes"]
    for st in a.manifest["stages_done"]:
        x, y = load_file(str(a.stage_file(st))), load_file(str(b.stage_file(st)))
        assert sorted(x) == sorted(y), st
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (st, k)


# ------------------------------------------------------------------------------------------ the store itself
def test_state_list_keeps_within_budget_and_reads_the_rest_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1, 5, 8, generator=g) for _ in range(4)]  # 160 bytes each
    want = [t.clone() for t in ts]
    store = StreamStore(tmp_path / "streams", budget_bytes=2 * 160 + 10)
    gen = store.begin(1)
    lst = gen.new_list("fq")
    for t in ts[:2]:
        lst.append(t)
    lst.append(None)
    for t in ts[2:]:
        lst.append(t)
    assert len(lst) == 5 and store.resident == 320 and store.spilled == 320
    assert lst[0] is ts[0] and lst[1] is ts[1] and lst[2] is None  # resident: the same tensors
    assert lst[3] is not ts[2] and torch.equal(lst[3], ts[2]) and torch.equal(lst[4], ts[3])  # read back
    assert [f is None for f in lst.files] == [False, False, True, False, False]  # every tensor has its file
    # carried into the next generation: hard links, the resident tensors shared
    nxt = store.begin(2)
    moved = nxt.carry("fq", lst)
    assert os.stat(moved.files[3]).st_ino == os.stat(lst.files[3]).st_ino
    assert moved[0] is ts[0] and moved[2] is None and torch.equal(moved[4], ts[3])
    # sealed and loaded back (nothing resident after a load), older generations removed
    s = Streams(fq=moved, flt=nxt.carry("flt", [ts[0], ts[1]]), masks=nxt.carry("masks", [None, ts[2]]),
                positions=[torch.arange(5)[None]], m2=ts[0])
    s.carry_into(nxt)
    nxt.seal(s, 7)
    store.keep_only(2)
    del lst, moved, s, ts
    gc.collect()
    assert store.resident == 0  # freeing the tensors releases the budget
    assert [p.name for p in store.root.iterdir()] == ["0002"]
    loaded, n = store.latest_sealed().load()
    assert n == 7 and len(loaded.fq) == 5 and loaded.fq[2] is None
    assert all(torch.equal(loaded.fq[j], t) for j, t in zip((0, 1, 3, 4), want, strict=True))
    assert torch.equal(loaded.masks[1], want[2]) and loaded.masks[0] is None and len(loaded.feat_fq) == 0
    assert torch.equal(loaded.m2, want[0]) and loaded.feat_m2 is None
    assert torch.equal(loaded.positions[0], torch.arange(5)[None]) and store.resident == 0


def test_unsealed_generation_is_not_a_resume_point_and_corruption_is_a_clear_error(tmp_path):
    store = StreamStore(tmp_path / "session" / "streams", budget_bytes=0)
    gen = store.begin(3)
    gen.new_list("fq").append(torch.ones(2, 2))
    assert store.latest_sealed() is None
    lst = gen.new_list("flt")
    lst.append(torch.ones(3))
    lst.files[0].write_bytes(b"not a safetensors file")
    with pytest.raises(CacheError, match="corrupted calibration stream file"):
        lst[0]


def test_seal_flushes_the_new_files_then_the_index_then_the_directory(tmp_path, monkeypatch):
    """A sealed generation must be readable after a power cut: its tensor files reach the disk before its
    index, and the directory (file names, links, the index's rename) after it."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = StreamStore(tmp_path / "streams", budget_bytes=1 << 20)
    first = store.begin(1)
    s1 = Streams(fq=first.carry("fq", [torch.full((2, 4), float(j)) for j in range(3)]))
    s1.carry_into(first)
    first.seal(s1, 1)
    index = next(i for i, p in enumerate(synced) if p.name.startswith(".streams.json.tmp"))
    assert all(f in synced[:index] for f in s1.fq.files)  # every tensor file before the index
    assert synced[-1] == first.path
    # the next generation links the unchanged stream (flushed already) and flushes only its new file
    synced.clear()
    second = store.begin(2)
    s2 = Streams(fq=s1.fq, flt=second.carry("flt", [torch.ones(3)]))
    s2.carry_into(second)
    second.seal(s2, 2)
    flushed = {p for p in synced if p.suffix == ".safetensors" and not p.name.startswith(".")}
    assert flushed == set(s2.flt.files) and len(s2.fq.files) == 3
    assert synced[-1] == second.path


# ------------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("budget_gb", [0.0, 3 * 20_000 / 2**30], ids=["all-on-disk", "partly-resident"])
def test_streams_on_disk_give_the_same_cache_and_output_bytes(tiny_model, calib_dir, quantized, tmp_path, budget_gb,
                                                             monkeypatch):
    logs, stores = Logs(), []
    real_run = CalibrationEngine.run

    def run(self):
        stores.append(self.streams)
        return real_run(self)

    monkeypatch.setattr(CalibrationEngine, "run", run)
    cal, res = api.quantize(tiny_model, calib_dir, tmp_path / "out", cache_dir=tmp_path / "c", device_type="cpu",
                            progress=logs, stream_memory_gb=budget_gb)
    assert _spilled(logs) and not (cal.cache.path / "streams").exists()
    (store,) = stores
    assert store.spilled > 0 and (store.peak_resident > 0) == (budget_gb > 0)  # partly resident: some of both
    ref_cal, ref_res = quantized
    assert not cal.reused and cal.cache.path.name == ref_cal.cache.path.name  # same session identity
    _same_cache(cal.cache, ref_cal.cache)
    names = [f for f in res.files if f != "llavaq_record.json"]
    assert names == [f for f in ref_res.files if f != "llavaq_record.json"] and names
    for f in names:
        assert (res.save_directory / f).read_bytes() == (ref_res.save_directory / f).read_bytes(), f


def test_the_default_budget_keeps_small_streams_in_memory(tiny_model, calib_dir, tmp_path):
    logs = Logs()
    api.calibrate(tiny_model, calib_dir, QuantRecipe(anti_outlier="m1"), cache_dir=tmp_path, device_type="cpu",
                  progress=logs)
    assert not _spilled(logs)


class LiveStreams:
    """Bytes of stream tensors alive at once: those appended to a stream and those read back."""

    def __init__(self, monkeypatch) -> None:
        self.live = self.peak = 0
        real_append, real_read = StateList.append, streams_mod.read_tensor

        def append(lst, t):
            self._track(t)
            real_append(lst, t)

        def read(path):
            return self._track(real_read(path))

        monkeypatch.setattr(StateList, "append", append)
        monkeypatch.setattr(streams_mod, "read_tensor", read)

    def _track(self, t):
        if t is not None:
            n = t.numel() * t.element_size()
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.live -= n


def test_stream_memory_on_disk_does_not_grow_with_the_number_of_samples(tmp_path, monkeypatch):
    model = build_tiny_llava(tmp_path / "m", text_layers=3, vision_layers=2, seed=5)
    peaks = {}
    for n in (2, 8):
        images = write_test_images(tmp_path / f"img{n}", sizes=[(48, 40)] * n, seed=n)
        for budget in (0.0, None):
            live = LiveStreams(monkeypatch)
            api.calibrate(model, images, QuantRecipe(anti_outlier="m1"), cache_dir=tmp_path / f"c{n}-{budget}",
                          device_type="cpu", stream_memory_gb=budget)
            monkeypatch.undo()
            peaks[n, budget] = live.peak
    # in memory (the default budget here) the streams of all samples are alive at once ...
    assert peaks[8, None] > 3 * peaks[2, None], peaks
    # ... on disk only the sample being worked on: four times the samples, the same peak
    assert peaks[8, 0.0] <= 1.05 * peaks[2, 0.0], peaks
    assert peaks[8, 0.0] < 0.2 * peaks[8, None], peaks


def test_calibration_with_streams_on_disk_resumes_to_the_same_cache(tiny_model, calib_dir, quantized, tmp_path,
                                                                     monkeypatch):
    ref = quantized[0].cache
    stages = ref.manifest["stages_done"]
    real = SessionCache.write_stage

    def flaky(self, stage, *args):
        if stage == stages[4]:
            raise KeyboardInterrupt
        return real(self, stage, *args)

    monkeypatch.setattr(SessionCache, "write_stage", flaky)
    with pytest.raises(KeyboardInterrupt):
        api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu", stream_memory_gb=0)
    monkeypatch.undo()
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    (gen,) = (path / "streams").iterdir()  # only the sealed resume point: the unsealed one was removed
    assert gen.name == "0004" and (gen / "streams.json").is_file()
    assert {f.name.split(".")[0] for f in gen.glob("*.safetensors")} >= {"fq", "flt", "small"}
    cal = api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu")  # resumed in memory
    assert cal.cache.path == path and cal.cache.complete and not (path / "streams").exists()
    _same_cache(cal.cache, ref)


def test_negative_stream_memory_is_a_one_line_error(tiny_model, calib_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["llavaq", "quantize", "--model_path", str(tiny_model), "--calib_images",
                                      str(calib_dir), "--save_directory", str(out), "--cache_dir",
                                      str(tmp_path / "c"), "--stream_memory_gb", "-1"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code not in (0, None)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[-1] == "error: --stream_memory_gb must be a number of GB >= 0, not -1.0"
    assert not out.exists() and not (tmp_path / "c").exists()


def test_full_disk_while_writing_streams_is_a_one_line_error_and_resumes(tiny_model, calib_dir, quantized, tmp_path,
                                                                        monkeypatch, capsys):
    import errno

    real, calls = streams_mod.save_file_streamed, {"n": 0}

    def full(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 25:  # in the projector, after two sealed layers
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(streams_mod, "save_file_streamed", full)
    monkeypatch.setattr(sys, "argv", ["llavaq", "calibrate", "--model_path", str(tiny_model), "--calib_images",
                                      str(calib_dir), "--cache_dir", str(tmp_path), "--device_type", "cpu",
                                      "--stream_memory_gb", "0"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: cannot write calibration stream file")
    assert lines[-1].endswith("(No space left on device)")
    (session,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    gens = list((session / "streams").iterdir())
    assert gens and all((g / "streams.json").is_file() for g in gens)  # only sealed resume points are left
    monkeypatch.undo()
    cal = api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu", stream_memory_gb=0)
    assert cal.cache.path == session and cal.cache.complete
    _same_cache(cal.cache, quantized[0].cache)
