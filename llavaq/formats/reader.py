"""Read any quantized output (ours or msModelSlim's own) back as integer-kernel parameters.

``read_quantized(path)`` detects the format and returns a :class:`QuantizedModelView`:

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from llavaq.errors import LlavaqError, OutputError
from llavaq.files import RECORD_FILE
from llavaq.formats.base import detect_format
from llavaq.formats.compressed_tensors import CompressedTensorsConfig
from llavaq.formats.fakequant import dequantize_weight
from llavaq.formats.names import to_internal
from llavaq.model.checkpoint import SAFETENSORS_DTYPES, read_safetensors_header
from llavaq.quant.state import unpack_deq_scale

RECORD = RECORD_FILE
MSM_PREFIX = "quant_model_weight_w8a8"
HF_PREFIX = "model"
PARAMS_FILE = "llavaq_quant_params.st"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ZP_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64) + _FLOATS


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
        rename = rename or (lambda k: k)
        self.index_file: Path | None = None
        single = root / f"{prefix}.safetensors"
        index = root / f"{prefix}.safetensors.index.json"
        self.headers: dict[str, dict] = {}
        self.where: dict[str, str] = {}
        if single.is_file():
            self.files = [single.name]
        elif index.is_file():
            self.index_file = index
            try:
                idx = json.loads(index.read_text())
                weight_map = idx["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise OutputError(f"{index}: corrupted index (no weight_map)") from None
            self.files = sorted(set(weight_map.values()))
            for f in self.files:
                if not (root / f).is_file():
                    self.problems.append(f"{index.name}: shard {f} is missing")
            for f in sorted(p.name for p in root.glob(f"{prefix}-*-of-*.safetensors")):
                if f not in self.files:
                    self.problems.append(f"{f}: shard is not listed in {index.name}")
            self.files = [f for f in self.files if (root / f).is_file()]
        else:
            raise OutputError(f"{root}: no {single.name} or {index.name}")
        for f in self.files:
            try:
                h = read_safetensors_header(root / f)
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
        if self.index_file is not None:
            total = 0
            held = {key: self.where[name] for name, key in self.stored.items()}
            for key, f in weight_map.items():
                if key not in held and (root / f).is_file():
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
        self._handles: dict[str, Any] = {}

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
        from safetensors import safe_open

        if name not in self.where:
            raise OutputError(f"{self.root}: tensor {name} is missing")
        f = self.where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = safe_open(str(self.root / f), framework="pt")
        return h.get_tensor(self.stored[name])


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


# per format: suffixes of a quantized Linear's own tensors (besides bias)
_PARAMS = {
    "msmodelslim": ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias",
                    "deq_scale"),
    "compressed-tensors": ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point"),
    "fakequant": ("weight",),
}
_PARAMS["mindie"] = _PARAMS["msmodelslim"]
_REQUIRED = {
    "msmodelslim": ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias",
                    "deq_scale"),
    "compressed-tensors": ("weight", "weight_scale", "input_scale", "input_zero_point"),
    "fakequant": ("weight",),
}
_REQUIRED["mindie"] = _REQUIRED["msmodelslim"]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        raise OutputError(f"{path}: invalid JSON") from None


class QuantizedModelView:
    """A quantized output directory, read lazily. Build it with :func:`read_quantized`."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.format = fmt
        self.config: dict | None = _read_json(path / "config.json")
        rec = _read_json(path / RECORD)
        self.record: dict | None = rec if isinstance(rec, dict) else None
        self.description: dict[str, str] | None = None
        self.description_file: str | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.ct_config = None  # the parsed quantization_config (compressed-tensors)
        if fmt in ("msmodelslim", "mindie"):
            self.description_file = ("quant_model_description_w8a8.json" if fmt == "mindie"
                                     else "quant_model_description.json")
            desc = _read_json(path / self.description_file)
            if not isinstance(desc, dict):
                raise OutputError(f"{path / self.description_file}: not a description object")
            self.description = desc
            self.files = TensorFiles(path, MSM_PREFIX)
            self.quantized = [n[: -len(".weight")] for n, tag in desc.items()
                              if tag == "W8A8" and n.endswith(".weight")]
        elif fmt == "compressed-tensors":
            # keys of either transformers layout (llm-compressor, transformers >= 4.52) as internal 4.37 names
            self.files = TensorFiles(path, HF_PREFIX, rename=to_internal)
            self.ct_config = CompressedTensorsConfig((self.config or {}).get("quantization_config"),
                                                     str(path / "config.json"))
            self.quantized = [n[: -len(".weight_scale")] for n in self.files.names if n.endswith(".weight_scale")]
        elif fmt == "fakequant":
            from safetensors.torch import load_file

            self.files = TensorFiles(path, HF_PREFIX, rename=to_internal)
            pf = path / PARAMS_FILE
            if not pf.is_file():
                raise OutputError(f"{pf} is missing: the fakequant output has no weight scales")
            try:
                self.params = load_file(str(pf))
            except Exception:
                raise OutputError(f"{pf}: corrupted safetensors file") from None
            self.quantized = [n[: -len(".weight_scale")] for n in self.params if n.endswith(".weight_scale")]
        else:
            raise OutputError(f"{path}: reading format {fmt!r} is not supported")
        if fmt not in ("msmodelslim", "mindie"):  # HF files have no meaningful order: use the model's
            order = {n: i for i, n in enumerate((self.record or {}).get("quantized_modules") or [])}
            self.quantized.sort(key=lambda n: (order.get(n, len(order)), _natural(n)))

    # ------------------------------------------------------------------ names
    @cached_property
    def _quant_set(self) -> set[str]:
        return set(self.quantized)

    def module_of(self, tensor_name: str) -> str:
        return tensor_name.rpartition(".")[0]

    def is_linear_param(self, name: str) -> bool:
        module, _, suffix = name.rpartition(".")
        return module in self._quant_set and (suffix in _PARAMS[self.format] or suffix == "bias")

    @cached_property
    def float_names(self) -> list[str]:
        """Every stored tensor that is not a quantized Linear's own (float weights, norms, embeddings...)."""
        return [n for n in self.files.names if not self.is_linear_param(n)]

    @cached_property
    def float_linears(self) -> list[str]:
        """Float Linear modules: a 2-D float ``.weight`` that is not an embedding, and ``lm_head`` (tied or not)."""
        out = [n[: -len(".weight")] for n in self.float_names
               if n.endswith(".weight") and "embed" not in n.rpartition(".")[0].rpartition(".")[2]
               and len(self.files.shape(n)) == 2 and self.files.dtype(n) in _FLOATS]
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
        if self.format == "fakequant" and suffix != "weight" and suffix != "bias":
            if name not in self.params:
                raise OutputError(f"{self.path / PARAMS_FILE}: {name} is missing")
            return self.params[name]
        if name not in self.files:
            raise OutputError(f"{self.path}: tensor {name} is missing")
        return self.files.tensor(name)

    def linear(self, name: str) -> QuantizedLinearView:
        if self.format == "compressed-tensors":
            return self._ct_linear(name)
        ws = self._p(name, "weight_scale")
        s = self._p(name, "input_scale").float().reshape(1)
        bias = self.files.tensor(name + ".bias") if name + ".bias" in self.files else None
        quant_bias = None
        if self.format in ("msmodelslim", "mindie"):
            w = self._p(name, "weight")
            o = self._p(name, "input_offset").float().reshape(1)
            deq = unpack_deq_scale(self._p(name, "deq_scale"))
            quant_bias = self._p(name, "quant_bias")
        else:  # fakequant: W_q·ws stored, W_q recovered (checked to round-trip exactly)
            wd = self._p(name, "weight")
            w = torch.clamp(torch.round(wd.float() / ws.float()), -128, 127).to(torch.int8)
            o = self._p(name, "input_offset").float().reshape(1)
            deq = (s * ws.float()).squeeze(1).float()
        return QuantizedLinearView(name, w, ws, s, o, bias, deq, quant_bias)

    def _ct_linear(self, name: str) -> QuantizedLinearView:
        """compressed-tensors: ``input_zero_point`` is the offset (0 when symmetric); no deq_scale stored."""
        scheme = self.ct_config.scheme_for(name)
        w = self._p(name, "weight")
        ws = self._p(name, "weight_scale")
        if ws.numel() == 1 and w.dim() == 2:  # per-tensor weight scale: one value for every output channel
            ws = ws.reshape(1, 1).expand(w.shape[0], 1).contiguous()
        elif ws.dim() == 1:
            ws = ws.reshape(-1, 1)
        bias = self.files.tensor(name + ".bias") if name + ".bias" in self.files else None
        if scheme.activation == "static":
            s = self._p(name, "input_scale").float().reshape(1)
            o = (torch.zeros(1) if scheme.input_symmetric
                 else self._p(name, "input_zero_point").float().reshape(1))
        else:
            s, o = torch.ones(1), torch.zeros(1)
        deq = (s * ws.float()).squeeze(1).float()
        return QuantizedLinearView(name, w, ws, s, o, bias, deq, None, scheme.activation)

    def linears(self) -> Iterator[QuantizedLinearView]:
        for n in self.quantized:
            yield self.linear(n)

    # ------------------------------------------------------------------ consistency
    def check(self) -> list[str]:
        """Consistency problems, each one line naming the tensor and its file; empty when consistent."""
        problems = list(self.files.problems)
        f = self.files
        where = lambda n: f"{f.file_of(n)}: {f.stored_name(n)}"  # noqa: E731
        if self.description is not None:
            for n, tag in self.description.items():
                if n in ("version", "model_quant_type") or tag not in ("W8A8", "FLOAT"):
                    continue
                if n not in f:
                    problems.append(f"{self.description_file}: {n} has no tensor in the weight files")
                else:
                    want = "W8A8" if (self.is_linear_param(n) and not n.endswith(".bias")) else "FLOAT"
                    if tag != want:
                        problems.append(f"{self.description_file}: {n} is tagged {tag}, expected {want}")
            for n in f.names:
                if n not in self.description:
                    problems.append(f"{where(n)} is not in {self.description_file}")
        if self.format == "compressed-tensors":
            problems += self.ct_config.problems(self.quantized, self.float_linears)
        if self.format == "fakequant":
            acts = (self.record or {}).get("activation_quant")
            if not isinstance(acts, dict):
                problems.append(f"{RECORD}: activation_quant is missing")
                acts = {}
        for m in self.quantized:
            required = _REQUIRED[self.format]
            if self.format == "compressed-tensors":
                try:
                    scheme = self.ct_config.scheme_for(m)
                except LlavaqError:
                    continue  # reported above (no config group targets it)
                required = ("weight", "weight_scale") + (
                    ("input_scale",) if scheme.activation == "static" else ()) + (
                    ("input_zero_point",) if scheme.activation == "static" and not scheme.input_symmetric else ())
            missing = [s for s in required if f"{m}.{s}" not in f]
            if self.format == "fakequant":
                missing += [s for s in ("weight_scale", "input_scale", "input_offset") if f"{m}.{s}" not in self.params]
            if missing:
                in_params = self.format == "fakequant" and missing[0] != "weight"
                problems.append(f"{m}.{missing[0]} is missing ({PARAMS_FILE if in_params else 'weights'})")
                continue
            problems += self._check_linear(m, where, dequantize_weight)
            if self.format == "fakequant":
                rec = acts.get(m)
                lv_s, lv_o = self.params[f"{m}.input_scale"], self.params[f"{m}.input_offset"]
                if rec is None or rec.get("input_scale") != lv_s.item() or rec.get("input_offset") != lv_o.item():
                    problems.append(f"{RECORD}: activation_quant[{m}] does not match {PARAMS_FILE}")
        for n in self.float_names:
            if f.dtype(n) in _FLOATS:
                t = f.tensor(n)
                if not torch.isfinite(t).all():
                    problems.append(f"{where(n)} has NaN/Inf")
        return problems

    def _check_linear(self, m: str, where, dequantize_weight) -> list[str]:
        f = self.files
        p: list[str] = []
        lv = self.linear(m)
        w = lv.weight
        wn = f"{m}.weight"
        if self.format == "fakequant":
            wd = f.tensor(wn)
            if wd.dtype not in _FLOATS or wd.dim() != 2:
                return [f"{where(wn)} must be a float matrix, is {wd.dtype} {list(wd.shape)}"]
            if not torch.isfinite(wd).all():
                return [f"{where(wn)} has NaN/Inf"]
            if not torch.equal(dequantize_weight(w, lv.weight_scale), wd) or (wd.float() / lv.weight_scale.float()
                                                                            ).abs().max() > 127.5:
                p.append(f"{where(wn)} is not W_q·weight_scale for an int8 W_q")
        elif w.dtype != torch.int8 or w.dim() != 2:
            return [f"{where(wn)} must be int8 [out, in], is {w.dtype} {list(w.shape)}"]
        elif int(w.min()) < -127 and (self.record is not None or self.format != "compressed-tensors"):
            # llavaq and msModelSlim quantize weights symmetrically to [-127, 127]; compressed-tensors' own
            # symmetric range is [-128, 127] (scale = absmax/127.5), so other tools' files may hold -128
            p.append(f"{where(wn)} holds -128 (int8 weights must be in [-127, 127])")
        out = w.shape[0]
        src = (lambda n: f"{PARAMS_FILE}: {n}") if self.format == "fakequant" else where  # noqa: E731

        def expect(name: str, t: torch.Tensor, dtypes, shape) -> bool:
            if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
                p.append(f"{src(name) if name in self.params else where(name)} must be "
                         f"{'/'.join(str(d).replace('torch.', '') for d in dtypes)} {list(shape)}, "
                         f"is {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
                return False
            if t.dtype in _FLOATS and not torch.isfinite(t).all():
                p.append(f"{src(name) if name in self.params else where(name)} has NaN/Inf")
                return False
            return True

        ok = expect(f"{m}.weight_scale", lv.weight_scale, _FLOATS, (out, 1))
        if ok and not (lv.weight_scale > 0).all():
            p.append(f"{where(m + '.weight_scale')} has non-positive scales")
        s_name = f"{m}.input_scale"
        if self.format == "compressed-tensors":
            # any float dtype (llm-compressor stores the model dtype; llavaq float32), one value
            if lv.activation == "static":
                raw_s = f.tensor(s_name)
                ok &= expect(s_name, raw_s, _FLOATS, tuple(raw_s.shape) if raw_s.numel() == 1 else (1,))
                if ok and not raw_s.item() > 0:
                    p.append(f"{where(s_name)} is not positive")
                    ok = False
                zn = f"{m}.input_zero_point"
                if zn in f:
                    z = f.tensor(zn)
                    if expect(zn, z, _ZP_DTYPES, tuple(z.shape) if z.numel() == 1 else (1,)):
                        zv = z.double().item()
                        if zv != round(zv) or not -128 <= zv <= 127:
                            p.append(f"{where(zn)} = {zv} is not an integer in [-128, 127]")
            wz = f"{m}.weight_zero_point"
            if wz in f and not torch.all(f.tensor(wz) == 0):
                p.append(f"{where(wz)} must be zero (symmetric weights)")
        else:
            raw_s = self.params[s_name] if self.format == "fakequant" else f.tensor(s_name)
            ok &= expect(s_name, raw_s, (torch.float32,), (1,))
            if ok and not raw_s.item() > 0:
                p.append(f"{src(s_name) if self.format == 'fakequant' else where(s_name)} is not positive")
                ok = False

            on = f"{m}.input_offset"
            raw_o = self.params[on] if self.format == "fakequant" else f.tensor(on)
            if expect(on, raw_o, (torch.float32,), (1,)):
                o = raw_o.item()
                if o != round(o) or not -128 <= o <= 127:
                    p.append(f"{src(on) if self.format == 'fakequant' else where(on)} = {o} is not an integer in "
                             "[-128, 127]")
        if lv.bias is not None:
            expect(f"{m}.bias", lv.bias, _FLOATS, (out,))
        if self.format in ("msmodelslim", "mindie"):
            dn = f"{m}.deq_scale"
            raw_d = f.tensor(dn)
            if expect(dn, raw_d, (torch.int64, torch.float32), (out,)) and ok:
                want = (lv.input_scale * lv.weight_scale.float()).squeeze(1).float()
                if not torch.equal(lv.deq_scale, want):
                    bad = int((lv.deq_scale != want).nonzero()[0, 0])
                    p.append(f"{where(dn)}[{bad}] = {lv.deq_scale[bad].item()!r} != input_scale·weight_scale = "
                             f"{want[bad].item()!r}")
            wo = f"{m}.weight_offset"
            if expect(wo, f.tensor(wo), _FLOATS, (out, 1)) and not torch.all(f.tensor(wo) == 0):
                p.append(f"{where(wo)} must be zero (symmetric weights)")
            qn = f"{m}.quant_bias"
            if expect(qn, lv.quant_bias, (torch.int32,), (out,)) and ok and torch.isfinite(lv.deq_scale).all():
                b = lv.bias.float() if lv.bias is not None else torch.zeros(out)
                ideal = b.double() / lv.deq_scale.double() - lv.input_offset.double() * w.double().sum(1)
                # the stored bias is rounded to the model dtype after quant_bias was computed
                tol = 1 + (b.double().abs() / lv.deq_scale.double()) * 2.0 ** -7
                err = (lv.quant_bias.double() - ideal).abs()
                if (err > tol).any():
                    bad = int((err > tol).nonzero()[0, 0])
                    p.append(f"{where(qn)}[{bad}] = {int(lv.quant_bias[bad])} is inconsistent with bias/deq_scale − "
                             f"input_offset·ΣW_q = {ideal[bad].item():.1f}")
        return p


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
    return QuantizedModelView(path, fmt)


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))
