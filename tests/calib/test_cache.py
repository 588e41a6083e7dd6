"""Issue #4: the session cache resumes after an interrupt and refuses another model."""

from __future__ import annotations

import sys

import pytest
from safetensors.torch import load_file

from llavaq import api
from llavaq.calib.cache import SessionCache
from llavaq.cli import main


def test_interrupted_calibration_resumes_to_identical_cache(tiny_model, calib_dir, quantized, tmp_path, monkeypatch):
    ref_cache = quantized[0].cache
    stages = ref_cache.manifest["stages_done"]
    k = 2  # finish vision 0, vision 1, projector; interrupt while writing text_layer.0
    real = SessionCache.write_stage

    def flaky(self, stage, tensors, forward_passes, streams=None):
        if stage == stages[k + 1]:
            raise KeyboardInterrupt
        return real(self, stage, tensors, forward_passes, streams)

    monkeypatch.setattr(SessionCache, "write_stage", flaky)
    with pytest.raises(KeyboardInterrupt):
        api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu")
    monkeypatch.setattr(SessionCache, "write_stage", real)
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    part = SessionCache.load(path)
    assert part.manifest["stages_done"] == stages[: k + 1] and not part.complete
    # the resume point: the sealed streams after stage k; the generation being written was removed
    assert sorted(p.name for p in (path / "streams").iterdir()) == [f"{k + 1:04d}"]
    assert (path / "streams" / f"{k + 1:04d}" / "streams.json").is_file()
    with pytest.raises(Exception, match="incomplete"):
        api.export(tiny_model, path, tmp_path / "never", format="fakequant")
    assert not (tmp_path / "never").exists()

    cal = api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu")
    assert cal.cache.path == path and cal.cache.complete
    assert cal.cache.manifest["stages_done"] == stages
    assert cal.forward_passes == ref_cache.manifest["forward_passes"]
    assert not (path / "streams").exists()
    for st in stages:
        a, b = load_file(str(cal.cache.stage_file(st))), load_file(str(ref_cache.stage_file(st)))
        assert sorted(a) == sorted(b), st
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].equal(b[key]), (st, key)


def test_cache_of_another_model_is_refused(quantized, tiny_model_mha, tmp_path, monkeypatch, capsys):
    cache = quantized[0].cache.path
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["llavaq", "export", "--model_path", str(tiny_model_mha), "--cache", str(cache),
                                      "--save_directory", str(out), "--format", "compressed-tensors"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and "another model" in lines[0] and "tensor names/shapes" in lines[0]
    assert str(tiny_model_mha) in lines[0].replace("\n", "")
    assert "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.parametrize("k", [1, 3])
def test_interrupt_between_streams_and_manifest_resumes_correctly(tiny_model, calib_dir, quantized, tmp_path,
                                                                  monkeypatch, k):
    """Ctrl-C after stage k's record and streams are on disk but before the manifest lists it."""
    ref_cache = quantized[0].cache
    stages = ref_cache.manifest["stages_done"]
    real = SessionCache.save_manifest
    calls = {"n": 0}

    def flaky(self):
        if self.manifest.get("stages_done") and self.manifest["stages_done"][-1] == stages[k]:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(SessionCache, "save_manifest", flaky)
    with pytest.raises(KeyboardInterrupt):
        api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu")
    monkeypatch.setattr(SessionCache, "save_manifest", real)
    assert calls["n"] == 1
    cal = api.calibrate(tiny_model, calib_dir, cache_dir=tmp_path, device_type="cpu")
    assert cal.cache.complete and cal.cache.manifest["stages_done"] == stages
    for st in stages:
        a, b = load_file(str(cal.cache.stage_file(st))), load_file(str(ref_cache.stage_file(st)))
        assert sorted(a) == sorted(b), st
        assert all(a[key].equal(b[key]) for key in a), st
