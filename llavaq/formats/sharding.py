"""Streaming safetensors writing with msModelSlim's sharding rule (``BufferedSafetensorsWriter``).

Tensors are appended in order; before adding one, if ``pending + size >= limit`` the pending
tensors are flushed to a shard. Shards are named ``<prefix>-0000i-of-0000N.safetensors`` and an
index ``<prefix>.safetensors.index.json`` maps each tensor to its file. Without a limit the model
goes to ``<prefix>.safetensors``. Files are made read-only (0o400) like msModelSlim's.

Every file is byte-identical to ``safetensors.torch.save_file`` of the same tensors (header JSON in
data order, ``__metadata__`` first, data sorted by dtype (widest first, safetensors' ``Dtype``
order) then name, header padded with spaces to a multiple of 8), but it is written as the tensors
arrive, holding at most one tensor:

* with ``specs`` (name, dtype, shape of every tensor, in stream order, known without computing a
  value) the header and each tensor's offset are known up front, so each tensor is ``pwrite``-n
  straight to its place: every byte is written once;
* without, each shard's tensors are spilled (appended) to a hidden temporary file as they come and
  the shard is assembled (header + kernel-side ``copy_file_range`` in data order) when it is complete.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llavaq.errors import OutputError

GB = 1024**3

# safetensors' Dtype enum order (data is laid out by descending dtype, then by name)
_ST_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_ST_RANK = {d: i for i, d in enumerate(_ST_NAMES)}
_MAX_IO = 1 << 30  # bytes per write/copy call (Linux caps single I/O calls just below 2 GiB)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a tensor that will be written (its value is not needed)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> TensorSpec:
        return cls(name, t.dtype, tuple(t.shape))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def safetensors_layout(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, int]]:
    """(8-byte length + padded JSON header, {name: absolute file offset of its data}) as save_file lays it out.

    ``metadata`` keys are written in dict order (safetensors writes a hash map: byte identity with
    ``save_file`` holds for zero or one metadata key).
    """
    for s in specs:
        if s.dtype not in _ST_NAMES:
            raise TypeError(f"safetensors cannot store dtype {s.dtype} (tensor {s.name!r})")
    order = sorted(specs, key=lambda s: (-_ST_RANK[s.dtype], s.name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    rel: dict[str, int] = {}
    pos = 0
    for s in order:
        header[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        rel[s.name] = pos
        pos += s.nbytes
    if len(header) != len(specs) + (1 if metadata else 0):
        raise ValueError("duplicate tensor names")
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    return head, {n: len(head) + o for n, o in rel.items()}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(data):
        pos += os.pwrite(fd, data[pos:pos + _MAX_IO], offset + pos)


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, n: int) -> None:
    while n > 0:
        try:
            k = os.copy_file_range(src, dst, min(n, _MAX_IO), src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            k = 0
        if k == 0:  # no kernel-side copy here: fall back to a bounded buffer
            chunk = os.pread(src, min(n, 64 << 20), src_off)
            if not chunk:
                raise OSError(errno.EIO, "short read from spill file")
            _pwrite_all(dst, memoryview(chunk), dst_off)
            k = len(chunk)
        src_off, dst_off, n = src_off + k, dst_off + k, n - k


class SafetensorsFileWriter:
    """One safetensors file written tensor by tensor (see the module docstring for the two modes)."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None,
                 specs: Sequence[TensorSpec] | None = None, durable: bool = True) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.durable = durable  # fsync on close
        self.specs = list(specs) if specs is not None else None
        self._seen: list[TensorSpec] = []
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._spill_path: Path | None = None
        self._spill_fd: int | None = None
        self._spill_pos = 0
        self._spill_at: dict[str, int] = {}
        if self.specs is not None:
            head, self._offsets = safetensors_layout(self.specs, metadata)
            _pwrite_all(self._fd, memoryview(head), 0)
            os.ftruncate(self._fd, len(head) + sum(s.nbytes for s in self.specs))
        else:
            self._spill_path = self.path.with_name(f".{self.path.name}.spill")
            self._spill_fd = os.open(self._spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def add(self, name: str, t: torch.Tensor) -> None:
        spec = TensorSpec.of(name, t)
        if self.specs is not None:
            k = len(self._seen)
            if k >= len(self.specs) or self.specs[k] != spec:
                want = self.specs[k] if k < len(self.specs) else "nothing more"
                raise RuntimeError(f"{self.path.name}: tensor {k} is {spec}, but the planned layout expects {want}")
            _pwrite_all(self._fd, _tensor_bytes(t), self._offsets[name])
        else:
            data = _tensor_bytes(t)
            _pwrite_all(self._spill_fd, data, self._spill_pos)
            self._spill_at[name] = self._spill_pos
            self._spill_pos += len(data)
        self._seen.append(spec)

    def close(self) -> None:
        """Finish the file (assemble it in spill mode); raises if planned tensors never came."""
        if self.specs is not None:
            if len(self._seen) != len(self.specs):
                raise RuntimeError(f"{self.path.name}: {len(self._seen)} of {len(self.specs)} planned tensors written")
        else:
            head, offsets = safetensors_layout(self._seen, self.metadata)
            _pwrite_all(self._fd, memoryview(head), 0)
            for s in self._seen:
                _copy_range(self._spill_fd, self._fd, self._spill_at[s.name], offsets[s.name], s.nbytes)
        if self.durable:
            os.fsync(self._fd)
        self._release()

    def abort(self) -> None:
        self._release()
        self.path.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._spill_fd is not None:
            os.close(self._spill_fd)
            self._spill_fd = None
            self._spill_path.unlink(missing_ok=True)


def save_file_streamed(tensors: Iterable[tuple[str, torch.Tensor]], path: Path,
                       metadata: dict[str, str] | None = None, specs: Sequence[TensorSpec] | None = None,
                       durable: bool = True) -> int:
    """Stream ``tensors`` into one safetensors file (byte-identical to ``save_file``); return the data bytes.

    ``durable=False`` skips the final fsync (the caller flushes the file later, or it only needs to
    survive an interrupted process)."""
    w = SafetensorsFileWriter(path, metadata, specs, durable)
    total = 0
    try:
        for name, t in tensors:
            w.add(name, t)
            total += _nbytes(t)
        w.close()
    except BaseException:
        w.abort()
        raise
    return total


def plan_shards(sizes: Iterable[int], part_file_size: int | None) -> list[int]:
    """msModelSlim's rule: the shard index of each tensor (flush before a tensor if pending + size >= limit)."""
    out, shard, pending, has = [], 0, 0, False
    for size in sizes:
        if part_file_size and has and pending + size >= part_file_size:
            shard, pending = shard + 1, 0
        out.append(shard)
        pending += size
        has = True
    return out


def open_shard(path: Path, metadata: dict[str, str] | None, specs: Sequence[TensorSpec] | None,
                label: str) -> SafetensorsFileWriter:
    """Start one output file (a seam for tests that simulate a full disk or Ctrl-C per shard)."""
    return SafetensorsFileWriter(path, metadata, specs)


def _os_error(e: OSError, label: str) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"no space left on device while writing {label}")
    return OutputError(f"cannot write {label} ({e.strerror or e})")


def write_safetensors(
    out_dir: Path,
    prefix: str,
    tensors: Iterable[tuple[str, torch.Tensor]],
    part_file_size: int | None,
    *,
    index_name: str | None = None,
    metadata: dict[str, str] | None = None,
    read_only: bool = True,
    specs: Sequence[TensorSpec] | None = None,
) -> dict[str, str]:
    """Write tensors (in order) to one file or shards with bounded memory; return {tensor name: file name}.

    ``specs`` (every tensor's name/dtype/shape in stream order) lets each tensor go straight to its
    final offset; without it each shard is spilled to a temporary file and assembled at its end.
    """
    out_dir = Path(out_dir)
    run = _ShardedWrite(out_dir, prefix, part_file_size, metadata, specs)
    run.write_all(tensors)
    files, weight_map = run.place(index_name)
    if read_only:
        for f in files:
            os.chmod(out_dir / f, 0o400)
    return weight_map


class _ShardedWrite:
    """One :func:`write_safetensors` run: shards written under temporary names, then moved into place."""

    def __init__(self, out_dir: Path, prefix: str, part_file_size: int | None, metadata: dict[str, str] | None,
                 specs: Sequence[TensorSpec] | None) -> None:
        self.out_dir, self.prefix, self.part_file_size = out_dir, prefix, part_file_size
        self.metadata, self.specs = metadata, specs
        self.shard_of = plan_shards((s.nbytes for s in specs), part_file_size) if specs is not None else None
        self.tmp_names: list[str] = []
        self.shards: list[list[str]] = []
        self.total = 0

    def label(self, i: int) -> str:
        if self.part_file_size:
            return f"{self.out_dir / self.prefix} shard {i + 1}"
        return str(self.out_dir / f"{self.prefix}.safetensors")

    def start(self, i: int) -> SafetensorsFileWriter:
        tmp = f".{self.prefix}-part{i:05d}.safetensors"
        self.tmp_names.append(tmp)
        self.shards.append([])
        specs, shard_of = self.specs, self.shard_of
        sub = [s for s, k in zip(specs, shard_of, strict=True) if k == i] if specs is not None else None
        return open_shard(self.out_dir / tmp, self.metadata, sub, self.label(i))

    def write_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every tensor, in order, into the shard the plan (or the running size) gives it."""
        writer: SafetensorsFileWriter | None = None
        pending = 0
        try:
            for k, (name, t) in enumerate(tensors):
                size = _nbytes(t)
                if self.shard_of is not None:
                    new = writer is None or self.shard_of[k] != len(self.tmp_names) - 1
                else:
                    new = writer is None or (self.part_file_size and pending + size >= self.part_file_size)
                if new:
                    if writer is not None:
                        writer.close()
                    writer = None
                    writer = self.start(len(self.tmp_names))
                    pending = 0
                writer.add(name, t)
                self.shards[-1].append(name)
                pending += size
                self.total += size
            if writer is None:  # no tensors at all: an empty file, as save_file({}) writes
                writer = self.start(0)
            writer.close()
            writer = None
        except OSError as e:
            raise _os_error(e, self.label(max(len(self.tmp_names) - 1, 0))) from None
        finally:
            if writer is not None:
                writer.abort()

    def place(self, index_name: str | None) -> tuple[list[str], dict[str, str]]:
        """Move the shards to their final names (and write the index when sharded): (files, weight map)."""
        out_dir, prefix = self.out_dir, self.prefix
        files: list[str] = []
        weight_map: dict[str, str] = {}
        if not self.part_file_size:
            fname = f"{prefix}.safetensors"
            os.replace(out_dir / self.tmp_names[0], out_dir / fname)
            return [fname], {nm: fname for nm in self.shards[0]}
        n = len(self.tmp_names)
        for i, (tmp, names) in enumerate(zip(self.tmp_names, self.shards, strict=True)):
            fname = f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(out_dir / tmp, out_dir / fname)
            files.append(fname)
            for nm in names:
                weight_map[nm] = fname
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (out_dir / (index_name or f"{prefix}.safetensors.index.json")).write_text(json.dumps(index, indent=2))
        return files, weight_map
