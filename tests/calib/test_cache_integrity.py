"""Issue 24: no corrupted state is ever trusted. Every session-cache file has a sha256 in the manifest and the
manifest has its own; the full weights digest (every tensor byte, hashed as read) keys exports."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from hostile_guard import cli, guard, one_error  # noqa: F401  (guard is a fixture)
from safetensors.torch import load_file, save_file

from llavaq import api
from llavaq.calib.cache import SessionCache
from llavaq.errors import CacheError
from llavaq.model.checkpoint import Checkpoint


def _flip_bit(c: Path) -> str:
    f = sorted(c.glob("stage-*.safetensors"))[-1]
    b = bytearray(f.read_bytes())
    b[-3] ^= 0x10  # inside the tensor data: the file still parses, with one wrong value
    f.write_bytes(bytes(b))
    return f.name


def _swap(c: Path) -> str:
    a, b = sorted(c.glob("stage-text_layer.*.safetensors"))[:2]
    tmp = a.with_suffix(".x")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    return a.name


def _edit_manifest(c: Path) -> str:
    m = json.loads((c / "manifest.json").read_text())
    m["recipe"]["act_method"] = 1  # a plausible hand edit
    (c / "manifest.json").write_text(json.dumps(m, indent=2))
    return "manifest.json"


def _edit_checksum_too(c: Path) -> str:
    m = json.loads((c / "manifest.json").read_text())
    name = sorted(m["files"])[0]
    m["files"][name] = "0" * 64
    (c / "manifest.json").write_text(json.dumps(m, indent=2))
    return "manifest.json"


CASES = {"flipped_bit": _flip_bit, "swapped_stages": _swap, "edited_manifest": _edit_manifest,
         "edited_file_sums": _edit_checksum_too}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupted_cache_refused_by_export(case, model, full_cache, tmp_path, guard, capsys):  # noqa: F811
    name = CASES[case](full_cache)
    guard.watch(model, full_cache)
    save = tmp_path / "out"
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", save)
    line = one_error(res, str(full_cache / name), "calibrate again")
    assert "sha256" in line or "checksum" in line
    assert not save.exists()


@pytest.mark.parametrize("case", ["flipped_bit", "swapped_stages", "edited_manifest"])
def test_corrupted_cache_refused_by_inspect(case, full_cache, guard, capsys):  # noqa: F811
    CASES[case](full_cache)
    guard.watch(full_cache)
    one_error(cli(capsys, "inspect", full_cache), "calibrate again")


def test_manifest_records_every_stage_file_and_itself(full_cache):
    m = json.loads((full_cache / "manifest.json").read_text())
    stages = sorted(p.name for p in full_cache.glob("stage-*.safetensors"))
    assert sorted(m["files"]) == stages and len(stages) == len(m["stages_done"])
    for n in stages:
        assert m["files"][n] == hashlib.sha256((full_cache / n).read_bytes()).hexdigest()
    assert len(m["checksum"]) == 64 and len(m["weights_sha256"]) == 64
    SessionCache.load(full_cache)  # intact: loads


def _independent_weights_sha256(model: Path) -> str:
    sd = load_file(str(model / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(f"{name}:{hashlib.sha256(sd[name].contiguous().view(-1).numpy().view('u1')).hexdigest()};".encode())
    return h.hexdigest()


def test_weights_digest_covers_every_byte(model, quantized):
    cal, _ = quantized
    want = _independent_weights_sha256(model)
    assert Checkpoint(model).weights_sha256() == want == cal.cache.manifest["weights_sha256"]
    sd = load_file(str(model / "model.safetensors"))
    name = sorted(sd)[len(sd) // 2]
    sd[name].view(-1)[-1] += 1  # one element of one tensor
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert Checkpoint(model).weights_sha256() == _independent_weights_sha256(model) != want


def test_other_weights_past_the_sampled_screen_refused(model, full_cache, tmp_path, monkeypatch, guard, capsys):  # noqa: F811
    """Same shapes, other weights, and the sampled fingerprint agrees (a byte outside its 16 windows on a large
    file): the full digest, hashed while exporting, refuses the cache and nothing is written."""
    sd = load_file(str(model / "model.safetensors"))
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    sd[name].view(-1)[7] *= -1
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    real = json.loads((full_cache / "manifest.json").read_text())["fingerprint"]
    monkeypatch.setattr(Checkpoint, "fingerprint", lambda self: dict(real))  # the screen cannot tell
    guard.watch(model, full_cache)
    save = tmp_path / "out"
    res = cli(capsys, "export", "--model_path", model, "--cache", full_cache, "--save_directory", save)
    one_error(res, "another model", "weights", str(model), "run calibrate")
    assert not save.exists() and not list(tmp_path.glob(".out.llavaq-*"))


def test_quantize_reusing_a_cache_of_other_weights_refused(model, calib_dir, quantized, tmp_path, monkeypatch):
    cal, _ = quantized
    cache_dir = tmp_path / "c"
    shutil.copytree(cal.cache.path, cache_dir / cal.cache.path.name)
    sd = load_file(str(model / "model.safetensors"))
    sd["language_model.lm_head.weight"].view(-1)[0] += 1
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(Checkpoint, "fingerprint", lambda self: dict(cal.cache.manifest["fingerprint"]))
    with pytest.raises(CacheError, match="weights of .* differ"):
        api.quantize(model, calib_dir, tmp_path / "out", cache_dir=cache_dir, device_type="cpu")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- verify's inputs
def test_verify_refuses_an_output_of_another_model_before_any_forward(quantized, tiny_model_mha, monkeypatch,
                                                                      capsys):
    import llavaq.verify.fidelity as v

    _, exp = quantized
    rec = json.loads((exp.save_directory / "llavaq_record.json").read_text())
    assert len(rec["model_fingerprint"]["weights_sha256"]) == 64
    monkeypatch.setattr(v, "StreamedVerify", lambda *a, **k: pytest.fail("forward pass before the check"))
    res = cli(capsys, "verify", "--model_path", tiny_model_mha, "--quantized", exp.save_directory)
    one_error(res, "made from another model", str(tiny_model_mha), "--force")


def test_verify_force_skips_the_model_check_only(quantized, tiny_model_mha, monkeypatch):
    import llavaq.verify.fidelity as v

    _, exp = quantized
    monkeypatch.setattr(v, "StreamedVerify", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("reached")))
    with pytest.raises(RuntimeError, match="reached"):
        v.verify(tiny_model_mha, exp.save_directory, force=True)


def test_verify_tokenizer_mismatch_is_one_line_before_any_forward(quantized, tmp_path, monkeypatch, capsys):
    import llavaq.verify.fidelity as v

    cal, exp = quantized
    out = Path(shutil.copytree(exp.save_directory, tmp_path / "q"))
    name = next(n for n in ("tokenizer.json", "tokenizer_config.json") if (out / n).is_file())
    f = out / name
    f.chmod(0o644)
    data = json.loads(f.read_text())
    data["model_max_length"] = 7
    f.write_text(json.dumps(data))
    monkeypatch.setattr(v, "StreamedVerify", lambda *a, **k: pytest.fail("forward pass before the check"))
    res = cli(capsys, "verify", "--model_path", cal.cache.manifest["model_path"], "--quantized", out)
    one_error(res, str(f), "tokenizer")
