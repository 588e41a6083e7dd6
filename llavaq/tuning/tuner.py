"""The tuner: one ``tune`` call's state, and scoring a candidate (export + verify, or its stored score)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavaq import pipeline, verify
from llavaq.calib.cache import SessionCache, default_cache_dir
from llavaq.errors import CacheError
from llavaq.files import RECORD_FILE, TUNING_FILE
from llavaq.formats.base import AtomicOutputDir
from llavaq.model.loading import open_model
from llavaq.pipeline import ExportResult
from llavaq.progress import Progress
from llavaq.recipe import QuantRecipe
from llavaq.tuning.evaldata import EvalData
from llavaq.tuning.results import CalibrationRun
from llavaq.tuning.selection import RECIPE_KEYS, TuningRow, choose, fmt_value, score_of, target_gaps
from llavaq.tuning.store import ScoreStore, digest
from llavaq.tuning.tables import CalibrationSpec, CandidateSpec, ScreenSpec, available


@dataclass
class ScratchExport:
    path: Path
    result: ExportResult


class Tuner:
    """One ``tune`` call's state, its time budget, and scoring; the steps are :mod:`llavaq.tuning.steps`."""

    def __init__(self, *, model_path: Path, calib_images: Path, base: QuantRecipe, fmt: str,
                 part_file_size: float | None, device_type: str, trust_remote_code: bool, cache_dir: Path | None,
                 progress: Progress, stream_memory_gb: float | None, data: EvalData, max_ppl_increase: float,
                 min_top1: float, time_budget_s: float | None, screen: ScreenSpec | None, finalists: int,
                 candidates: tuple[CandidateSpec, ...], calibrations: tuple[CalibrationSpec, ...]) -> None:
        self.model_path, self.calib_images, self.base, self.fmt = Path(model_path), calib_images, base, fmt
        self.part_file_size, self.device_type, self.trust = part_file_size, device_type, trust_remote_code
        self.cache_dir, self.progress, self.stream_memory_gb = cache_dir, progress, stream_memory_gb
        self.data = data
        self.screen_data = data.screen(screen) if screen is not None else None
        self.P, self.T = max_ppl_increase, min_top1
        self.budget = time_budget_s
        self.base_name = ""  # the first usable calibration of the table (set by tune)
        self.finalists = finalists
        self.candidate_table, self.calibration_table = candidates, calibrations
        self.t0 = time.perf_counter()
        self.rows: list[TuningRow] = []
        self.calibrations: list[CalibrationRun] = []
        self.caches: dict[str, SessionCache] = {}
        self.cal_seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self.verify_calls = 0
        self.timing: dict[str, list[float]] = {"screen": [], "full": []}
        self.recipes: dict[int, QuantRecipe] = {}  # id(row) -> the recipe it was scored with
        self.row_export: dict[int, str] = {}  # id(row) -> export key
        self.exports: dict[str, ScratchExport] = {}  # export key -> the export on disk (kept while it may be needed)
        self.pending: set[str] = set()  # export keys still to be scored in full
        #: the float model's answers and logits, computed once per model and kept in the session cache
        self.reference = verify.FloatReference(verify.float_side_dir(
            cache_dir if cache_dir is not None else default_cache_dir(), open_model(model_path).ckpt.fingerprint()))

    # -------------------------------------------------------------------------------- time budget
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, seconds: float) -> bool:
        return self.budget is None or self.elapsed() + seconds <= self.budget

    def estimate(self, stage: str) -> float:
        seen = self.timing["screen" if stage == "screen" else "full"]
        return sum(seen) / len(seen) if seen else 0.0

    # -------------------------------------------------------------------------------- calibrations
    def spec(self, calibration: str) -> CalibrationSpec:
        return next(s for s in self.calibration_table if s.name == calibration)

    def calibrate(self, spec: CalibrationSpec) -> None:
        self.progress.log(f"calibrating: {spec.label}")
        cal = pipeline.calibrate(self.model_path, self.calib_images, self.base.replace(**dict(spec.fields)),
                                 cache_dir=self.cache_dir, device_type=self.device_type, trust_remote_code=self.trust,
                                 progress=self.progress, stream_memory_gb=self.stream_memory_gb)
        store = ScoreStore(cal.cache.path)
        shutil.rmtree(store.scratch, ignore_errors=True)  # exports left by an interrupted run
        timing = store.get("calibration") or {}
        if not cal.reused or "seconds" not in timing:
            timing = {"seconds": cal.seconds}
            store.put("calibration", timing)
        self.cal_seconds[spec.name] = float(timing["seconds"])
        self.caches[spec.name] = cal.cache
        self.calibrations.append(CalibrationRun(spec.name, spec.label, str(cal.cache.path), round(cal.seconds, 1),
                                                cal.reused))

    # -------------------------------------------------------------------------------- export + verify
    def export_key(self, calibration: str, recipe: QuantRecipe) -> str:
        return digest([str(self.caches[calibration].path), recipe.to_dict(), self.fmt, self.part_file_size])

    def export(self, calibration: str, recipe: QuantRecipe) -> tuple[str, ScratchExport]:
        """The candidate's output in the requested format (reused while it is kept)."""
        key = self.export_key(calibration, recipe)
        if key not in self.exports:
            out = ScoreStore(self.caches[calibration].path).scratch / key
            res = pipeline.export(self.model_path, self.caches[calibration], out, format=self.fmt, recipe=recipe,
                                  part_file_size=self.part_file_size, overwrite=True, device_type=self.device_type,
                                  trust_remote_code=self.trust)
            self.exports[key] = ScratchExport(out, res)
        return key, self.exports[key]

    def score(self, name: str, calibration: str, recipe: QuantRecipe, stage: str,
              float_errors: dict[str, float | None] | None = None) -> TuningRow:
        """Score ``recipe`` (export + verify), or read its stored score; ``stage`` screen = the screening subset."""
        cache = self.caches[calibration]
        data = self.screen_data if stage == "screen" else self.data
        store = ScoreStore(cache.path)
        recipe_d = recipe.to_dict()
        key = store.key(cache.manifest.get("fingerprint", {}), data.digest, recipe_d, self.fmt, self.part_file_size)
        row = TuningRow(name, calibration, stage, {k: recipe_d[k] for k in RECIPE_KEYS if k in recipe_d})
        self.recipes[id(row)] = recipe
        stored = store.get(key)
        if stored is not None and isinstance(stored.get("score"), dict):
            row.status, row.score = "resumed", stored["score"]
            row.float_errors, row.seconds = dict(stored.get("float_errors") or {}), float(stored.get("seconds", 0))
        else:
            t = time.perf_counter()
            try:
                ekey, exp = self.export(calibration, recipe)
            except CacheError as e:  # a table entry this cache cannot serve: left out, with the reason
                row.status = f"skipped: {e.message}"
                self.rows.append(row)
                self.progress.log(f"  {name} [{stage}]: skipped ({e.message})")
                return row
            self.row_export[id(row)] = ekey
            report = verify.verify(self.model_path, exp.path, prompts=data.prompts, text=data.text_path,
                                   answer_tokens=data.answer_tokens, max_text_tokens=data.max_text_tokens,
                                   float_reference=self.reference,
                                   layer_errors=False)
            self.verify_calls += 1
            row.score = score_of(report)
            kept = exp.result.kept_float
            errors = {n: (float_errors or {}).get(n, kept.get(n)) for n in kept}
            row.float_errors = {n: errors[n] for n in sorted(errors, key=lambda n: (-(errors[n] or 0.0), n))}
            row.seconds = time.perf_counter() - t
            self.timing["screen" if stage == "screen" else "full"].append(row.seconds)
            store.put(key, {"candidate": name, "stage": stage, "recipe": recipe_d, "score": row.score,
                            "float_errors": row.float_errors, "seconds": row.seconds})
        row.failed = target_gaps(row.score, self.P, self.T)  # on the subset: only indicative (meets stays None)
        if stage != "screen":
            row.meets = not row.failed
        self.rows.append(row)
        self._log(row)
        return row

    def skip(self, name: str, calibration: str, recipe: QuantRecipe, stage: str, why: str) -> None:
        d = recipe.to_dict()
        self.rows.append(TuningRow(name, calibration, stage, {k: d[k] for k in RECIPE_KEYS if k in d},
                                   status=f"skipped: {why}"))
        self.progress.log(f"  {name} [{stage}]: skipped ({why})")

    def _log(self, row: TuningRow) -> None:
        s = row.score or {}
        verdict = "" if row.meets is None else ("  meets the target" if row.meets else "  misses: " +
                                                "; ".join(row.failed))
        self.progress.log(f"  {row.candidate} [{row.stage}{', resumed' if row.status == 'resumed' else ''}]: "
                          f"Δppl {fmt_value(s.get('ppl_increase'), '+.2f')} %, "
                          f"text top-1 {fmt_value(s.get('text_top1'))}, "
                          f"image top-1 {fmt_value(s.get('image_top1'))}, KL {fmt_value(s.get('kl'), '.5f')} "
                          f"({row.seconds:.0f}s){verdict}")

    def prune(self, keep: set[str] = frozenset()) -> None:
        """Delete the exports no longer needed: keep ``keep``, those still to be scored and the current choice."""
        keep = set(keep) | self.pending
        if self.full_rows():
            chosen, _ = self.choose()
            if id(chosen) in self.row_export:
                keep.add(self.row_export[id(chosen)])
        for key in [k for k in self.exports if k not in keep]:
            shutil.rmtree(self.exports.pop(key).path, ignore_errors=True)

    def cleanup(self) -> None:
        for exp in self.exports.values():
            shutil.rmtree(exp.path, ignore_errors=True)
        self.exports.clear()

    # -------------------------------------------------------------------------------- steps

    def candidates_of(self, calibration: str) -> list[tuple[CandidateSpec, QuantRecipe]]:
        recipe = self.base.replace(**dict(self.spec(calibration).fields))
        return [(c, recipe.replace(**dict(c.fields))) for c in self.candidate_table
                if c.calibration == calibration and available(c.fields, c.requires, recipe)]

    def full_rows(self) -> list[TuningRow]:
        return [r for r in self.rows if r.stage in ("full", "fallback") and r.scored]

    def met(self) -> bool:
        return any(r.meets for r in self.full_rows())

    def choose(self) -> tuple[TuningRow, bool]:
        """:func:`~llavaq.tuning.selection.choose` among the rows so far."""
        return choose(self.rows)

    def write(self, save_directory: Path, overwrite: bool, chosen: TuningRow, record: dict[str, Any],
              doc: dict[str, Any]) -> ExportResult:
        """The chosen model: its scored export moved into place, or (scores read back) exported again."""
        exp = self.exports.get(self.row_export.get(id(chosen), ""))
        if exp is None:
            return pipeline.export(self.model_path, self.caches[chosen.calibration], save_directory, format=self.fmt,
                                   recipe=self.recipes[id(chosen)], part_file_size=self.part_file_size,
                                   overwrite=overwrite, device_type=self.device_type, trust_remote_code=self.trust,
                                   extra_record=record, extra_json={TUNING_FILE: doc})
        with AtomicOutputDir(Path(save_directory), overwrite, [("model directory", self.model_path)]) as tmp:
            for f in sorted(exp.path.iterdir()):
                shutil.move(str(f), str(tmp / f.name))
            rec_file = tmp / RECORD_FILE
            rec_file.write_text(json.dumps({**json.loads(rec_file.read_text()), **record}, indent=2,
                                           ensure_ascii=False))
            (tmp / TUNING_FILE).write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        shutil.rmtree(exp.path, ignore_errors=True)
        out = Path(save_directory)
        files = sorted(p.name for p in out.iterdir())
        return dataclasses.replace(exp.result, save_directory=out, files=files,
                                   bytes_written=sum((out / f).stat().st_size for f in files))
