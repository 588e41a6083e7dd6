"""Read any quantized output (ours or msModelSlim's own) back as integer-kernel parameters.

``read_quantized(path)`` detects the format and returns the registered format's view (a
:class:`QuantizedModelView`; each format's subclass lives beside its writer):

- ``view.quantized`` — the W8A8 Linear module names, in file order;
- ``view.linear(name)`` — a :class:`QuantizedLinearView` with ``weight`` (int8 [out,in]),
  ``weight_scale`` ([out,1], float), ``input_scale`` / ``input_offset`` (float32 [1]; msModelSlim's
  convention ``x_q = clamp(round(x/input_scale + input_offset), −128, 127)``), ``bias`` (float or
  None), ``deq_scale`` (float32 [out], unpacked from int64 where stored so) and ``quant_bias``
  (int32 [out]; only msModelSlim formats store it, else None);
- ``view.float_names`` / ``view.tensor(name)`` — every other tensor, read lazily;
- ``view.record`` (``llavaq_record.json`` or None for msModelSlim's own outputs), ``view.description``
  (the description json, msModelSlim formats), ``view.config`` (config.json or None);
- ``view.check()`` — consistency problems as one-line strings naming the tensor and file (empty if
  consistent): description ↔ tensors, shard index ↔ files, dtypes/shapes, ``deq_scale ==
  input_scale·weight_scale`` bit-exactly in float32, no NaN/Inf, int8 weights in [−127, 127].

Per format: ``compressed-tensors`` stores ``input_zero_point`` (int8) = ``input_offset`` and no
``deq_scale`` (computed here as ``input_scale·weight_scale``); ``fakequant`` stores ``W_q·ws`` as the
weight plus ``llavaq_quant_params.st`` with ``weight_scale``/``input_scale``/``input_offset``, from which
``W_q = round(W/ws)`` is recovered (and checked to round-trip exactly).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from llavaq.errors import OutputError
from llavaq.formats.base import RECORD, detect_format, get_format
from llavaq.formats.tensorfiles import TensorFiles

__all__ = ["FLOATS", "QuantizedLinearView", "QuantizedModelView", "TensorFiles", "read_json", "read_quantized"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class QuantizedLinearView:
    """One W8A8 Linear: ``y = deq_scale·(x_q·W_qᵀ + quant_bias)`` or, in float, ``x̂·(W_q·ws)ᵀ + bias``."""

    name: str
    weight: torch.Tensor  # int8 [out, in]
    weight_scale: torch.Tensor  # [out, 1], float (model dtype)
    input_scale: torch.Tensor  # float32 [1]
    input_offset: torch.Tensor  # float32 [1], integer-valued
    bias: torch.Tensor | None  # float [out]
    deq_scale: torch.Tensor  # float32 [out]
    quant_bias: torch.Tensor | None  # int32 [out] (msModelSlim formats only)
    #: how the kernel quantizes the input: "static" (input_scale/input_offset), "dynamic" (per-token, symmetric,
    #: computed at run time; input_scale = 1 and input_offset = 0 are placeholders) or "none" (weight-only)
    activation: str = "static"
    #: weight-only: the zero point per group ([out, G] like weight_scale; None = symmetric), dequantized
    #: ``(W_q − weight_offset)·weight_scale`` with each group of in/G input columns on its own scale
    weight_offset: torch.Tensor | None = None
    #: bits of the weight codes (4: int4 values, unpacked to int8 here)
    bits: int = 8

    @property
    def groups(self) -> int:
        """Weight scales per output row (1: per channel)."""
        return self.weight_scale.shape[1] if self.weight_scale.dim() == 2 else 1

    @property
    def group_size(self) -> int:
        """Input columns per weight scale (0: per channel)."""
        return 0 if self.groups == 1 else self.weight.shape[1] // self.groups


def read_json(path: Path) -> Any:
    """A json file's content, None when it does not exist; invalid JSON is an :class:`OutputError`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise OutputError(f"{path}: invalid JSON") from None


def dtype_list(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


class QuantizedModelView:
    """A quantized output directory, read lazily. Build it with :func:`read_quantized`.

    Subclasses (one per format, beside the format's writer) open the files in :meth:`_open` and read a
    Linear in :meth:`linear`; the consistency checks shared by every format are here, with hooks.
    """

    #: suffixes of a quantized Linear's own tensors (besides bias)
    linear_params: tuple[str, ...] = ()
    #: the tensors a quantized Linear must have in the weight files
    required_params: tuple[str, ...] = ()
    #: True when the weight files have no meaningful order (HF formats): sort Linears as the model does
    sort_by_model = True

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.format = fmt
        self.config: dict | None = read_json(path / "config.json")
        if self.config is not None and not isinstance(self.config, dict):  # (hostile)
            raise OutputError(f"{path / 'config.json'}: not a JSON object")
        rec = read_json(path / RECORD)
        self.record: dict | None = rec if isinstance(rec, dict) else None
        self.description: dict[str, str] | None = None
        self.description_file: str | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.ct_config: Any = None  # the parsed quantization_config (compressed-tensors)
        self.files, self.quantized = self._open()
        if self.sort_by_model:
            order = {n: i for i, n in enumerate((self.record or {}).get("quantized_modules") or [])}
            self.quantized.sort(key=lambda n: (order.get(n, len(order)), _natural(n)))

    def _open(self) -> tuple[TensorFiles, list[str]]:
        """The weight files and the quantized Linears' names."""
        raise NotImplementedError

    # ------------------------------------------------------------------ names
    @cached_property
    def _quant_set(self) -> set[str]:
        return set(self.quantized)

    def module_of(self, tensor_name: str) -> str:
        return tensor_name.rpartition(".")[0]

    def is_linear_param(self, name: str) -> bool:
        module, _, suffix = name.rpartition(".")
        return module in self._quant_set and (suffix in self.linear_params or suffix == "bias")

    @cached_property
    def float_names(self) -> list[str]:
        """Every stored tensor that is not a quantized Linear's own (float weights, norms, embeddings...)."""
        return [n for n in self.files.names if not self.is_linear_param(n)]

    @cached_property
    def float_linears(self) -> list[str]:
        """Float Linear modules: a 2-D float ``.weight`` that is not an embedding, and ``lm_head`` (tied or not)."""
        out = [n[: -len(".weight")] for n in self.float_names
               if n.endswith(".weight") and "embed" not in n.rpartition(".")[0].rpartition(".")[2]
               and len(self.files.shape(n)) == 2 and self.files.dtype(n) in FLOATS]
        head = "language_model.lm_head"
        if head not in out and head not in self._quant_set:
            out.append(head)
        return out

    @cached_property
    def float_modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for n in self.float_names:
            seen.setdefault(self.module_of(n), None)
        return list(seen)

    def tensor(self, name: str) -> torch.Tensor:
        """A stored tensor as written (lazy, one at a time)."""
        return self.files.tensor(name)

    # ------------------------------------------------------------------ quantized Linears
    def _p(self, module: str, suffix: str) -> torch.Tensor:
        name = f"{module}.{suffix}"
        if name not in self.files:
            raise OutputError(f"{self.path}: tensor {name} is missing")
        return self.files.tensor(name)

    def _bias(self, name: str) -> torch.Tensor | None:
        return self.files.tensor(name + ".bias") if name + ".bias" in self.files else None

    def linear(self, name: str) -> QuantizedLinearView:
        raise NotImplementedError

    def linears(self) -> Iterator[QuantizedLinearView]:
        for n in self.quantized:
            yield self.linear(n)

    # ------------------------------------------------------------------ consistency
    def check(self) -> list[str]:
        """Consistency problems, each one line naming the tensor and its file; empty when consistent."""
        problems = list(self.files.problems) + self._check_layout()
        for m in self.quantized:
            missing = self._missing(m)
            if missing is None:
                continue
            if missing:
                problems.append(missing)
                continue
            problems += self._check_linear(m)
        for n in self.float_names:
            if self.files.dtype(n) in FLOATS:
                t = self.files.tensor(n)
                if not torch.isfinite(t).all():
                    problems.append(f"{self._where(n)} has NaN/Inf")
        return problems

    def _check_layout(self) -> list[str]:
        """Problems of the format's own metadata (description json, quantization_config, record)."""
        return []

    def _required(self, m: str) -> tuple[str, ...] | None:
        """The tensors Linear ``m`` must have in the weight files; None: skip it (reported elsewhere)."""
        return self.required_params

    def _missing(self, m: str) -> str | None:
        """The problem line of Linear ``m``'s first missing tensor, "" when none is missing, None to skip it."""
        required = self._required(m)
        if required is None:
            return None
        missing = [s for s in required if f"{m}.{s}" not in self.files]
        return f"{m}.{missing[0]} is missing (weights)" if missing else ""

    def _where(self, n: str) -> str:
        return f"{self.files.file_of(n)}: {self.files.stored_name(n)}"

    def _src(self, n: str) -> str:
        return self._where(n)

    def _expect(self, p: list[str], name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape) -> bool:
        """Append a problem unless ``t`` has one of ``dtypes``, this shape and (float) finite values."""
        if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
            p.append(f"{self._src(name)} must be {dtype_list(dtypes)} {list(shape)}, "
                     f"is {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
            return False
        if t.dtype in FLOATS and not torch.isfinite(t).all():
            p.append(f"{self._src(name)} has NaN/Inf")
            return False
        return True

    def _check_linear(self, m: str) -> list[str]:
        p: list[str] = []
        lv = self.linear(m)
        fatal = self._check_weight(p, m, lv)
        if fatal:
            return [fatal]
        out = lv.weight.shape[0]
        groups = lv.groups if lv.activation == "none" and lv.weight.shape[1] % lv.groups == 0 else 1
        ok = self._expect(p, f"{m}.weight_scale", lv.weight_scale, FLOATS, (out, groups))
        if ok and not (lv.weight_scale > 0).all():
            p.append(f"{self._where(m + '.weight_scale')} has non-positive scales")
        ok = self._check_input(p, m, lv, ok)
        if lv.bias is not None:
            self._expect(p, f"{m}.bias", lv.bias, FLOATS, (out,))
        self._check_kernel(p, m, lv, ok)
        return p

    def _check_weight(self, p: list[str], m: str, lv: QuantizedLinearView) -> str | None:
        """Check the stored weight (append problems); a returned line replaces all of ``m``'s problems."""
        w, wn = lv.weight, f"{m}.weight"
        if w.dtype != torch.int8 or w.dim() != 2:
            return f"{self._where(wn)} must be int8 [out, in], is {w.dtype} {list(w.shape)}"
        if lv.activation == "none":
            lo, hi = -(2 ** (lv.bits - 1)), 2 ** (lv.bits - 1) - 1
            if int(w.min()) < lo or int(w.max()) > hi:
                p.append(f"{self._where(wn)} holds codes outside the int{lv.bits} range [{lo}, {hi}]")
            return None
        if int(w.min()) < -127 and self._strict_weight_range():
            # llavaq and msModelSlim quantize weights symmetrically to [-127, 127]; compressed-tensors' own
            # symmetric range is [-128, 127] (scale = absmax/127.5), so other tools' files may hold -128
            p.append(f"{self._where(wn)} holds -128 (int8 weights must be in [-127, 127])")
        return None

    def _strict_weight_range(self) -> bool:
        return True

    def _check_input(self, p: list[str], m: str, lv: QuantizedLinearView, ok: bool) -> bool:
        """Check the activation quantization parameters; returns ``ok`` and whether they are valid."""
        return ok

    def _check_static_input(self, p: list[str], m: str, raw_s: torch.Tensor, raw_o: torch.Tensor, ok: bool
                            ) -> bool:
        """float32 [1] ``input_scale`` > 0 and an integer float32 [1] ``input_offset`` in [-128, 127]."""
        s_name, on = f"{m}.input_scale", f"{m}.input_offset"
        ok &= self._expect(p, s_name, raw_s, (torch.float32,), (1,))
        if ok and not raw_s.item() > 0:
            p.append(f"{self._src(s_name)} is not positive")
            ok = False
        if self._expect(p, on, raw_o, (torch.float32,), (1,)):
            o = raw_o.item()
            if o != round(o) or not -128 <= o <= 127:
                p.append(f"{self._src(on)} = {o} is not an integer in [-128, 127]")
        return ok

    def _check_kernel(self, p: list[str], m: str, lv: QuantizedLinearView, ok: bool) -> None:
        """Check kernel-only parameters (msModelSlim's ``deq_scale`` / ``quant_bias``)."""

    def _check_weight_offset(self, p: list[str], m: str, lv: QuantizedLinearView) -> None:
        """A weight-only zero point: the scale's shape, integer codes in the weight's range."""
        wo, name = lv.weight_offset, f"{m}.weight_offset"
        if wo is None or not self._expect(p, name, wo, FLOATS + (torch.int8, torch.int32),
                                          tuple(lv.weight_scale.shape)):
            return
        lo, hi = -(2 ** (lv.bits - 1)), 2 ** (lv.bits - 1) - 1
        w = wo.double()
        if not torch.equal(w, w.round()) or float(w.min()) < lo or float(w.max()) > hi:
            p.append(f"{self._where(name)} is not an integer zero point in [{lo}, {hi}]")


def read_quantized(path: str | Path) -> QuantizedModelView:
    """Open a quantized output directory of any supported format (auto-detected)."""
    path = Path(path)
    if not path.is_dir():
        raise OutputError(f"{path} is not a directory")
    fmt = detect_format(path)
    if fmt is None:
        raise OutputError(
            f"{path} is not a quantized model (no quant_model_description*.json, compressed-tensors "
            "config.json or fakequant record)"
        )
    return get_format(fmt).read(path)


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))
