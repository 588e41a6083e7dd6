"""The tensors of one output's safetensors files (one file, or shards + index json), read lazily."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from llavaq.errors import LlavaqError, OutputError
from llavaq.model.checkpoint import SAFETENSORS_DTYPES, read_safetensors_header


class TensorFiles:
    """The tensors of ``<prefix>.safetensors`` or its ``-0000i-of-0000N`` shards + index; lazy reads.

    Index/shard inconsistencies are collected in ``problems`` (not raised) so ``inspect`` can report
    them; an unreadable or missing weight file raises :class:`OutputError`.
    """

    def __init__(self, root: Path, prefix: str, rename: Callable[[str], str] | None = None) -> None:
        self.root = root
        self.problems: list[str] = []
        #: internal name -> the key stored in the file (``rename`` maps stored keys to internal names)
        self.stored: dict[str, str] = {}
        self.index_file: Path | None = None
        self.headers: dict[str, dict] = {}
        self.where: dict[str, str] = {}
        single = root / f"{prefix}.safetensors"
        index = root / f"{prefix}.safetensors.index.json"
        idx: dict = {}
        if single.is_file():
            self.files = [single.name]
        elif index.is_file():
            self.index_file = index
            idx = self._read_index(index, prefix)
        else:
            raise OutputError(f"{root}: no {single.name} or {index.name}")
        self._read_headers(rename or (lambda k: k))
        if self.index_file is not None:
            self._check_index(idx)

    def _read_index(self, index: Path, prefix: str) -> dict:
        """Parse the index json; the shards it lists (present ones) become ``files``."""
        try:
            idx = json.loads(index.read_text())
            weight_map = idx["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise OutputError(f"{index}: corrupted index (no weight_map)") from None
        if any(not isinstance(f, str) or Path(f).name != f or f in (".", "..") for f in weight_map.values()):
            raise OutputError(f"{index}: weight_map names a file outside {self.root}")  # never read it
        self.files = sorted(set(weight_map.values()))
        for f in self.files:
            if not (self.root / f).is_file():
                self.problems.append(f"{index.name}: shard {f} is missing")
        for f in sorted(p.name for p in self.root.glob(f"{prefix}-*-of-*.safetensors")):
            if f not in self.files:
                self.problems.append(f"{f}: shard is not listed in {index.name}")
        self.files = [f for f in self.files if (self.root / f).is_file()]
        return idx

    def _read_headers(self, rename: Callable[[str], str]) -> None:
        for f in self.files:
            try:
                h = read_safetensors_header(self.root / f)
            except LlavaqError as e:
                raise OutputError(e.message) from None
            h.pop("__metadata__", None)
            self.headers[f] = h
            for key in h:
                name = rename(key)
                if name in self.where:
                    other = self.stored[name]
                    also = f"{other} in {self.where[name]}" if other != key else self.where[name]
                    self.problems.append(f"{f}: tensor {key} is also in {also}")
                self.where[name] = f
                self.stored[name] = key

    def _check_index(self, idx: dict) -> None:
        """Index entries against the shards' headers, and the declared total size."""
        index, weight_map = self.index_file, idx["weight_map"]
        total = 0
        held = {key: self.where[name] for name, key in self.stored.items()}
        for key, f in weight_map.items():
            if key not in held and (self.root / f).is_file():
                self.problems.append(f"{index.name}: {key} is mapped to {f} but {f} does not hold it")
            elif key in held and held[key] != f:
                self.problems.append(f"{index.name}: {key} is mapped to {f} but is in {held[key]}")
        for name, f in self.where.items():
            if self.stored[name] not in weight_map:
                self.problems.append(f"{f}: tensor {self.stored[name]} is not in {index.name}")
            total += self.nbytes(name)
        declared = (idx.get("metadata") or {}).get("total_size")
        if declared is not None and declared != total:
            self.problems.append(f"{index.name}: metadata.total_size {declared} != {total} bytes of tensors")

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def info(self, name: str) -> dict:
        return self.headers[self.where[name]][self.stored[name]]

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.info(name)["dtype"]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name)["shape"])

    def nbytes(self, name: str) -> int:
        s, e = self.info(name)["data_offsets"]
        return e - s

    def file_of(self, name: str) -> str:
        return self.where.get(name, "?")

    def stored_name(self, name: str) -> str:
        """The key under which ``name`` is stored (it differs when the file uses another layout)."""
        return self.stored.get(name, name)

    def tensor(self, name: str) -> torch.Tensor:
        """A fresh tensor read with positional reads, not through a memory map (mapped pages that were touched
        count in the RSS while the file stays open: see :mod:`llavaq.model.checkpoint`)."""
        if name not in self.where:
            raise OutputError(f"{self.root}: tensor {name} is missing")
        path = self.root / self.where[name]
        info = self.info(name)
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                f.seek(8 + n + start)
                got = f.readinto(memoryview(buf.numpy())) if end > start else 0
        except (OSError, struct.error) as e:
            raise OutputError(f"{path}: cannot read tensor {name} ({getattr(e, 'strerror', None) or e})") from None
        if got != end - start:
            raise OutputError(f"{path}: file is truncated (tensor {name} ends past the end of file)")
        return buf.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
