"""What a report page reads from an output directory, and writing the page (temp name + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from llavaq.errors import LlavaqError, OutputError
from llavaq.formats.reader import read_quantized
from llavaq.inspect import cache_statistics
from llavaq.report.charts import require_matplotlib
from llavaq.report.page import build_page
from llavaq.verify import verify

RECORD = "llavaq_record.json"
TUNING = "llavaq_tuning.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when absent; a damaged one is a one-line error."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputError(f"{path}: invalid JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise OutputError(f"{path}: expected a JSON object")
    return doc


def static_range(scale: float, offset: float) -> tuple[float, float]:
    """The float interval a static asymmetric int8 quantizer represents: ``(q − offset)·scale``, q in −128…127."""
    return (-128.0 - offset) * scale, (127.0 - offset) * scale


def activation_ranges(output_dir: str | Path, record: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per quantized Linear (model order): its static int8 input range from the output's tensors and, when the
    record names a session cache still on disk (and the ranges were not derived), the float range calibration saw.
    """

    record = record or {}
    view = read_quantized(Path(output_dir))
    floats = _cache_float_ranges(record)
    order = [n for n in record.get("quantized_modules") or [] if n in set(view.quantized)] or list(view.quantized)
    out = []
    for name in order:
        lv = view.linear(name)
        if lv.activation != "static":
            continue
        scale, offset = lv.input_scale.float().reshape(-1)[0], lv.input_offset.float().reshape(-1)[0]
        lo, hi = static_range(float(scale), float(offset))
        row: dict[str, Any] = {"name": name, "lo": lo, "hi": hi}
        if name in floats:
            row["float_lo"], row["float_hi"] = floats[name]
        out.append(row)
    return out


def _cache_float_ranges(record: dict[str, Any]) -> dict[str, tuple[float, float]]:
    cache = record.get("cache")
    if not cache or record.get("derived_from_cache") or not (Path(cache) / "manifest.json").is_file():
        return {}

    try:
        stats = cache_statistics(Path(cache))
    except LlavaqError:
        return {}
    return {n: tuple(d["float_range"]) for n, d in stats.get("linears", {}).items() if d.get("float_range")}


def output_documents(output_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """(record, tuning document or None, activation ranges) of an output directory."""
    out = Path(output_dir)
    record = read_json(out / RECORD) or {}
    return record, read_json(out / TUNING), activation_ranges(out, record)


def check_report_target(path: str | Path) -> Path:
    """One-line errors, before any long work, for a page that could not be written (and no matplotlib)."""

    require_matplotlib()
    path = Path(path)
    if path.is_dir():
        raise LlavaqError(f"--report {path} is a directory; give a file name such as report.html")
    if not path.parent.is_dir():
        raise LlavaqError(f"--report {path}: folder {path.parent} does not exist")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: never half-written."""
    path = check_report_target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(path: str | Path, verify: dict[str, Any] | None = None, output_dir: str | Path | None = None,
                 title: str | None = None) -> Path:
    """The page for ``verify``'s report (``FidelityReport.to_dict()``) and/or an output directory (its record,
    tuning table and activation ranges), written atomically. Returns the path."""

    check_report_target(path)
    out = output_dir if output_dir is not None else (verify or {}).get("quantized")
    if out is None:
        raise LlavaqError("a report needs a verify result or an output directory")
    record, tuning, ranges = output_documents(out)
    return write_text_atomic(path, build_page(verify, record=record, ranges=ranges, tuning=tuning, title=title))


def write_auto_report(path: str | Path, model_path: str | Path, output_dir: str | Path,
                      auto: dict[str, Any]) -> Path:
    """``quantize --recipe auto --report``: verify the chosen model on the tuner's evaluation data (every
    Linear's error measured) and write its page, the candidates' scatter included."""

    rep = verify(model_path, output_dir, prompts=auto.get("eval_prompts"), images=auto.get("eval_images"),
                 text=auto.get("eval_text"), worst=1 << 30)
    return write_report(path, rep.to_dict(), output_dir)
