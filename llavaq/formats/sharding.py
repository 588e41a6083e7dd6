"""Safetensors writing with msModelSlim's sharding rule (``BufferedSafetensorsWriter``).

Tensors are appended in order; before adding one, if ``pending + size >= limit`` the pending
tensors are flushed to a shard. Shards are named ``<prefix>-0000i-of-0000N.safetensors`` and an
index ``<prefix>.safetensors.index.json`` maps each tensor to its file. Without a limit the model
goes to ``<prefix>.safetensors``. Files are made read-only (0o400) like msModelSlim's.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from llavaq.errors import OutputError

GB = 1024**3


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None, label: str) -> None:
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"no space left on device while writing {label}") from None
        raise OutputError(f"cannot write {label} ({e.strerror or e})") from None


def write_safetensors(
    out_dir: Path,
    prefix: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    part_file_size: int | None,
    *,
    index_name: str | None = None,
    metadata: dict[str, str] | None = None,
    read_only: bool = True,
) -> dict[str, str]:
    """Write tensors (in order) to one file or shards; return {tensor name: file name}."""
    weight_map: dict[str, str] = {}
    if not part_file_size:
        allt = {}
        for name, t in tensors:
            allt[name] = t.contiguous()
        fname = f"{prefix}.safetensors"
        _save(allt, out_dir / fname, metadata, str(out_dir / fname))
        weight_map = {n: fname for n in allt}
        files = [fname]
        total = sum(_nbytes(t) for t in allt.values())
    else:
        shards: list[list[str]] = []
        pending: dict[str, torch.Tensor] = {}
        pending_size = 0
        total = 0
        tmp_names: list[str] = []

        def flush() -> None:
            nonlocal pending, pending_size
            if not pending:
                return
            tmp = f".{prefix}-part{len(tmp_names):05d}.safetensors"
            _save(pending, out_dir / tmp, metadata, f"{out_dir / prefix} shard {len(tmp_names) + 1}")
            tmp_names.append(tmp)
            shards.append(list(pending))
            pending, pending_size = {}, 0

        for name, t in tensors:
            size = _nbytes(t)
            if pending and pending_size + size >= part_file_size:
                flush()
            pending[name] = t.contiguous()
            pending_size += size
            total += size
        flush()
        n = len(tmp_names)
        files = []
        for i, (tmp, names) in enumerate(zip(tmp_names, shards, strict=True)):
            fname = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(out_dir / tmp, out_dir / fname)
            files.append(fname)
            for nm in names:
                weight_map[nm] = fname
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / (index_name or f"{prefix}.safetensors.index.json")).write_text(json.dumps(index, indent=2))
    if read_only:
        for f in files:
            os.chmod(out_dir / f, 0o400)
    return weight_map
