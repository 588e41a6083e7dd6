"""``compressed-tensors`` (vLLM's int8 W8A8 static format), written from the msModelSlim tensor stream.

Per quantized Linear ``L`` (HF names, e.g. ``language_model.model.layers.0.self_attn.q_proj``):

=========================  =====================  ==========================================
tensor                     dtype / shape           value
=========================  =====================  ==========================================
``L.weight``               int8 [out, in]          ``W_q`` (same as msModelSlim's)
``L.weight_scale``         float32 [out, 1]        ``ws`` (per-channel, symmetric: no zero point)
``L.input_scale``          float32 [1]             msModelSlim's ``input_scale``
``L.input_zero_point``     int8 [1]                msModelSlim's ``input_offset`` (integer-valued)
``L.bias`` (if any)        model dtype [out]       float bias, smoothing shift folded in
=========================  =====================  ==========================================

compressed-tensors quantizes ``q = clamp(round(x/scale + zp), −128, 127)`` and dequantizes
``(q − zp)·scale``; msModelSlim's ``x_q = clamp(round(x/input_scale + input_offset))`` is the same
expression, so ``zp = input_offset`` exactly. ``input_scale`` and ``weight_scale`` stay float32, the msModelSlim
file's scales bit for bit (vLLM's parameters are float32; transformers upcasts; rounding ``weight_scale`` to the
model dtype would move the int8 grid: other codes than the msModelSlim file of the same recipe, issue 30).
``weight_offset``, ``quant_bias`` and ``deq_scale`` are msModelSlim kernel parameters and are not written (the
library drops all-zero zero points of symmetric weights itself). Every other tensor is the float model's (smoothing
folded), cast once from float32 to the model dtype.
``config.json`` gets a ``quantization_config`` that ``compressed_tensors.QuantizationConfig`` parses
(the library's own ``model_dump`` of it). Tensor keys keep the checkpoint's (transformers 4.37) names, which
every loader maps; every float Linear is listed in ``ignore`` as one anchored ``re:`` pattern that matches it
in every module layout (:func:`llavaq.formats.names.module_pattern`): the loaded model's names are
``language_model.model.layers.N…`` / ``language_model.lm_head`` in transformers 4.37 and vLLM, but
``model.language_model.layers.N…`` / ``lm_head`` in transformers >= 4.52 (and ``model.vision_tower.encoder…``
from 5.6), and a plain 4.37 name would leave those Linears quantized there, with no scales (NaN).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llavaq.errors import LlavaqError, OutputError
from llavaq.formats.base import ExportContext, OutputFormat, TensorStream, copy_model_files, register_format
from llavaq.formats.hf import HF_INDEX, HF_PREFIX, write_hf_config, write_hf_safetensors
from llavaq.formats.msmodelslim import write_record
from llavaq.formats.names import LAYOUT_NAMES, entry_matches, layouts, matching_layouts, module_pattern, to_internal
from llavaq.formats.pack_quantized import FORMAT as PACKED
from llavaq.formats.pack_quantized import PACKED_PARAMS, packed_tensors, unpacked, weight_args
from llavaq.formats.reader import FLOATS, QuantizedLinearView, QuantizedModelView
from llavaq.formats.tensorfiles import TensorFiles
from llavaq.recipe import QuantRecipe

DROPPED = ("weight_offset", "quant_bias", "deq_scale")
ZP_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64) + FLOATS


def _args(symmetric: bool, strategy: str) -> dict[str, Any]:
    # Every field of compressed_tensors 0.8.1 QuantizationArgs.model_dump(), in its order.
    return {"num_bits": 8, "type": "int", "symmetric": symmetric, "group_size": None, "strategy": strategy,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


def compressed_tensors_config(quantized: list[str], float_linears: list[str], recipe: QuantRecipe | None = None
                              ) -> dict[str, Any]:
    """The ``quantization_config`` we emit: int8 W8A8 static, channel-wise weights, per-tensor inputs; or, for a
    weight-only recipe, ``pack-quantized`` int4/int8 weights (:mod:`llavaq.formats.pack_quantized`), no activations.

    Targets are by class (``Linear``); each float Linear is excluded by a pattern matching every layout.
    """
    del quantized
    weight_only = recipe is not None and recipe.weight_only
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_args(recipe) if weight_only else _args(True, "channel"),
                "input_activations": None if weight_only else _args(False, "tensor"),
                "output_activations": None,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": PACKED if weight_only else "int-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": [module_pattern(n) for n in float_linears],
    }


class CompressedTensorsView(QuantizedModelView):
    """A compressed-tensors output (ours, llm-compressor's, either transformers key layout), as its config says."""

    linear_params = ("weight", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point") + PACKED_PARAMS

    def _open(self) -> tuple[TensorFiles, list[str]]:
        # keys of either transformers layout (llm-compressor, transformers >= 4.52) as internal 4.37 names
        files = TensorFiles(self.path, HF_PREFIX, rename=to_internal)
        self.ct_config = CompressedTensorsConfig((self.config or {}).get("quantization_config"),
                                                 str(self.path / "config.json"))
        return files, [n[: -len(".weight_scale")] for n in files.names if n.endswith(".weight_scale")]

    def linear(self, name: str) -> QuantizedLinearView:
        """``input_zero_point`` is the offset (0 when symmetric); no deq_scale stored."""
        scheme = self.ct_config.scheme_for(name)
        if scheme.bits != 8 or f"{name}.weight_packed" in self.files:
            return self._packed_linear(name, scheme)
        w = self._p(name, "weight")
        ws = self._p(name, "weight_scale")
        if ws.numel() == 1 and w.dim() == 2:  # per-tensor weight scale: one value for every output channel
            ws = ws.reshape(1, 1).expand(w.shape[0], 1).contiguous()
        elif ws.dim() == 1:
            ws = ws.reshape(-1, 1)
        if scheme.activation == "static":
            s = self._p(name, "input_scale").float().reshape(1)
            o = (torch.zeros(1) if scheme.input_symmetric
                 else self._p(name, "input_zero_point").float().reshape(1))
        else:
            s, o = torch.ones(1), torch.zeros(1)
        deq = (s * ws.float()).squeeze(1).float()
        return QuantizedLinearView(name, w, ws, s, o, self._bias(name), deq, None, scheme.activation)

    def _packed_linear(self, name: str, scheme: LinearScheme) -> QuantizedLinearView:
        ws = self._p(name, "weight_scale")
        ws = ws.reshape(-1, 1) if ws.dim() == 1 else ws
        zp = None if scheme.weight_symmetric else self._p(name, "weight_zero_point")
        codes, offset = unpacked(self._p(name, "weight_packed"), self._p(name, "weight_shape"), ws, zp, scheme.bits)
        return QuantizedLinearView(name, codes, ws, torch.ones(1), torch.zeros(1), self._bias(name),
                                   ws[:, 0].float(), None, "none", weight_offset=offset, bits=scheme.bits)

    def _check_layout(self) -> list[str]:
        return self.ct_config.problems(self.quantized, self.float_linears)

    def _required(self, m: str) -> tuple[str, ...] | None:
        try:
            scheme = self.ct_config.scheme_for(m)
        except LlavaqError:
            return None  # reported by _check_layout (no config group targets it)
        static = scheme.activation == "static"
        if scheme.packed:
            return ("weight_packed", "weight_scale", "weight_shape") + (
                () if scheme.weight_symmetric else ("weight_zero_point",))
        return ("weight", "weight_scale") + (("input_scale",) if static else ()) + (
            ("input_zero_point",) if static and not scheme.input_symmetric else ())

    def _strict_weight_range(self) -> bool:
        # llavaq quantizes weights to [-127, 127]; compressed-tensors' own symmetric range is [-128, 127]
        return self.record is not None

    def _check_input(self, p: list[str], m: str, lv: QuantizedLinearView, ok: bool) -> bool:
        """Any float dtype for ``input_scale`` (llm-compressor stores the model dtype; llavaq float32), one value;
        an integer ``input_zero_point`` in [-128, 127]; all-zero weight zero points."""
        f = self.files
        if lv.activation == "static":
            s_name = f"{m}.input_scale"
            raw_s = f.tensor(s_name)
            ok &= self._expect(p, s_name, raw_s, FLOATS, tuple(raw_s.shape) if raw_s.numel() == 1 else (1,))
            if ok and not raw_s.item() > 0:
                p.append(f"{self._where(s_name)} is not positive")
                ok = False
            zn = f"{m}.input_zero_point"
            if zn in f:
                z = f.tensor(zn)
                if self._expect(p, zn, z, ZP_DTYPES, tuple(z.shape) if z.numel() == 1 else (1,)):
                    zv = z.double().item()
                    if zv != round(zv) or not -128 <= zv <= 127:
                        p.append(f"{self._where(zn)} = {zv} is not an integer in [-128, 127]")
        wz = f"{m}.weight_zero_point"
        if lv.activation == "none" and lv.weight_offset is not None:
            self._check_weight_offset(p, m, lv)
        elif wz in f and not torch.all(f.tensor(wz) == 0):
            p.append(f"{self._where(wz)} must be zero (symmetric weights)")
        return ok


@register_format("compressed-tensors")
class CompressedTensorsFormat(OutputFormat):
    name = "compressed-tensors"
    description = "compressed-tensors int-quantized W8A8 static (vLLM): model.safetensors + quantization_config"
    view = CompressedTensorsView

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        quantized = ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears)
        qset = set(quantized)
        held: dict[str, torch.Tensor] = {}

        def convert():
            for name, t, _tag in tensors:
                module, _, suffix = name.rpartition(".")
                if module not in qset:
                    yield name, t
                elif ctx.recipe.weight_only and suffix != "bias":  # codes, scale, offset -> pack-quantized
                    held[suffix] = t
                    if suffix == "weight_offset":
                        yield from packed_tensors(module, held.pop("weight"), held.pop("weight_scale"), t, ctx.recipe)
                elif suffix in DROPPED:
                    continue
                elif suffix == "input_offset":
                    zp = t.float().reshape(1)
                    if not (torch.equal(zp, zp.round()) and -128 <= zp.item() <= 127):
                        raise OutputError(f"{name} = {zp.item()} is not an int8 zero point")
                    yield module + ".input_zero_point", zp.to(torch.int8)
                elif suffix == "input_scale":
                    yield name, t.float().reshape(1)
                else:
                    yield name, t

        weight_map = write_hf_safetensors(out_dir, convert(), ctx)
        float_linears = [n for n in ctx.arch.linear_names if n not in qset]
        write_hf_config(out_dir, ctx, compressed_tensors_config(quantized, float_linears, ctx.recipe))
        copy_model_files(ctx.model_path, out_dir)
        write_record(out_dir, ctx, self.name)
        return {"tensors": len(weight_map), "files": sorted(set(weight_map.values()))}

    def detect(self, path: Path) -> bool:
        cfg = _read_config(path)
        qc = cfg.get("quantization_config") if cfg else None
        return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" and (
            (path / "model.safetensors").is_file() or (path / HF_INDEX).is_file())


def _read_config(path: Path) -> dict | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


# ---------------------------------------------------------------------------------------------- reading
#: int8 weight formats whose quantized weight is stored as ``L.weight`` (int8) + ``L.weight_scale``
READABLE_FORMATS = ("int-quantized", "naive-quantized", PACKED)


@dataclass(frozen=True)
class LinearScheme:
    """What a compressed-tensors config group asks of one quantized Linear, as llavaq emulates it.

    ``activation``: ``static`` (per-tensor ``input_scale`` [+ ``input_zero_point`` when asymmetric]),
    ``dynamic`` (per-token symmetric scales computed at run time) or ``none`` (weight-only, W8A16).
    """

    group: str
    activation: str = "static"
    input_symmetric: bool = False
    weight_strategy: str = "channel"
    bits: int = 8
    weight_symmetric: bool = True
    #: weights stored pack-quantized (``weight_packed`` int32 + ``weight_shape``)
    packed: bool = False


def _unsupported(where: str, what: str) -> OutputError:
    return OutputError(f"{where}: {what} is not read by llavaq (int8 W8A8 static or per-token dynamic, or W8A16, "
                       "with int8 channel/tensor weights in the int-quantized format)")


def _scheme(name: str, group: Any, where: str) -> LinearScheme:
    if not isinstance(group, dict):
        raise _unsupported(where, f"config group {name} ({group!r})")
    w = group.get("weights")
    if not isinstance(w, dict):
        raise _unsupported(where, f"config group {name} without weight quantization")
    fmt = group.get("format")
    if fmt is not None and fmt not in READABLE_FORMATS:
        raise _unsupported(where, f"config group {name}'s format {fmt!r}")
    a = group.get("input_activations")
    if a is None and (w.get("num_bits"), w.get("type", "int"), bool(w.get("dynamic", False))) in (
            (4, "int", False), (8, "int", False)) and w.get("strategy") in ("channel", "group") and \
            w.get("actorder") in (None, "weight", "static"):  # weight-only; "group" act order (g_idx) is not read
        return LinearScheme(name, "none", True, w["strategy"], int(w["num_bits"]), bool(w.get("symmetric", True)),
                            packed=fmt == PACKED or group.get("packed", False) or int(w["num_bits"]) != 8)
    if (w.get("num_bits"), w.get("type", "int"), w.get("symmetric", True), bool(w.get("dynamic", False))) != (
            8, "int", True, False) or w.get("strategy") not in ("channel", "tensor"):
        raise _unsupported(where, f"config group {name}'s weights ({w.get('num_bits')}-bit {w.get('type')} "
                                  f"{w.get('strategy')}, symmetric={w.get('symmetric')}, actorder={w.get('actorder')})")
    if not isinstance(a, dict) or (a.get("num_bits"), a.get("type", "int")) != (8, "int"):
        raise _unsupported(where, f"config group {name}'s input activations ({a!r})")
    dynamic = a.get("dynamic", False)
    symmetric = bool(a.get("symmetric", True))
    if dynamic is False and a.get("strategy") == "tensor":
        return LinearScheme(name, "static", symmetric, w["strategy"])
    if dynamic in (True, "local") and a.get("strategy") == "token" and symmetric:
        return LinearScheme(name, "dynamic", True, w["strategy"])
    raise _unsupported(where, f"config group {name}'s input activations ({a.get('strategy')}, dynamic={dynamic}, "
                              f"symmetric={symmetric})")


class CompressedTensorsConfig:
    """A ``quantization_config`` as the loaders apply it: its groups' targets and its ``ignore`` list are
    matched against the module names of the loaded model, in the layout of the loader
    (:mod:`llavaq.formats.names`)."""

    def __init__(self, qc: Any, where: str) -> None:
        if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
            raise OutputError(f"{where}: no compressed-tensors quantization_config")
        self.where = where
        fmt = qc.get("format")
        if fmt not in READABLE_FORMATS and fmt != "mixed-precision":
            raise _unsupported(where, f"format {fmt!r}")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise OutputError(f"{where}: quantization_config has no config_groups")
        self.groups: dict[str, tuple[list[str], LinearScheme]] = {}
        for gname, g in groups.items():
            targets = g.get("targets") if isinstance(g, dict) else None
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise OutputError(f"{where}: config group {gname} has no list of targets")
            self.groups[gname] = (targets, _scheme(gname, g, where))
        ignore = qc.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
            raise OutputError(f"{where}: quantization_config.ignore is not a list of names")
        self.ignore: list[str] = ignore

    def _rank(self, targets: list[str], name: str) -> int | None:
        """compressed-tensors' precedence: exact name 0, ``re:`` pattern 1, class ``Linear`` 2; None: no match."""
        ranks = [0 if t == name else 1 if t.startswith("re:") and entry_matches(t, name) else
                 2 if t == "Linear" else None for t in targets]
        found = [r for r in ranks if r is not None]
        return min(found) if found else None

    def group_for(self, module: str, layout: int | None = None) -> LinearScheme | None:
        """The config group applying to internal Linear ``module`` (in one layout, or the first that has one)."""
        for i, name in enumerate(layouts(module)):
            if layout is not None and i != layout:
                continue
            best = None
            for targets, scheme in self.groups.values():
                r = self._rank(targets, name)
                if r is not None and (best is None or r < best[0]):
                    best = (r, scheme)
            if best is not None:
                return best[1]
        return None

    def scheme_for(self, module: str) -> LinearScheme:
        s = self.group_for(module)
        if s is None:
            raise OutputError(f"{self.where}: no config group targets quantized Linear {module}")
        return s

    def problems(self, quantized: list[str], float_linears: list[str]) -> list[str]:
        """Linears that a loader would treat wrongly under one of the module-name layouts (one line each)."""
        out = []
        for m in quantized:
            ignored = matching_layouts(self.ignore, m)
            for i, name in enumerate(layouts(m)):
                if ignored[i]:
                    out.append(f"config.json: quantization_config.ignore lists quantized Linear {m}"
                               + (f" (under the name {name}: {LAYOUT_NAMES[i]})" if name != m else ""))
                    break
                if self.group_for(m, i) is None:
                    out.append(f"config.json: no config group targets quantized Linear {m} under the name {name} "
                               f"({LAYOUT_NAMES[i]})")
                    break
        for m in float_linears:
            ignored = matching_layouts(self.ignore, m)
            for i, name in enumerate(layouts(m)):
                if not ignored[i] and self.group_for(m, i) is not None:
                    out.append(f"config.json: quantization_config.ignore does not cover float Linear {m} under the "
                               f"name {name} ({LAYOUT_NAMES[i]}): it would load as a quantized Linear with no scales "
                               "(NaN)")
                    break
        return out
