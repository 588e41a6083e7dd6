"""Do two quantized outputs carry the same model? (``llavaq inspect A B``)

Both outputs are read with :func:`llavaq.formats.reader.read_quantized`, whatever their format, and brought to one
representation: per quantized Linear its int8 codes ``W_q``, weight scales ``ws``, input scale and offset (zero
point), float bias and activation mode; every other tensor by name (llavaq's names, whatever the file's layout).

Two outputs carry **the same model** when

- the same Linears are quantized, with identical int8 codes and the same activation mode;
- scales, offsets, biases and float tensors are equal *up to the one documented rounding*: a format may store a
  tensor in a lower precision than another (``--float_dtype float16``; with ``auto`` compressed-tensors and
  fakequant keep only the tensors the recipe left unchanged in the checkpoint dtype, lossless, and msModelSlim's
  CPU export stores float32), and then the lower-precision tensor must be the other one cast once
  to its dtype (round to nearest even), bit for bit. Two tensors of the same dtype must be equal.

msModelSlim's ``quant_bias`` is compared when both outputs store it (it is derived from the bias and the scales,
which :meth:`~llavaq.formats.reader.QuantizedModelView.check` verifies). A tied ``lm_head`` that one output leaves
out is its embedding table. Pure: no printing, no model forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llavaq.formats.reader import QuantizedLinearView, QuantizedModelView, read_quantized

LM_HEAD, EMBED = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
#: float dtypes by precision; a lower rank is a rounding of a higher one (float16 and bfloat16 are not of each other)
_RANK = {torch.float64: 3, torch.float32: 2, torch.float16: 1, torch.bfloat16: 1}


def equal_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a == b``, or, of two float dtypes of different precision, the more precise one cast once to the other's
    dtype equals the other bit for bit (the one rounding a format may add)."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    if not (a.is_floating_point() and b.is_floating_point()):  # e.g. an int8 zero point vs a float offset
        return torch.equal(a.double(), b.double())
    ra, rb = _RANK.get(a.dtype, 0), _RANK.get(b.dtype, 0)
    if ra == rb:  # float16 vs bfloat16: neither is the other's rounding; equal only if both hold the same values
        return torch.equal(a.float(), b.float())
    lo = a.dtype if ra < rb else b.dtype
    return torch.equal(a.to(lo), b.to(lo))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |a| (0 when both are zero)."""
    den = float(a.double().abs().max()) if a.numel() else 0.0
    d = _max_abs(a, b)
    return d / den if den > 0 else (0.0 if d == 0 else float("inf"))


@dataclass
class LinearDiff:
    """One quantized Linear of both outputs."""

    name: str
    code_fraction: float  # fraction of int8 weight codes that differ
    max_code_step: int  # largest |ΔW_q|
    scale_rel: float  # max |Δws| / max |ws|
    weight_rel: float  # max |Δ(W_q·ws)| / max |W_q·ws| (the dequantized weights)
    input_scale_rel: float
    input_offset_abs: float
    bias_abs: float  # max |Δbias| (0 without bias)
    same: bool  # identical codes, everything else equal up to the documented rounding
    notes: list[str] = field(default_factory=list)


@dataclass
class FloatDiff:
    """One float tensor (norms, embeddings, float Linears...) of both outputs."""

    name: str
    dtypes: tuple[str, str]
    max_abs: float
    max_rel: float  # max |Δ| / max |a|
    same: bool  # equal up to the documented rounding
    rounded: bool  # stored in different precisions (equal or not)


@dataclass
class Comparison:
    """The result of :func:`compare_outputs`."""

    a: str
    b: str
    formats: tuple[str, str]
    linears: list[LinearDiff]
    floats: list[FloatDiff]
    #: structural differences: Linears quantized in one output only, tensors in one only, shape mismatches
    structure: list[str]

    @property
    def same_model(self) -> bool:
        return not self.structure and all(d.same for d in self.linears) and all(f.same for f in self.floats)

    @property
    def rounded(self) -> list[str]:
        """Float tensors that one output stores in a lower precision (the documented rounding)."""
        return [f.name for f in self.floats if f.rounded]

    def largest(self, n: int = 10) -> list[tuple[str, str, float, bool]]:
        """The ``n`` largest differences, most severe first: (tensor, what, value, within the documented
        rounding). Differences beyond the rounding first; among them codes, then scales, then float tensors.
        A structural difference is not listed here (see :attr:`structure`)."""
        rows: list[tuple[bool, int, float, str, str]] = []
        for d in self.linears:
            if d.code_fraction:
                rows.append((False, 0, d.code_fraction, d.name + ".weight", "codes differing (fraction)"))
            for what, v in (("weight_scale", d.scale_rel), ("input_scale", d.input_scale_rel)):
                if v:
                    rows.append((d.same, 1, v, f"{d.name}.{what}", "max rel Δ"))
            if d.input_offset_abs:
                rows.append((False, 1, d.input_offset_abs, d.name + ".input_offset", "max abs Δ"))
            if d.bias_abs:
                rows.append((d.same, 2, d.bias_abs, d.name + ".bias", "max abs Δ"))
        rows += [(f.same, 2, f.max_rel, f.name, "max rel Δ") for f in self.floats if f.max_rel]
        rows.sort(key=lambda r: (r[0], r[1], -r[2]))
        return [(name, what, v, ok) for ok, _, v, name, what in rows[:n]]

    def to_dict(self, n: int = 10) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "formats": list(self.formats), "same_model": self.same_model,
                "structure": self.structure, "rounded": self.rounded,
                "linears_differing": [d.name for d in self.linears if not d.same],
                "floats_differing": [f.name for f in self.floats if not f.same],
                "largest": [{"tensor": t, "what": w, "value": v, "within_rounding": ok}
                            for t, w, v, ok in self.largest(n)],
                "linears": [asdict(d) for d in self.linears], "floats": [asdict(f) for f in self.floats]}


def compare_linear(a: QuantizedLinearView, b: QuantizedLinearView) -> LinearDiff:
    """The differences of one quantized Linear read from two outputs (any formats)."""
    notes = []
    if a.weight.shape != b.weight.shape:
        return LinearDiff(a.name, 1.0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, False,
                          [f"shape {list(a.weight.shape)} vs {list(b.weight.shape)}"])
    diff = a.weight != b.weight
    step = int((a.weight.int() - b.weight.int()).abs().max()) if diff.any() else 0
    wa, wb = a.weight.float() * a.weight_scale.float(), b.weight.float() * b.weight_scale.float()
    ok_scale = equal_up_to_rounding(a.weight_scale, b.weight_scale)
    ok_in = equal_up_to_rounding(a.input_scale, b.input_scale) and torch.equal(a.input_offset, b.input_offset)
    if a.activation != b.activation:
        notes.append(f"activations {a.activation} vs {b.activation}")
    bias_abs, ok_bias = 0.0, True
    if (a.bias is None) != (b.bias is None):
        notes.append("bias in one output only")
        ok_bias = False
    elif a.bias is not None:
        bias_abs, ok_bias = _max_abs(a.bias, b.bias), equal_up_to_rounding(a.bias, b.bias)
    if a.quant_bias is not None and b.quant_bias is not None and not torch.equal(a.quant_bias, b.quant_bias):
        notes.append("quant_bias differs")
    same = not diff.any() and ok_scale and ok_in and ok_bias and not notes
    return LinearDiff(a.name, float(diff.float().mean()), step, _max_rel(a.weight_scale, b.weight_scale),
                      _max_rel(wa, wb), _max_rel(a.input_scale, b.input_scale),
                      _max_abs(a.input_offset, b.input_offset), bias_abs, same, notes)


def compare_float(name: str, a: torch.Tensor, b: torch.Tensor) -> FloatDiff:
    dtypes = (str(a.dtype).replace("torch.", ""), str(b.dtype).replace("torch.", ""))
    return FloatDiff(name, dtypes, _max_abs(a, b), _max_rel(a, b), equal_up_to_rounding(a, b), a.dtype != b.dtype)


def _float_tensor(view: QuantizedModelView, name: str, names: set[str]) -> torch.Tensor | None:
    if name in names:
        return view.tensor(name)
    if name == LM_HEAD and EMBED in names:  # tied: the output leaves lm_head out
        return view.tensor(EMBED)
    return None


def _compare_floats(va: QuantizedModelView, vb: QuantizedModelView, skip: set[str], structure: list[str]
                    ) -> list[FloatDiff]:
    """Every float tensor of either output but those in ``skip``; names in one output only go to ``structure``."""
    na, nb = set(va.float_names) - skip, set(vb.float_names) - skip
    out = []
    for name in sorted(na | nb, key=lambda n: (n not in na, n)):
        ta, tb = _float_tensor(va, name, na), _float_tensor(vb, name, nb)
        if ta is None or tb is None:
            structure.append(f"{name} is only in {'A' if tb is None else 'B'}")
        elif ta.shape != tb.shape:
            structure.append(f"{name} has shape {list(ta.shape)} in A, {list(tb.shape)} in B")
        else:
            out.append(compare_float(name, ta, tb))
    return out


def _quantized_in_one(name: str, which: str, other: QuantizedModelView) -> str:
    kept = name + ".weight" in set(other.float_names)
    return f"{name} is quantized in {which} only" + (" (float in the other)" if kept else "")


def compare_outputs(a: str | Path, b: str | Path) -> Comparison:
    """Compare two quantized output directories (any formats llavaq reads). Raises ``OutputError`` (one line)
    if one cannot be read."""
    va, vb = read_quantized(a), read_quantized(b)
    qa, qb = set(va.quantized), set(vb.quantized)
    structure = [_quantized_in_one(n, "A", vb) for n in va.quantized if n not in qb]
    structure += [_quantized_in_one(n, "B", va) for n in vb.quantized if n not in qa]
    # a Linear quantized in one output only is a structural difference, not a float tensor of the other
    skip = {n + s for n in qa ^ qb for s in (".weight", ".bias")}
    linears = [compare_linear(va.linear(n), vb.linear(n)) for n in va.quantized if n in qb]
    floats = _compare_floats(va, vb, skip, structure)
    return Comparison(str(a), str(b), (va.format, vb.format), linears, floats, structure)
