"""Issue 23: the float side of ``verify`` computed once per model and kept in the session cache (sha256-checked)."""

from __future__ import annotations

import json

import pytest

import llavaq.verify.paired as paired
from llavaq.errors import CacheError
from llavaq.verify import FloatReference, float_side_dir, verify
from llavaq.verify.reference import INDEX

HELDOUT = "A rocket stands on the launch pad under a blue sky. The cat sat on the table. " * 5


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory, calib_dir):
    d = tmp_path_factory.mktemp("eval_fs")
    image = sorted(p.name for p in calib_dir.iterdir())[0]
    (d / "prompts.json").write_text(json.dumps([{"image": image, "question": "What is in the picture?"},
                                                {"question": "Where is the rocket?"}]))
    (d / "heldout.txt").write_text(HELDOUT)
    return dict(images=calib_dir, prompts=d / "prompts.json", text=d / "heldout.txt", answer_tokens=3, ppl_window=32)


def _numbers(r):
    return (r.ppl_fp, r.ppl_q, r.top1, r.kl, r.cosine, [p.answer for p in r.prompts],
            [(e.name, e.rel_mse) for e in r.worst_layers])


def test_float_side_is_computed_once_and_read_back_from_the_cache(quantized, tiny_model, small_eval, tmp_path,
                                                                  monkeypatch):
    _, res = quantized
    fresh = verify(tiny_model, res.save_directory, **small_eval)
    first = verify(tiny_model, res.save_directory, cache_dir=tmp_path, **small_eval)
    from llavaq.model.loading import open_model

    root = float_side_dir(tmp_path, open_model(tiny_model).ckpt.fingerprint())
    ref = FloatReference(root)
    n_windows = len(ref) - 2
    assert n_windows >= 2 and (root / INDEX).is_file()  # 2 prompts + the windows, one file each
    # the second call neither generates nor streams the float model: the float stages are built only for the
    # per-Linear errors' weights, and no float logits are computed
    monkeypatch.setattr(paired, "greedy_answers", lambda *a, **k: pytest.fail("answers generated again"))
    second = verify(tiny_model, res.save_directory, float_reference=ref, **small_eval)
    assert ref.reads >= len(ref)
    assert _numbers(first) == _numbers(fresh) == _numbers(second)


def test_a_changed_float_side_file_is_refused_in_one_line(quantized, tiny_model, small_eval, tmp_path):
    _, res = quantized
    verify(tiny_model, res.save_directory, cache_dir=tmp_path, layer_errors=False, **small_eval)
    root = next((tmp_path / "float-side").iterdir())
    victim = next(root.glob("*.safetensors"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="corrupted float-side file"):
        verify(tiny_model, res.save_directory, cache_dir=tmp_path, layer_errors=False, **small_eval)
