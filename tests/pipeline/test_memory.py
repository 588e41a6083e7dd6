"""llavaq.memory: freed heap blocks go back to the OS (the calibration's RSS follows its live tensors)."""

from __future__ import annotations

import pytest
import torch

from llavaq.memory import IdleMemoryTrimmer, release_free_memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not release_free_memory(), reason="needs glibc's malloc_trim")
def test_freed_heap_blocks_are_returned_to_the_os():
    # 64 KiB blocks always come from the heap (below glibc's smallest mmap threshold); small survivors
    # between them keep the heap from shrinking at its top when they are freed, as the statistics and
    # row samples a layer forward leaves behind do
    big, small = [], []
    for _ in range(4096):
        big.append(torch.ones(64 << 10, dtype=torch.uint8))  # touched: resident
        small.append(torch.ones(64, dtype=torch.uint8))
    trimmer = IdleMemoryTrimmer(slack=128 << 20)
    assert trimmer() is False  # the first call only takes the level
    big.clear()
    kept = _rss()
    assert IdleMemoryTrimmer(slack=1 << 40)() is False
    assert trimmer() is True and trimmer.trims == 1  # 256 MiB freed but resident: more than the slack
    after = _rss()
    assert kept - after > 128 << 20, (kept >> 20, after >> 20)  # most of the 256 MiB went back
    assert trimmer() is False  # nothing new since
    assert len(small) == 4096
