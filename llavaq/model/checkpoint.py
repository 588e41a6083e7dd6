"""A llava-hf checkpoint on disk: validated config, lazily read safetensors weights.

Nothing here unpickles: ``*.bin`` / ``*.pt`` weights are refused with a conversion hint.
Tensors are read one at a time with plain positional reads (``os.preadv`` into a fresh tensor buffer
at the header's ``data_offsets``), not through a memory map: mapped file pages that are touched
count in the process RSS and stay mapped, so a 14 GB model read through ``mmap`` can push the peak
RSS far past what the layer-streamed pipeline needs. A tensor that is no longer referenced is gone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from llavaq.errors import ModelError
from llavaq.model.input_checks import INDEX, check_config, check_layers, quantized_kind, quantized_tensor, weight_files

#: safetensors dtype name -> torch dtype (public: readers of other files use it too)
SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_DTYPE_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header without loading data, at least as strictly as the safetensors
    library: a JSON object without duplicate keys; ``__metadata__`` str -> str; every tensor an object with a
    known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` [start, end] with
    end - start = shape x dtype size; the tensors' byte ranges contiguous from 0, non-overlapping, and ending
    exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise ModelError(f"{path}: corrupted safetensors header (header length {n})")
            text = f.read(n)
        if not text.startswith(b"{"):
            raise ModelError(f"{path}: corrupted safetensors header (not a JSON object)")
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: corrupted safetensors header (not valid JSON)") from None
    except ValueError as e:
        raise ModelError(f"{path}: corrupted safetensors header ({e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupted safetensors header")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ModelError(f"{path}: corrupted safetensors header (__metadata__ must map strings to strings)")
    _check_ranges(path, header, size - 8 - n)
    return header


def _check_ranges(path: Path, header: dict, data_len: int) -> None:
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise TypeError
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dtype, str) or not isinstance(shape, list) or not all(map(_is_uint, shape)) \
                    or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets)):
                raise TypeError
            nbytes = _DTYPE_SIZES[dtype] * math.prod(shape)
        except KeyError:
            raise ModelError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, which llavaq cannot read "
                             f"({', '.join(_DTYPE_SIZES)})") from None
        except (TypeError, ValueError):
            raise ModelError(f"{path}: corrupted safetensors header entry for {name!r}") from None
        start, end = offsets
        if end > data_len:
            raise ModelError(
                f"{path}: file is truncated or corrupted (tensor {name!r} needs bytes {start}..{end}, "
                f"file has {data_len})"
            )
        if end - start != nbytes:
            raise ModelError(f"{path}: corrupted safetensors header (tensor {name!r}: shape {shape} x {dtype} is "
                             f"{nbytes} bytes, data_offsets give {end - start})")
        ranges.append((start, end, name))
    pos = 0
    for start, end, name in sorted(ranges):
        if start != pos:
            what = "overlaps the previous tensor" if start < pos else f"leaves a gap at byte {pos}"
            raise ModelError(f"{path}: corrupted safetensors header (tensor {name!r} at bytes {start}..{end} {what}; "
                             "the safetensors library refuses this file)")
        pos = end
    if pos != data_len:
        raise ModelError(f"{path}: corrupted safetensors file ({data_len - pos} bytes after the last tensor)")


class Checkpoint:
    """Read-only view of a llava-hf model directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._validate_dir()
        self.config_dict = self._read_config()
        kind = quantized_kind(self.path, self.config_dict)
        if kind is not None:
            raise ModelError(f"{self.path} is {kind}, not a float model: quantize the original float checkpoint "
                             "(give its directory as --model_path)")
        check_config(self.path / "config.json", self.config_dict)
        self._data_start: dict[Path, int] = {}
        self._index = self._build_index()
        check_layers(self.path / "config.json", self.config_dict, list(self._index))
        self._fds: dict[Path, int] = {}
        self._finite: set[str] = set()  # float tensors already checked for NaN/Inf
        self._sha256: dict[str, str] = {}  # tensor -> sha256 of its bytes, hashed as first read

    # ---------------------------------------------------------------- validation
    def _validate_dir(self) -> None:
        p = self.path
        if not p.exists():
            raise ModelError(f"model path {p} does not exist")
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file; give the model directory (with config.json)")
        if not any(p.iterdir()):
            raise ModelError(f"model path {p} is empty")

    def _read_config(self) -> dict:
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{cfg_path} is missing: {self.path} is not a Hugging Face model directory")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{cfg_path}: invalid JSON ({e.__class__.__name__}: {e})") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{cfg_path}: invalid config (not a JSON object)")
        return cfg

    def _build_index(self) -> dict[str, tuple[Path, dict]]:
        files, wmap = weight_files(self.path)
        if not files:
            pickles = [f.name for f in self.path.iterdir() if f.suffix in _PICKLE_SUFFIXES]
            if pickles:
                raise ModelError(
                    f"{self.path} has only pickle weights ({', '.join(sorted(pickles)[:3])}); llavaq never "
                    "unpickles. Convert them to safetensors first: load with transformers in a trusted "
                    "environment and call model.save_pretrained(dir, safe_serialization=True)"
                )
            raise ModelError(f"{self.path} has no *.safetensors weight files")
        index: dict[str, tuple[Path, dict]] = {}
        for f in files:
            header = read_safetensors_header(f)
            with open(f, "rb") as fh:
                self._data_start[f] = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in index:
                    raise ModelError(f"{f}: tensor {name!r} is also in {index[name][0].name}; which one is meant "
                                     "is ambiguous")
                if wmap is not None and wmap.get(name) != f.name:
                    raise ModelError(f"{f}: tensor {name!r} is not mapped to this file by {INDEX}")
                index[name] = (f, info)
        if wmap is not None and set(wmap) - set(index):
            raise ModelError(f"{self.path / INDEX} names tensor {sorted(set(wmap) - set(index))[0]!r}, which is in no "
                             "weight file")
        bad = quantized_tensor(list(index), [n for n, (_, i) in index.items() if i["dtype"] in ("I8", "U8")])
        if bad is not None:
            raise ModelError(f"{self.path} is an already-quantized model (tensor {bad!r}), not a float model: "
                             "quantize the original float checkpoint")
        return index

    # ---------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        return list(self._index)

    def has(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._index[name][1]["shape"])

    def dtype_of(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._index[name][1]["dtype"]]

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise ModelError(f"{file}: cannot open ({e.strerror})") from None
            self._fds[file] = fd
        return fd

    def _load(self, name: str) -> torch.Tensor:
        """A fresh tensor (stored dtype) read with positional reads; the caller owns it."""
        file, info = self._index[name]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            view = memoryview(buf.numpy())
            fd, pos, off = self._fd(file), 0, self._data_start[file] + start
            try:
                while pos < len(view):
                    n = os.preadv(fd, [view[pos:]], off + pos)
                    if n == 0:
                        raise ModelError(f"{file}: file is truncated (tensor {name!r} ends past the end of file)")
                    pos += n
            except OSError as e:
                raise ModelError(f"{file}: cannot read tensor {name!r} ({e.strerror})") from None
        if name not in self._sha256:  # every byte is hashed as it is first read (see weights_sha256)
            self._sha256[name] = hashlib.sha256(buf.numpy()).hexdigest()
        return buf.view(dtype).reshape(info["shape"])

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Read one tensor (a fresh copy each call), optionally cast. Raises ModelError if missing."""
        if name not in self._index:
            raise ModelError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        t = self._load(name)
        if name not in self._finite and t.is_floating_point():
            # One cheap pass per tensor as it is first read: a NaN/Inf weight would silently poison the
            # calibration statistics of every later layer.
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ModelError(
                    f"{self._index[name][0]}: tensor {name!r} contains {bad} NaN/Inf value(s); the checkpoint is "
                    "corrupted (re-download or re-convert it)"
                )
            self._finite.add(name)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def tensors(self, prefix: str, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """All tensors under ``prefix`` (with the prefix stripped from their names)."""
        return {n[len(prefix):]: self.tensor(n, dtype) for n in self._index if n.startswith(prefix)}

    def iter_tensors(self, names: Iterable[str], dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
        for n in names:
            yield self.tensor(n, dtype)

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        """The checkpoint's declared dtype (config.json ``torch_dtype``), default float32."""
        name = self.config_dict.get("torch_dtype") or "float32"
        dt = getattr(torch, str(name).replace("torch.", ""), None)
        if not isinstance(dt, torch.dtype):
            raise ModelError(f"{self.path / 'config.json'}: unknown torch_dtype {name!r}")
        return dt

    @cached_property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in {f for f, _ in self._index.values()})

    def fingerprint(self) -> dict[str, str]:
        """A cheap identity of the model: config, tensor names/shapes/dtypes and a sampled weight digest.

        The weight digest hashes, per file, its size and 64 KiB windows at 16 evenly spaced offsets,
        so it is fast on a 14 GB model yet changes when weights are replaced.
        """
        cfg = dict(self.config_dict)
        cfg.pop("quantization_config", None)
        cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
        layout = hashlib.sha256()
        for name in sorted(self._index):
            info = self._index[name][1]
            layout.update(f"{name}:{info['dtype']}:{info['shape']};".encode())
        digest = hashlib.sha256()
        for f in sorted({f for f, _ in self._index.values()}):
            size = f.stat().st_size
            digest.update(f"{f.name}:{size};".encode())
            with open(f, "rb") as fh:
                for k in range(16):
                    fh.seek(size * k // 16)
                    digest.update(fh.read(65536))
        return {
            "config": cfg_hash,
            "layout": layout.hexdigest()[:16],
            "weights": digest.hexdigest()[:16],
        }


    def weights_sha256(self) -> str:
        """The full identity of the weights: sha256 over every tensor's name and the sha256 of its bytes.

        The bytes were hashed as calibration / export read them (they read every tensor), so this costs one
        hash pass over the model and no extra read; tensors not read yet are read (and hashed) now.
        """
        h = hashlib.sha256()
        for name in sorted(self._index):
            if name not in self._sha256:
                type(self)._load(self, name)
            h.update(f"{name}:{self._sha256[name]};".encode())
        return h.hexdigest()


class InMemoryCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose every tensor is read into RAM up front (the non-streamed reference).

    ``tensor`` returns a copy, so callers may modify it in place exactly as with the lazy reader.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._data = {n: Checkpoint._load(self, n) for n in self._index}
        self.close()

    def _load(self, name: str) -> torch.Tensor:
        return self._data[name].clone()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
