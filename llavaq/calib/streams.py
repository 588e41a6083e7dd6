"""Calibration streams: every sample's hidden state between two layers, in memory or on disk.

Layer-streamed calibration runs one layer over all calibration samples before the next (see
:mod:`llavaq.calib.engine`), so between two layers it holds each sample's hidden state on two streams
(float and fake-quant), the vision features kept for the projector and the language model's
attention masks.  Their size grows with the number of samples, not with the model: LLaVA-1.5-7B
holds ≈ 2 x 9.8 MB per 600-token sample, so a few hundred calibration images need more memory than
the model's largest layer.

A stage's outputs form a *generation* ``<session>/streams/<n>/`` (``n`` = stages done).  Every
per-sample tensor is written to its own safetensors file as soon as the layer has produced it, and
also kept in memory while the resident stream bytes stay within the budget (``--stream_memory_gb``;
default a quarter of the memory available when calibration starts); beyond the budget only the file
is kept and the next layer reads the tensor back when it gets to that sample.  Tensors a stage does
not change (masks, captured vision features) are hard-linked into the next generation.

:meth:`Generation.seal` writes the generation's index after the stage's record: the newest sealed
generation is where an interrupted calibration resumes.  Sealing first flushes the generation's new
files to the disk (``fsync``), then the index and the directory, so a sealed generation is readable
after a power cut too.  Older generations are deleted once the manifest lists the stage, and the whole directory
when calibration is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llavaq.errors import CacheError
from llavaq.files import atomic_save_tensors, atomic_write_bytes, fsync_path
from llavaq.formats.sharding import TensorSpec, save_file_streamed

__all__ = ["Generation", "StateList", "StreamStore", "Streams", "available_memory", "default_stream_budget"]

INDEX = "streams.json"
SMALL = "small.safetensors"
#: the per-sample streams (all other fields are one small tensor or a list of position ids)
LIST_FIELDS = ("fq", "flt", "feat_fq", "feat_flt", "masks")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_stream_budget() -> int:
    """A quarter of the available memory (1 GiB where it cannot be read)."""
    avail = available_memory()
    return avail // 4 if avail else 1 << 30


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def dense_layout(t: Tensor) -> tuple[Tensor, list[int] | None]:
    """``t`` as a contiguous tensor, and the order of its dimensions in memory (None when ``t`` is contiguous).

    A layer's output inherits its input's memory layout: SigLIP's patch embeddings are a transposed view, so
    its hidden states stay channels-first in memory through the whole tower (transformers' too), and a
    matmul over another layout can round differently in the last bit. A stream read back from a file gets
    the layout it had in memory (:func:`restore_layout`), so disk and memory give the same bytes.
    """
    t = t.detach().cpu()
    if t.is_contiguous() or t.dim() < 2:
        return t.contiguous(), None
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    dense = t.permute(order)
    return (dense, order) if dense.is_contiguous() else (t.contiguous(), None)


def restore_layout(t: Tensor, order: Sequence[int] | None) -> Tensor:
    """The inverse of :func:`dense_layout`: ``t`` (contiguous) viewed with its original dimension order."""
    if not order:
        return t
    return t.permute(sorted(range(len(order)), key=lambda d: order[d]))


def _write_tensor(path: Path, t: Tensor) -> None:
    t, order = dense_layout(t)
    meta = {"layout": ",".join(map(str, order))} if order else None
    try:
        save_file_streamed([("t", t)], path, metadata=meta, specs=[TensorSpec.of("t", t)], durable=False)
    except OSError as e:
        raise CacheError(f"cannot write calibration stream file {path} ({e.strerror or e})") from None


def _fsync(path: Path) -> None:
    """Flush a stream file's data to the disk."""
    try:
        fsync_path(path)
    except OSError as e:
        raise CacheError(f"cannot write calibration stream file {path} ({e.strerror or e})") from None


def read_tensor(path: Path) -> Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            layout = (f.metadata() or {}).get("layout")
            return restore_layout(f.get_tensor("t"), [int(d) for d in layout.split(",")] if layout else None)
    except Exception:
        raise CacheError(f"{path}: missing or corrupted calibration stream file; delete "
                         f"{path.parents[2]} and run calibrate again") from None


class StreamStore:
    """The generations of one calibration session and the memory budget their tensors share."""

    def __init__(self, root: Path, budget_bytes: int, on_spill: Callable[[], None] | None = None) -> None:
        self.root = Path(root)
        self.budget = max(0, int(budget_bytes))
        self.resident = 0  # bytes of stream tensors held in memory
        self.peak_resident = 0
        self.spilled = 0  # bytes written and not held (read back from disk when needed)
        self._on_spill = on_spill
        self._held: set[int] = set()  # ids of the tensors counted in ``resident``

    def _path(self, n: int) -> Path:
        return self.root / f"{n:04d}"

    def begin(self, n: int) -> Generation:
        """A new, empty generation ``n`` (a stale unsealed one of the same number is replaced)."""
        path = self._path(n)
        if path.exists():
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True)
        except OSError as e:
            raise CacheError(f"cannot create calibration stream directory {path} ({e.strerror or e})") from None
        return Generation(self, n, path)

    def latest_sealed(self) -> Generation | None:
        """The newest generation whose index was written (the resume point), if any."""
        if not self.root.is_dir():
            return None
        for path in sorted((p for p in self.root.iterdir() if p.name.isdigit()), reverse=True):
            if (path / INDEX).is_file():
                return Generation(self, int(path.name), path)
        return None

    def keep_only(self, n: int) -> None:
        """Delete every generation but ``n`` (after the manifest lists the stage that made ``n``)."""
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path != self._path(n):
                    shutil.rmtree(path, ignore_errors=True)

    def discard_unsealed(self) -> None:
        """Delete the generations whose index was never written (after an error or Ctrl-C)."""
        if self.root.is_dir():
            for path in self.root.iterdir():
                if not (path / INDEX).is_file():
                    shutil.rmtree(path, ignore_errors=True)

    # -------------------------------------------------------------- memory budget
    def hold(self, t: Tensor) -> bool:
        """Keep ``t`` in memory if the budget allows it (a tensor already kept counts once); its bytes
        count until it is freed."""
        if id(t) in self._held:
            return True
        n = _nbytes(t)
        if self.resident + n > self.budget:
            if not self.spilled and self._on_spill is not None:
                self._on_spill()
            self.spilled += n
            return False
        self.resident += n
        self.peak_resident = max(self.peak_resident, self.resident)
        self._held.add(id(t))
        weakref.finalize(t, self._release, id(t), n)
        return True

    def _release(self, key: int, n: int) -> None:
        self._held.discard(key)
        self.resident -= n


class Generation:
    """One directory of stream files: the hidden states after ``n`` stages."""

    def __init__(self, store: StreamStore, n: int, path: Path) -> None:
        self.store, self.n, self.path = store, n, path
        self._keys: set[str] = set()
        self.unsynced: list[Path] = []  # files written here and not yet flushed to the disk

    def new_list(self, key: str) -> StateList:
        """An empty stream in this generation; its files are named after ``key`` (made unique)."""
        unique, k = key, 1
        while unique in self._keys:
            unique, k = f"{key}-{k}", k + 1
        self._keys.add(unique)
        return StateList(self, unique)

    def carry(self, key: str, items: Sequence[Tensor | None]) -> StateList:
        """``items`` (a list of another generation, or plain tensors) as a list of this generation;
        files of another generation are hard-linked, not rewritten."""
        out = self.new_list(key)
        if isinstance(items, StateList):
            for j in range(len(items)):
                out._link(items, j)
        else:
            for t in items:
                out.append(t)
        return out

    def seal(self, streams: Streams, stages_done: int) -> None:
        """Flush every tensor file to the disk, then write the index: this generation becomes the
        resume point."""
        for path in self.unsynced:  # hard-linked files were flushed when their generation was sealed
            _fsync(path)
        self.unsynced.clear()
        small: dict[str, Tensor] = {f"positions.{j}": p for j, p in enumerate(streams.positions)}
        for key in ("m2", "feat_m2"):
            if getattr(streams, key) is not None:
                small[key], order = dense_layout(getattr(streams, key))
                if order:
                    small[key + ".layout"] = torch.tensor(order)
        atomic_save_tensors(self.path / SMALL, small)
        lists = {}
        for name in LIST_FIELDS:
            lst = getattr(streams, name)
            if not isinstance(lst, StateList) or lst.generation is not self:
                raise ValueError(f"stream {name} is not stored in generation {self.n}")
            lists[name] = {"key": lst.key, "items": [None if f is None else f.name for f in lst.files]}
        index = {"stages_done": stages_done, "lists": lists, "positions": len(streams.positions)}
        # written last and flushed with the directory: the files' names, the links and the index itself
        atomic_write_bytes(self.path / INDEX, json.dumps(index).encode())

    def load(self) -> tuple[Streams, int]:
        """The streams of a sealed generation (read from disk when used) and its number of stages done."""
        from safetensors.torch import load_file

        try:
            index = json.loads((self.path / INDEX).read_text())
            small = load_file(str(self.path / SMALL))
            m2, feat_m2 = (None if small.get(k) is None else
                           restore_layout(small[k], small[k + ".layout"].tolist() if k + ".layout" in small else None)
                           for k in ("m2", "feat_m2"))
            s = Streams(positions=[small[f"positions.{j}"] for j in range(int(index["positions"]))],
                        m2=m2, feat_m2=feat_m2)
            for name in LIST_FIELDS:
                entry = index["lists"][name]
                lst = self.new_list(entry["key"])
                for item in entry["items"]:
                    lst._adopt(None if item is None else self.path / item)
                setattr(s, name, lst)
            return s, int(index["stages_done"])
        except CacheError:
            raise
        except Exception:
            raise CacheError(f"{self.path}: corrupted calibration streams; delete {self.path.parents[1]} "
                             "and run calibrate again") from None


class StateList(Sequence):
    """One stream's per-sample tensors (``None`` entries allowed) in one generation.

    ``append`` writes the tensor to its file and keeps it in memory if the store's budget allows;
    ``lst[j]`` returns it, reading the file back when it was not kept.
    """

    def __init__(self, generation: Generation, key: str) -> None:
        self.generation, self.key = generation, key
        self.files: list[Path | None] = []
        self._resident: list[Tensor | None] = []

    def append(self, t: Tensor | None) -> None:
        if t is None:
            self._adopt(None)
            return
        path = self.generation.path / f"{self.key}.{len(self.files)}.safetensors"
        _write_tensor(path, t)
        self.generation.unsynced.append(path)
        self._adopt(path, t)

    def _adopt(self, path: Path | None, t: Tensor | None = None) -> None:
        self.files.append(path)
        self._resident.append(t if t is not None and self.generation.store.hold(t) else None)

    def _link(self, other: StateList, j: int) -> None:
        src = other.files[j]
        if src is None:
            self._adopt(None)
            return
        dst = self.generation.path / f"{self.key}.{len(self.files)}.safetensors"
        try:
            os.link(src, dst)
        except OSError:  # no hard links on this file system
            shutil.copyfile(src, dst)
            self.generation.unsynced.append(dst)
        self._adopt(dst, other._resident[j])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, j: int) -> Tensor | None:  # type: ignore[override]
        t = self._resident[j]
        if t is not None or self.files[j] is None:
            return t
        return read_tensor(self.files[j])

    def __iter__(self) -> Iterator[Tensor | None]:
        return (self[j] for j in range(len(self)))


@dataclass
class Streams:
    """The hidden states between two layers (see the module docstring)."""

    fq: Sequence[Tensor] = field(default_factory=list)
    flt: Sequence[Tensor] = field(default_factory=list)
    # vision features captured at vision_feature_layer, per image sample
    feat_fq: Sequence[Tensor] = field(default_factory=list)
    feat_flt: Sequence[Tensor] = field(default_factory=list)
    # language-model attention masks (4-D, additive; None where not needed) and position ids, per sample
    masks: Sequence[Tensor | None] = field(default_factory=list)
    positions: list[Tensor] = field(default_factory=list)
    # sample 0 through the smoothed layers (m2), and its captured vision features
    m2: Tensor | None = None
    feat_m2: Tensor | None = None

    def carry_into(self, gen: Generation) -> None:
        """Move every per-sample stream not already in ``gen`` into it (links, not copies)."""
        for name in LIST_FIELDS:
            lst = getattr(self, name)
            if not (isinstance(lst, StateList) and lst.generation is gen):
                setattr(self, name, gen.carry(name, lst))
