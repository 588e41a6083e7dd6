"""msModelSlim's output formats: ``ascendV1`` (default) and ``safe_tensor`` (``--mindie_format``).

Files: ``quant_model_weight_w8a8.safetensors`` (or ``-0000i-of-0000N`` shards + index json),
``quant_model_description.json`` (``"version": "1.0.0"`` first) or, for MindIE,
``quant_model_description_w8a8.json`` plus ``quantize`` / ``vision_config.quantize`` /
``quantization_config`` edits in config.json; tokenizer/processor/generation files copied.

Weight-only (W8A16 / W4A16), as msModelSlim 26.1.0 saves them: ``w8a16`` / ``w4a16`` in the file names and
``model_quant_type``; per Linear ``weight`` (int8 codes), ``bias`` (FLOAT), ``weight_scale`` and ``weight_offset``
(``[out, G]``, one per group; the offset is 0 for symmetric weights), tagged ``W8A16`` / ``W4A16``. ascendV1 adds
``"group_size": N`` after ``model_quant_type`` for group-wise weights and packs int4 codes two to an int8
(:func:`llavaq.quant.weight_only.pack_int4_msmodelslim`); the MindIE save stores them unpacked and has no
``group_size`` key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llavaq import __version__
from llavaq.errors import OutputError
from llavaq.formats.base import (
    RECORD,
    ExportContext,
    OutputFormat,
    TensorStream,
    copy_model_files,
    register_format,
    write_json,
)
from llavaq.formats.reader import FLOATS, QuantizedLinearView, QuantizedModelView, read_json
from llavaq.formats.sharding import TensorSpec, write_safetensors
from llavaq.formats.tensorfiles import TensorFiles
from llavaq.quant.kernel import unpack_deq_scale
from llavaq.quant.tensor_stream import quantized_tensor_specs
from llavaq.quant.weight_only import pack_int4_msmodelslim, stored_codes, stored_weight_shape

WEIGHT_PREFIX = "quant_model_weight_w8a8"
#: a quantized Linear's own tensors (besides bias), all required
LINEAR_PARAMS = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")
#: a weight-only Linear's
WEIGHT_ONLY_PARAMS = ("weight", "weight_scale", "weight_offset")
QUANT_TYPES = ("W8A8", "W8A16", "W4A16")


def weight_prefix(quant_type: str = "W8A8") -> str:
    return f"quant_model_weight_{quant_type.lower()}"
__all__ = ["RECORD", "MindIEFormat", "MsModelSlimFormat", "MsModelSlimView", "write_record"]


def quantization_config(ctx: ExportContext) -> dict[str, Any]:
    r = ctx.recipe
    return {
        "group_size": r.group_size,
        "act_method": r.act_method,
        "anti_method": r.anti_outlier if r.anti_outlier != "none" else "",
        "is_lowbit": r.group_size > 0,  # msModelSlim's per-group switch: is_lowbit on, open_outlier off
        "mm_tensor": False,
        "w_sym": r.w_sym,
        "open_outlier": r.group_size == 0,
        "is_dynamic": False,
        "w_bit": r.w_bit,
        "a_bit": r.a_bit,
        "dev_type": ctx.device_type,
    }


def write_record(out_dir: Path, ctx: ExportContext, fmt: str, extra: dict[str, Any] | None = None) -> None:
    """``llavaq_record.json``: tool, format, recipe, whether the params were derived, module lists."""
    rec = {
        "tool": "llavaq",
        "version": __version__,
        "format": fmt,
        "model_path": str(Path(ctx.model_path).resolve()),
        "recipe": ctx.recipe.to_dict(),
        "derived_from_cache": ctx.derived,
        **({"derivation": derivation_note(ctx.recipe)} if ctx.derived else {}),
        "float_dtype": str(ctx.float_dtype or ctx.arch.ckpt.torch_dtype).replace("torch.", ""),
        "quantized_modules": ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears),
        **ctx.extra_record,
        **(extra or {}),
    }
    write_json(out_dir / RECORD, rec)


def derivation_note(recipe) -> str:
    """How a derived export got its smoothing and activation ranges (no forward pass)."""
    smooth = (f"SmoothQuant (m1, alpha={recipe.alpha}) scales from the cached float per-channel min/max"
              if recipe.anti_outlier == "m1" else "no smoothing")
    return f"{smooth}; activation ranges = min-max of the cached float statistics; no forward pass"


def description_file_name(mindie: bool, quant_type: str = "W8A8") -> str:
    return f"quant_model_description_{quant_type.lower()}.json" if mindie else "quant_model_description.json"


def mindie_description(path: Path) -> str | None:
    """The MindIE description file in ``path`` (its name carries the quantization type), None if none."""
    return next((f for t in QUANT_TYPES if (path / (f := description_file_name(True, t))).is_file()), None)


class MsModelSlimView(QuantizedModelView):
    """An msModelSlim output (ours or msModelSlim's own): Linears in description order, kernel parameters."""

    linear_params = LINEAR_PARAMS
    required_params = LINEAR_PARAMS
    sort_by_model = False

    def _open(self) -> tuple[TensorFiles, list[str]]:
        mindie = self.format == "mindie"
        self.description_file = (mindie_description(self.path) if mindie else None) or description_file_name(mindie)
        desc = read_json(self.path / self.description_file)
        if not isinstance(desc, dict):
            raise OutputError(f"{self.path / self.description_file}: not a description object")
        self.description = desc
        self.quant_type = str(desc.get("model_quant_type", "W8A8"))
        if self.quant_type not in QUANT_TYPES:
            raise OutputError(f"{self.path / self.description_file}: model_quant_type {self.quant_type!r} is not read "
                              f"by llavaq ({', '.join(QUANT_TYPES)})")
        self.weight_only = self.quant_type != "W8A8"
        if self.weight_only:
            self.required_params = self.linear_params = WEIGHT_ONLY_PARAMS
        quantized = [n[: -len(".weight")] for n, tag in desc.items()
                     if tag == self.quant_type and n.endswith(".weight")]
        return TensorFiles(self.path, weight_prefix(self.quant_type)), quantized

    def _weight_only_linear(self, name: str) -> QuantizedLinearView:
        """Codes unpacked (ascendV1 packs int4 in pairs: of input columns per channel, of output rows per group)."""
        ws, wo = self._p(name, "weight_scale"), self._p(name, "weight_offset")
        bits = int(self.quant_type[1])
        w = self._p(name, "weight")
        if bits == 4 and self.format == "msmodelslim" and w.dtype == torch.int8 and w.dim() == 2 and ws.dim() == 2:
            w = stored_codes(w, 4, ws.shape[1] > 1)
        return QuantizedLinearView(name, w, ws, torch.ones(1), torch.zeros(1), self._bias(name),
                                   ws[:, 0].float() if ws.dim() == 2 else ws.float(), None, "none",
                                   weight_offset=wo, bits=bits)

    def linear(self, name: str) -> QuantizedLinearView:
        if self.weight_only:
            return self._weight_only_linear(name)
        ws = self._p(name, "weight_scale")
        s = self._p(name, "input_scale").float().reshape(1)
        o = self._p(name, "input_offset").float().reshape(1)
        deq = unpack_deq_scale(self._p(name, "deq_scale"))
        return QuantizedLinearView(name, self._p(name, "weight"), ws, s, o, self._bias(name), deq,
                                   self._p(name, "quant_bias"))

    def _check_layout(self) -> list[str]:
        """Description ↔ tensors: every W8A8/FLOAT entry has a tensor with that role, every tensor an entry."""
        problems, f, desc_file = [], self.files, self.description_file
        for n, tag in self.description.items():
            if n in ("version", "model_quant_type", "group_size") or tag not in (self.quant_type, "FLOAT"):
                continue
            if n not in f:
                problems.append(f"{desc_file}: {n} has no tensor in the weight files")
            else:
                want = self.quant_type if (self.is_linear_param(n) and not n.endswith(".bias")) else "FLOAT"
                if tag != want:
                    problems.append(f"{desc_file}: {n} is tagged {tag}, expected {want}")
        for n in f.names:
            if n not in self.description:
                problems.append(f"{self._where(n)} is not in {desc_file}")
        return problems

    def _check_input(self, p: list[str], m: str, lv: QuantizedLinearView, ok: bool) -> bool:
        if self.weight_only:
            return ok
        return self._check_static_input(p, m, self.files.tensor(f"{m}.input_scale"),
                                        self.files.tensor(f"{m}.input_offset"), ok)

    def _check_kernel(self, p: list[str], m: str, lv: QuantizedLinearView, ok: bool) -> None:
        if self.weight_only:
            self._check_weight_offset(p, m, lv)
            return
        f, out = self.files, lv.weight.shape[0]
        dn = f"{m}.deq_scale"
        if self._expect(p, dn, f.tensor(dn), (torch.int64, torch.float32), (out,)) and ok:
            want = (lv.input_scale * lv.weight_scale.float()).squeeze(1).float()
            if not torch.equal(lv.deq_scale, want):
                bad = int((lv.deq_scale != want).nonzero()[0, 0])
                p.append(f"{self._where(dn)}[{bad}] = {lv.deq_scale[bad].item()!r} != input_scale·weight_scale = "
                         f"{want[bad].item()!r}")
        wo = f"{m}.weight_offset"
        if self._expect(p, wo, f.tensor(wo), FLOATS, (out, 1)) and not torch.all(f.tensor(wo) == 0):
            p.append(f"{self._where(wo)} must be zero (symmetric weights)")
        qn = f"{m}.quant_bias"
        if self._expect(p, qn, lv.quant_bias, (torch.int32,), (out,)) and ok and torch.isfinite(lv.deq_scale).all():
            self._check_quant_bias(p, qn, lv)

    def _check_quant_bias(self, p: list[str], qn: str, lv: QuantizedLinearView) -> None:
        """``quant_bias ≈ bias/deq_scale − input_offset·ΣW_q`` (the bias is rounded after quant_bias was made)."""
        out = lv.weight.shape[0]
        b = lv.bias.float() if lv.bias is not None else torch.zeros(out)
        ideal = b.double() / lv.deq_scale.double() - lv.input_offset.double() * lv.weight.double().sum(1)
        # the stored bias is rounded to the model dtype after quant_bias was computed
        tol = 1 + (b.double().abs() / lv.deq_scale.double()) * 2.0 ** -7
        err = (lv.quant_bias.double() - ideal).abs()
        if (err > tol).any():
            bad = int((err > tol).nonzero()[0, 0])
            p.append(f"{self._where(qn)}[{bad}] = {int(lv.quant_bias[bad])} is inconsistent with bias/deq_scale − "
                     f"input_offset·ΣW_q = {ideal[bad].item():.1f}")


@register_format("msmodelslim")
class MsModelSlimFormat(OutputFormat):
    name = "msmodelslim"
    description = "msModelSlim ascendV1: quant_model_weight_w8a8.safetensors + quant_model_description.json"
    mindie = False
    view = MsModelSlimView
    #: msModelSlim's own output: every float tensor in one dtype, byte for byte its file
    exact_float_tensors = False

    @staticmethod
    def default_float_dtype(checkpoint_dtype: torch.dtype, device_kind: str) -> torch.dtype:
        """As msModelSlim on that device: its CPU run loads the model in float32 (so float tensors and
        weight scales are written float32), its NPU run in the checkpoint dtype."""
        return checkpoint_dtype if device_kind == "npu" else torch.float32

    @property
    def description_file(self) -> str:
        return description_file_name(self.mindie)

    def write(self, out_dir: Path, tensors: TensorStream, ctx: ExportContext) -> dict[str, Any]:
        qt = ctx.recipe.quant_type
        desc: dict[str, Any] = {} if self.mindie else {"version": "1.0.0"}
        desc["model_quant_type"] = qt
        if ctx.recipe.weight_only and ctx.recipe.group_size and not self.mindie:
            desc["group_size"] = ctx.recipe.group_size
        pack = qt == "W4A16" and not self.mindie  # ascendV1 packs int4 codes two to an int8
        grouped = pack and ctx.recipe.group_size > 0  # (a group as wide as the Linear: packed per channel)

        def named():
            for name, t, tag in tensors:
                desc[name] = tag
                if pack and tag == qt and name.endswith(".weight"):
                    t = pack_int4_msmodelslim(t, grouped and t.shape[1] > ctx.recipe.group_size)
                yield name, t

        specs = None
        # the stream is iter_quantized_tensors with known dtypes: lay the file out up front
        if ctx.planned_stream == "quantized" and not ctx.exact_floats:
            specs = [TensorSpec(*s) for s in quantized_tensor_specs(ctx.arch, ctx.recipe, float_dtype=ctx.float_dtype,
                                                                        scale_dtype=ctx.scale_dtype)]
            if pack:
                q = {n + ".weight" for n in ctx.arch.quantized_linears(ctx.recipe.modules, ctx.recipe.float_linears)}
                specs = [TensorSpec(s.name, s.dtype, stored_weight_shape(s.shape, 4, grouped and
                                                                         s.shape[1] > ctx.recipe.group_size))
                         if s.name in q else s for s in specs]
        weight_map = write_safetensors(out_dir, weight_prefix(qt), named(), ctx.part_file_size, specs=specs)
        write_json(out_dir / description_file_name(self.mindie, qt), desc)
        cfg = dict(ctx.arch.ckpt.config_dict)
        cfg["torch_dtype"] = str(ctx.arch.ckpt.torch_dtype).replace("torch.", "")
        if self.mindie:
            cfg["quantize"] = qt.lower()
            vc = dict(cfg.get("vision_config") or {})
            vc["quantize"] = qt.lower()
            cfg["vision_config"] = vc
            cfg["quantization_config"] = quantization_config(ctx)
        copy_model_files(ctx.model_path, out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg, indent=4, ensure_ascii=False))
        # msModelSlim writes its json files owner-only (0600) and weights read-only (0400).
        for f in out_dir.glob("*.json"):
            if f.name != RECORD:
                f.chmod(0o600)
        write_record(out_dir, ctx, self.name)
        return {"tensors": len(weight_map), "files": sorted(set(weight_map.values()))}

    def detect(self, path: Path) -> bool:
        return mindie_description(path) is not None if self.mindie else (path / self.description_file).is_file()


@register_format("mindie")
class MindIEFormat(MsModelSlimFormat):
    description = "msModelSlim safe_tensor (MindIE): quant_model_description_w8a8.json + config.json quantize keys"
    mindie = True
