"""Tensor-by-tensor comparison of two msModelSlim-format output directories (ours vs reference).

Works for ``ascendV1`` (``quant_model_description.json``) and ``safe_tensor``/mindie
(``quant_model_description_w8a8.json``) outputs, single-file or sharded (index json). Needs only
torch + safetensors, so both llavaq's environment and the msModelSlim venv can run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

DESCRIPTION_NAMES = ("quant_model_description.json", "quant_model_description_w8a8.json",
                     "quant_model_description_w8a16.json", "quant_model_description_w4a16.json")
QUANT_SUFFIXES = ("weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")


def find_description(out: Path) -> Path:
    for name in DESCRIPTION_NAMES:
        if (out / name).is_file():
            return out / name
    raise FileNotFoundError(f"no quant_model_description*.json in {out}")


def weight_files(out: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file holding it (single file or via the index json)."""
    indexes = sorted(out.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return {k: out / v for k, v in weight_map.items()}
    files = sorted(out.glob("*.safetensors"))
    result: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                result[k] = f
    return result


def load_tensors(out: Path) -> dict[str, torch.Tensor]:
    files = weight_files(Path(out))
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    tensors = {}
    for f, keys in by_file.items():
        with safe_open(f, framework="pt") as sf:
            for k in keys:
                tensors[k] = sf.get_tensor(k)
    return tensors


def tensor_kind(name: str, t: torch.Tensor) -> str:
    last = name.rsplit(".", 1)[-1]
    if last in QUANT_SUFFIXES:
        return last
    if last == "weight" and t.dtype == torch.int8:
        return "weight_int8"
    if last == "bias":
        return "bias"
    return "float"


def decode_deq_scale(t: torch.Tensor) -> torch.Tensor:
    """deq_scale is int64 holding the fp32 bit pattern (fp16 models) or plain fp32 (bf16 models)."""
    if t.dtype == torch.int64:
        return t.to(torch.int32).view(torch.float32)
    return t.float()


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a64, b64 = a.double(), b.double()
    d = (a64 - b64).abs()
    max_abs = float(d.max()) if d.numel() else 0.0
    ref_absmax = float(b64.abs().max()) if b64.numel() else 0.0
    elem_rel = d / b64.abs().clamp_min(1e-30)
    return {
        "max_abs": max_abs,
        "max_rel": float(elem_rel.max()) if d.numel() else 0.0,  # element-wise |a-b|/|b|
        "max_rel_absmax": max_abs / ref_absmax if ref_absmax > 0 else (0.0 if max_abs == 0 else float("inf")),
        "equal_frac": float((a64 == b64).double().mean()) if d.numel() else 1.0,
    }


def _files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in sorted(out.iterdir()) if p.is_file()}


def compare_outputs(ours: Path, ref: Path) -> dict:
    """Compare two output dirs; returns a JSON-serialisable report.

    ``report["identical"]`` is True when names, order, dtypes, shapes and all values match bit for
    bit and the description json is equal. ``report["kinds"][kind]`` holds the worst difference
    per tensor kind (weight_int8, weight_scale, ..., deq_scale decoded to fp32, bias, float).
    """
    ours, ref = Path(ours), Path(ref)
    desc_o = json.loads(find_description(ours).read_text())
    desc_r = json.loads(find_description(ref).read_text())
    files_o, files_r = _files(ours), _files(ref)
    rep: dict = {
        "ours": str(ours),
        "ref": str(ref),
        "description_name_equal": find_description(ours).name == find_description(ref).name,
        "description_equal": desc_o == desc_r,
        "description_order_equal": list(desc_o) == list(desc_r),
        "description_diff": sorted(set(desc_o.items()) ^ set(desc_r.items()))[:20],
        "files_only_ours": sorted(set(files_o) - set(files_r)),
        "files_only_ref": sorted(set(files_r) - set(files_o)),
        "file_mode_diff": {k: [oct(files_o[k]), oct(files_r[k])] for k in sorted(set(files_o) & set(files_r))
                           if files_o[k] != files_r[k]},
    }
    for name in ("config.json",):
        if (ours / name).is_file() and (ref / name).is_file():
            cfg_o, cfg_r = (json.loads((d / name).read_text()) for d in (ours, ref))
            rep["config_equal"] = cfg_o == cfg_r
    to, tr = load_tensors(ours), load_tensors(ref)
    order_o = [k for k in desc_o if k in to]
    order_r = [k for k in desc_r if k in tr]
    rep["n_tensors"] = [len(to), len(tr)]
    rep["missing_in_ours"] = sorted(set(tr) - set(to))
    rep["extra_in_ours"] = sorted(set(to) - set(tr))
    rep["order_equal"] = [k for k in order_o if k in tr] == [k for k in order_r if k in to]
    rep["dtype_mismatch"] = {k: [str(to[k].dtype), str(tr[k].dtype)] for k in order_r
                             if k in to and to[k].dtype != tr[k].dtype}
    rep["shape_mismatch"] = {k: [list(to[k].shape), list(tr[k].shape)] for k in order_r
                             if k in to and to[k].shape != tr[k].shape}
    kinds: dict[str, dict] = {}
    bit_equal = True
    for k in order_r:
        if k not in to or k in rep["shape_mismatch"]:
            continue
        a, b = to[k], tr[k]
        kind = tensor_kind(k, b)
        if a.dtype != b.dtype or not torch.equal(a, b):
            bit_equal = False
        if kind == "deq_scale":
            a, b = decode_deq_scale(a), decode_deq_scale(b)
        d = _diff(a, b)
        w = kinds.setdefault(kind, {"count": 0, "max_abs": 0.0, "max_rel": 0.0, "max_rel_absmax": 0.0,
                                    "min_equal_frac": 1.0, "worst": None, "n_not_equal": 0})
        w["count"] += 1
        if d["equal_frac"] < 1.0:
            w["n_not_equal"] += 1
        if d["max_rel_absmax"] > w["max_rel_absmax"] or (w["worst"] is None and d["max_abs"] > 0):
            w["worst"] = k
        for key in ("max_abs", "max_rel", "max_rel_absmax"):
            w[key] = max(w[key], d[key])
        w["min_equal_frac"] = min(w["min_equal_frac"], d["equal_frac"])
    rep["kinds"] = kinds
    rep["identical"] = bool(
        bit_equal and rep["description_equal"] and rep["description_order_equal"] and rep["order_equal"]
        and not rep["missing_in_ours"] and not rep["extra_in_ours"] and not rep["dtype_mismatch"]
        and not rep["shape_mismatch"]
    )
    return rep


def markdown_table(rep: dict) -> str:
    lines = ["| kind | count | not equal | min equal frac | max abs | max rel | max rel (absmax) | worst |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, w in sorted(rep["kinds"].items()):
        lines.append(f"| {kind} | {w['count']} | {w['n_not_equal']} | {w['min_equal_frac']:.6f} | "
                     f"{w['max_abs']:.3e} | {w['max_rel']:.3e} | {w['max_rel_absmax']:.3e} | "
                     f"{w['worst'] or ''} |")
    summary = (f"identical: **{rep['identical']}**; tensors ours/ref {rep['n_tensors']}; order equal "
               f"{rep['order_equal']}; description equal {rep['description_equal']}; dtype mismatches "
               f"{len(rep['dtype_mismatch'])}; shape mismatches {len(rep['shape_mismatch'])}; missing "
               f"{len(rep['missing_in_ours'])}; extra {len(rep['extra_in_ours'])}")
    return summary + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="compare two msModelSlim-format output dirs")
    p.add_argument("ours")
    p.add_argument("ref")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    r = compare_outputs(Path(a.ours), Path(a.ref))
    print(markdown_table(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
