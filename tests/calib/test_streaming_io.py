"""Streaming I/O: positional-read checkpoint vs safe_open, streaming writer vs save_file (byte identity)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llavaq.formats.sharding import TensorSpec, plan_shards, save_file_streamed, write_safetensors
from llavaq.model.checkpoint import Checkpoint, InMemoryCheckpoint

DTYPES = [torch.int8, torch.int32, torch.int64, torch.float16, torch.float32, torch.bfloat16, torch.uint8,
          torch.bool, torch.float64, torch.int16]


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    names = ["z.kernel", "a.bias", "m.scale", "b.0", "b.10", "b.2", "layers.3.q", "layers.12.q", "Émoji.é", "x"]
    shapes = [(7, 5), (3,), (4, 1), (), (2, 3, 4), (0,), (9,), (1, 1), (6,), (5, 2)]
    for k, (name, shape) in enumerate(zip(names * 3, shapes * 3, strict=True)):
        dt = DTYPES[(k * 7) % len(DTYPES)]
        v = torch.randn(shape, generator=g) * 50
        t = (v > 0) if dt == torch.bool else v.to(dt)
        out[f"{name}.{k}" if k >= len(names) else name] = t
    return out


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
@pytest.mark.parametrize("planned", [False, True])
def test_streamed_file_is_byte_identical_to_save_file(tmp_path, metadata, planned):
    tensors = mixed_tensors()
    assert {t.dtype for t in tensors.values()} >= {torch.int8, torch.int32, torch.int64, torch.float16,
                                                   torch.float32, torch.bfloat16}
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata=metadata)
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()] if planned else None
    n = save_file_streamed(iter(tensors.items()), tmp_path / "ours.safetensors", metadata, specs)
    ref = (tmp_path / "ref.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == ref
    assert n == sum(t.numel() * t.element_size() for t in tensors.values())
    assert not list(tmp_path.glob(".*"))  # spill file removed


def test_planned_writer_rejects_a_tensor_off_plan(tmp_path):
    specs = [TensorSpec("a", torch.float16, (2,)), TensorSpec("b", torch.int8, (3,))]
    with pytest.raises(RuntimeError, match="planned layout"):
        save_file_streamed(iter([("a", torch.zeros(2, dtype=torch.float16)), ("b", torch.zeros(4, dtype=torch.int8))]),
                           tmp_path / "f.safetensors", None, specs)
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("limit", [None, 200, 1])
def test_shards_are_byte_identical_and_follow_the_rule(tmp_path, planned, limit):
    tensors = mixed_tensors(1)
    specs = [TensorSpec.of(n, t) for n, t in tensors.items()] if planned else None
    out = tmp_path / "out"
    out.mkdir()
    wm = write_safetensors(out, "w", iter(tensors.items()), limit, specs=specs, read_only=False)
    assert list(wm) == list(tensors)
    # the rule, computed independently: flush before a tensor when pending + size >= limit
    shard_of = plan_shards([t.numel() * t.element_size() for t in tensors.values()], limit)
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for (n, t), k in zip(tensors.items(), shard_of, strict=True):
        groups.setdefault(k, {})[n] = t
    files = sorted(p.name for p in out.glob("*.safetensors"))
    if limit is None:
        assert files == ["w.safetensors"]
    else:
        assert files == [f"w-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        assert len(groups) > 1
        index = json.loads((out / "w.safetensors.index.json").read_text())
        assert index["weight_map"] == wm
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f, (_k, group) in zip(files, sorted(groups.items()), strict=True):
        save_file(group, str(tmp_path / "ref.safetensors"))
        assert (out / f).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), f
    assert not list(out.glob(".*"))


def test_plan_shards_matches_buffered_rule():
    assert plan_shards([5, 5, 5, 1], 10) == [0, 1, 2, 2]  # 5+5 >= 10 flushes; 5+1 < 10 stays
    assert plan_shards([20, 1], 10) == [0, 1]  # an oversized tensor gets its own shard
    assert plan_shards([3, 3, 3], None) == [0, 0, 0]


def test_checkpoint_positional_reads_equal_safe_open(tmp_path):
    tensors = mixed_tensors(2)
    (tmp_path / "config.json").write_text("{}")
    a = dict(list(tensors.items())[:12])
    b = dict(list(tensors.items())[12:])
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 + (n in b)}-of-00002.safetensors" for n in tensors}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = Checkpoint(tmp_path)
    mem = InMemoryCheckpoint(tmp_path)
    n = 0
    for fname, part in (("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)):
        with safe_open(str(tmp_path / fname), "pt") as f:
            for name in part:
                ref = f.get_tensor(name)
                for c in (ck, mem):
                    got = c.tensor(name, None)
                    assert got.dtype == ref.dtype and got.shape == ref.shape
                    assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bool else got,
                                       ref.view(torch.uint8) if ref.dtype == torch.bool else ref)
                if ref.is_floating_point():
                    assert torch.equal(ck.tensor(name), ref.float())  # default cast to float32
                n += 1
    assert n == len(tensors)
    # every read is a fresh tensor: in-place edits never leak into later reads
    t = mem.tensor("z.kernel", None)
    t.zero_()
    assert torch.equal(mem.tensor("z.kernel", None), tensors["z.kernel"])
    ck.close()
