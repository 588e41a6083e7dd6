"""quant/tensor_stream.py: the dtype a float tensor is stored in (issue 30: lossless casts only)."""

from __future__ import annotations

import torch

from llavaq.quant.tensor_stream import holds_exactly, storage_dtype


def test_holds_exactly_per_dtype():  # chunk=7: several chunks, the last one partial
    unchanged = torch.randn(5, 9).half().float()  # a float16 checkpoint tensor read as float32
    assert holds_exactly(unchanged, torch.float16, chunk=7) and not holds_exactly(unchanged, torch.bfloat16)
    smoothed = unchanged / torch.full((9,), 3.0)  # a norm times a smoothing scale: more bits than float16 has
    assert not holds_exactly(smoothed, torch.float16, chunk=7)
    last = unchanged.clone()
    last[-1, -1] += 2.0**-20  # one value in the last chunk
    assert not holds_exactly(last, torch.float16, chunk=7)
    assert holds_exactly(smoothed, torch.float32)


def test_storage_dtype_widens_only_what_would_round():
    unchanged = torch.randn(64).bfloat16().float()
    smoothed = unchanged * 1.001
    assert storage_dtype(unchanged, torch.bfloat16, exact=True) == torch.bfloat16
    assert storage_dtype(smoothed, torch.bfloat16, exact=True) == torch.float32
    assert storage_dtype(smoothed, torch.bfloat16, exact=False) == torch.bfloat16  # --float_dtype given: as asked
    assert storage_dtype(smoothed, torch.float32, exact=True) == torch.float32
