"""llavaq.memory: freed heap blocks go back to the OS (the calibration's RSS follows its live tensors)."""

from __future__ import annotations

import pytest
import torch

from llavaq.memory import release_free_memory


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not release_free_memory(), reason="needs glibc's malloc_trim")
def test_freed_heap_blocks_are_returned_to_the_os():
    # after a large block is freed, glibc serves blocks of that size from the heap, where small
    # survivors between them keep the freed pages resident (what a layer forward per sample does)
    first = torch.ones(8 << 20, dtype=torch.uint8)
    del first
    big, small = [], []
    for _ in range(64):
        big.append(torch.ones(4 << 20, dtype=torch.uint8))  # touched: 4 MiB resident each
        small.append(torch.ones(64, dtype=torch.uint8))
    before = _rss()
    big.clear()
    kept = _rss()
    release_free_memory()
    after = _rss()
    assert kept - after > 128 << 20, (before >> 20, kept >> 20, after >> 20)  # most of the 256 MiB came back
    assert len(small) == 64
