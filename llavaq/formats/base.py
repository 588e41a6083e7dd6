"""Format registry, the export context shared by writers, and atomic output directories."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llavaq import locks
from llavaq.errors import OutputError
from llavaq.files import RECORD_FILE
from llavaq.model.llava import LlavaArch
from llavaq.recipe import QuantRecipe
from llavaq.safety import check_not_input, exchange, move_new

if TYPE_CHECKING:
    from llavaq.formats.reader import QuantizedModelView

TensorStream = Iterator[tuple[str, torch.Tensor, str]]
#: the record every llavaq output carries (tool, format, recipe, module lists)
RECORD = RECORD_FILE


@dataclass
class ExportContext:
    arch: LlavaArch
    recipe: QuantRecipe
    model_path: Path
    part_file_size: int | None = None  # bytes per shard; None = one file
    device_type: str = "cpu"
    derived: bool = False
    float_dtype: torch.dtype | None = None
    #: the weight scales' dtype (the int8 grid), the same for every format; None: float32
    scale_dtype: torch.dtype | None = None
    extra_record: dict[str, Any] = field(default_factory=dict)
    #: "quantized" when the tensor stream is ``iter_quantized_tensors`` (writers may plan the layout)
    planned_stream: str | None = None
    #: float tensors that ``float_dtype`` cannot hold exactly are float32 (``--float_dtype auto`` of a format whose
    #: ``exact_float_tensors`` is set): their dtypes are known only with their values, so no planned layout
    exact_floats: bool = False


class OutputFormat:
    """One output format, registered by name: it writes a tensor stream into a directory and reads such a
    directory back (:meth:`read`, with the :class:`~llavaq.formats.reader.QuantizedModelView` subclass ``view``).
    """

    name: str = ""
    description: str = ""
    #: the reader of this format's directories (a ``QuantizedModelView`` subclass)
    view: type[QuantizedModelView]
    #: ``--float_dtype auto`` stores a float tensor in :meth:`default_float_dtype` only where that cast is lossless
    #: (tensors the recipe left unchanged), else float32 (issue 30); False: every float tensor in that dtype
    exact_float_tensors: bool = True

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        """Write the tensor stream (msModelSlim names and tags) into ``out_dir``; returns tensors/files counts."""
        raise NotImplementedError

    def detect(self, path: Path) -> bool:
        """Whether ``path`` holds an output of this format."""
        raise NotImplementedError

    def read(self, path: Path) -> QuantizedModelView:
        """The output directory ``path`` of this format, read lazily."""
        return self.view(Path(path), self.name)

    def default_float_dtype(self, checkpoint_dtype: torch.dtype, device_kind: str) -> torch.dtype:
        """``--float_dtype auto``: the dtype of float tensors (and weight scales) this format's consumer gets."""
        return checkpoint_float_dtype(checkpoint_dtype, device_kind)


FormatWriter = OutputFormat  # the former name


def checkpoint_float_dtype(checkpoint_dtype: torch.dtype, device_kind: str) -> torch.dtype:
    """HF formats: the checkpoint's own dtype (what ``from_pretrained`` / vLLM load)."""
    return checkpoint_dtype


FORMATS: dict[str, OutputFormat] = {}


def register_format(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        inst = cls()
        inst.name = name
        FORMATS[name] = inst
        return cls

    return deco


def get_format(name: str) -> OutputFormat:
    if name not in FORMATS:
        raise OutputError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def detect_format(path: Path) -> str | None:
    for name, fmt in FORMATS.items():
        if fmt.detect(path):
            return name
    return None


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False))


COPY_EXCLUDE = {"config.json", "model.safetensors.index.json"}


def copy_model_files(model_path: Path, out_dir: Path) -> list[str]:
    """Tokenizer/processor/generation files (every *.json and *.py but config/index, plus tokenizer.model)."""
    copied = []
    for f in sorted(model_path.iterdir()):
        if not f.is_file() or f.name in COPY_EXCLUDE:
            continue
        if f.suffix in (".json", ".py") or f.name in ("tokenizer.model",):
            shutil.copyfile(f, out_dir / f.name)
            copied.append(f.name)
    return copied


class AtomicOutputDir:
    """Write into a hidden sibling directory; move it into place only when everything succeeded.

    Inputs are sacred: a target that is, contains or lies inside one of ``inputs`` (label, path) is refused,
    ``--overwrite`` or not. One writer at a time: the target's advisory lock is held from ``__enter__`` to
    the end of the move (:mod:`llavaq.locks`), and leftovers of killed runs on the same target are removed.
    The move never deletes what it was not asked to replace: the target's state (absent, or the inode of
    the directory found empty / to overwrite) is recorded at the start and re-checked at the swap, which is
    an atomic ``renameat2`` exchange / no-replace rename where the system has one.
    """

    def __init__(self, target: Path, overwrite: bool = False,
                 inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.tmp = self.target.parent / f".{self.target.name}.llavaq-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._state: tuple[int, int] | None = None
        self._stack = ExitStack()

    @staticmethod
    def check(target: Path, overwrite: bool, inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
        target = Path(target)
        check_not_input(target, "save directory", inputs)
        if target.exists() and not target.is_dir():
            raise OutputError(f"save directory {target} exists and is a file")
        if target.is_dir() and any(target.iterdir()) and not overwrite:
            raise OutputError(f"save directory {target} exists and is not empty; pass --overwrite to replace it")
        parent = target.parent if str(target.parent) else Path(".")
        probe = parent
        while not probe.exists() and not probe.is_symlink():
            probe = probe.parent
        if not probe.is_dir():
            raise OutputError(f"save directory {target}: {probe} is not a directory")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise OutputError(f"save directory {target}: {probe} is not writable")

    def __enter__(self) -> Path:
        self.check(self.target, self.overwrite, self.inputs)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._stack.enter_context(locks.exclusive(self.target, f"save directory {self.target}"))
            self.check(self.target, self.overwrite, self.inputs)  # again, now that no other llavaq run can act
            locks.remove_stale(self.target)
            if self.target.is_dir():
                st = self.target.lstat()
                self._state = (st.st_dev, st.st_ino)
            self.tmp.mkdir()
        except OSError as e:
            self._stack.close()
            raise OutputError(f"cannot create {self.tmp} ({e.strerror})") from None
        except BaseException:
            self._stack.close()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        with self._stack:
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if isinstance(exc, OutputError | OSError):
                    raise self._user_error(exc) from None
                return  # KeyboardInterrupt and others propagate unchanged, the temp dir is gone
            try:
                self._move_into_place()
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise OutputError(f"cannot move the finished output into {self.target} ({e.strerror})") from None
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise

    def _changed(self, path: Path) -> bool:
        """Whether ``path`` is no longer the directory recorded at the start (or no longer empty)."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._state or (not self.overwrite and any(path.iterdir()))

    def _refuse_changed(self) -> OutputError:
        return OutputError(f"save directory {self.target} was created or changed by someone else while llavaq was "
                           f"writing; it was left as it is and the new output was discarded: run again")

    def _move_into_place(self) -> None:
        if self._state is None:
            try:
                move_new(self.tmp, self.target)
            except FileExistsError:
                raise self._refuse_changed() from None
            return
        if self._changed(self.target):
            raise self._refuse_changed()
        if exchange(self.tmp, self.target):  # self.tmp now holds the previous directory
            if self._changed(self.tmp):  # swapped in just before the exchange: put it back
                exchange(self.tmp, self.target)
                raise self._refuse_changed()
            old = self.tmp
        else:
            old = self.target.parent / f".{self.target.name}.llavaq-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.target, old)
            if self._changed(old):
                os.rename(old, self.target)
                raise self._refuse_changed()
            try:
                move_new(self.tmp, self.target)
            except OSError:
                if not os.path.lexists(self.target):
                    os.rename(old, self.target)  # put the previous output back
                raise
        if self.overwrite:
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rmdir()  # it was empty: never removes a file

    def _user_error(self, exc: BaseException) -> OutputError:
        """Name the user's save directory (not our temp dir) and say that it was left as it was."""
        if isinstance(exc, OutputError):
            msg = exc.message
        elif exc.errno == errno.ENOSPC:
            msg = f"no space left on device while writing {exc.filename or self.tmp}"
        else:
            msg = f"cannot write {exc.filename or self.tmp} ({exc.strerror or exc})"
        msg = msg.replace(str(self.tmp), str(self.target))
        kept = "was left unchanged" if self.target.exists() else "was not created"
        hint = "; free some space and run the same command again (calibration is cached)" \
            if "no space left" in msg else ""
        return OutputError(f"{msg}; {self.target} {kept}{hint}")
