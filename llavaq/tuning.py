"""``llavaq quantize --recipe auto``: the best W8A8 model that meets an accuracy target, in one command.

Orchestration only: calibration, export, scoring and the sensitivity ranking are the project's own
(:func:`llavaq.api.calibrate`, :func:`llavaq.api.export`, :func:`llavaq.verify.verify`, ``--keep_float``).

1. Evaluation data that overlaps the calibration data (an identical image file, an identical prompt or
   text) is refused with one line, before any work.
2. One calibration — the base: the first entry of :data:`CALIBRATIONS` this recipe can use (the Hadamard
   rotation with min-max ranges and input moments; without a rotation, e.g. ``--modules with_down_proj``,
   the unrotated min-max one) — serves every candidate of :data:`CANDIDATES` on it without a forward pass:
   no smoothing / SmoothQuant α / auto-α, with round-to-nearest or GPTQ weights.
3. Each candidate is exported (requested format, into a scratch directory in the session cache) and scored
   by ``verify``'s integer-exact emulation, the float model's side computed once. Round-to-nearest
   candidates are scored on a subset of the evaluation data (:class:`ScreenSpec`) first, the best
   :data:`FINALISTS` (of a later calibration: only those that beat the finalists so far) then on all of it,
   from the same export; a GPTQ candidate (its export costs several round-to-nearest ones) is scored, in
   full, only as the twin of the best :data:`GPTQ_TWINS` finalists of its calibration.
4. The other calibrations of the table, as few as it can: without a ``time_budget`` only while no candidate
   meets the target, and only those that cost at most :data:`CHEAP_CALIBRATION` min-max calibrations (the
   unrotated min-max one); with a budget, every one that fits in it (msModelSlim's m2 too; times estimated
   from the base calibration's). A calibration whose recipe fields this
   :class:`~llavaq.recipe.QuantRecipe` lacks or refuses is left out.
5. If no candidate meets the target, the most sensitive Linears (ranked on the cached activation rows, as
   ``--keep_float`` does) of the lowest-KL candidate are kept in float: first as many as the cap allows
   (:data:`MAX_FLOAT_FRACTION` of the quantized Linears); if that meets the target, the fewest that still do.
6. The choice — the lowest KL among the candidates meeting the target, fewest float Linears first; when none
   does, the lowest KL — is written in the requested format (its scored export, moved into place), with
   every candidate in ``llavaq_tuning.json`` and the choice in ``llavaq_record.json``.

Scores are kept in the session cache (``<session>/tuning/<key>.json``; the key hashes the model fingerprint,
the evaluation data (and subset), the candidate's recipe and the output format), so an interrupted run
resumes without scoring a finished candidate again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavaq.errors import CacheError, LlavaqError
from llavaq.model.checkpoint import file_sha256

DEFAULT_MAX_PPL_INCREASE = 1.0
DEFAULT_MIN_TOP1 = 0.95
#: Fallback cap: at most this fraction of the quantized Linears is kept in float.
MAX_FLOAT_FRACTION = 0.10
#: Fallback: at most this many doubling steps up to the cap (then halving back to the fewest that pass).
FALLBACK_STEPS = 4
#: Candidates scored on the whole evaluation set after screening.
FINALISTS = 2
#: A GPTQ candidate is scored only where its round-to-nearest twin is among the best this many (a GPTQ export
#: costs several round-to-nearest ones; the smoothing that is best with rtn weights is the one GPTQ refines).
GPTQ_TWINS = 1
#: Without a time budget, an extra calibration runs when it costs at most this many min-max calibrations: the
#: rotation (1.2) and min-max ones do, msModelSlim's m2 (4.5: its threshold search) needs --time_budget.
CHEAP_CALIBRATION = 2.0
TUNING_FILE = "llavaq_tuning.json"
SCORE_VERSION = 1


# ---------------------------------------------------------------------------------------------- the tables
@dataclass(frozen=True)
class CalibrationSpec:
    """A session cache the tuner may calibrate: its recipe fields and its cost relative to the base."""

    name: str
    label: str
    fields: tuple[tuple[str, Any], ...]
    #: estimated calibration time / the base calibration's (for the time budget)
    cost: float
    #: QuantRecipe fields it needs (absent in this llavaq: the calibration and its candidates are left out)
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class CandidateSpec:
    """One recipe to try: the calibration it is exported from and its export-time recipe fields."""

    name: str
    calibration: str
    fields: tuple[tuple[str, Any], ...]
    requires: tuple[str, ...] = ()


def _cal(name: str, label: str, cost: float, requires: tuple[str, ...] = (), **fields: Any) -> CalibrationSpec:
    return CalibrationSpec(name, label, tuple(fields.items()), cost, requires)


def _cand(name: str, calibration: str, requires: tuple[str, ...] = (), **fields: Any) -> CandidateSpec:
    return CandidateSpec(name, calibration, tuple(fields.items()), requires)


#: The first available entry is the base (calibrated first, its candidates always scored in full); the others
#: when cheap or within a time budget (module docstring, step 4). The rotation leads: it gave the best model on
#: every measure on the demo model, so the unrotated candidates are then screened against its finalists.
#: ``cost``: calibration time relative to the min-max one (demo model, measured). An entry whose fields this
#: QuantRecipe lacks or refuses (``--rotation`` with ``--modules with_down_proj``) is left out.
CALIBRATIONS: tuple[CalibrationSpec, ...] = (
    _cal("hadamard", "Hadamard rotation, min-max ranges, input moments", 1.2, ("rotation",),
         anti_outlier="none", act_method=1, weight_method="gptq", rotation="hadamard"),
    _cal("minmax", "min-max ranges, float statistics, input moments", 1.0,
         anti_outlier="none", act_method=1, weight_method="gptq"),
    _cal("m2", "msModelSlim's m2 (OS+) search, histogram ranges, input moments", 4.5,
         anti_outlier="m2", act_method=2, weight_method="gptq"),
)
#: In the order they are scored (the likely best first, so that a tight time budget cuts the others); a GPTQ
#: candidate after its round-to-nearest twin (step 3). Adding a recipe is one line. ``--smooth_vo`` is not in
#: the table: on the demo model it made every recipe worse (docs/BENCHMARKS.md, "Fidelity").
CANDIDATES: tuple[CandidateSpec, ...] = (
    _cand("m1 α=auto, rtn", "minmax", anti_outlier="m1", alpha="auto", weight_method="rtn"),
    _cand("m1 α=0.8, rtn", "minmax", anti_outlier="m1", alpha=0.8, weight_method="rtn"),
    _cand("m1 α=0.5, rtn", "minmax", anti_outlier="m1", alpha=0.5, weight_method="rtn"),
    _cand("none, rtn", "minmax", anti_outlier="none", weight_method="rtn"),
    _cand("m1 α=auto, gptq", "minmax", anti_outlier="m1", alpha="auto", weight_method="gptq"),
    _cand("m1 α=0.8, gptq", "minmax", anti_outlier="m1", alpha=0.8, weight_method="gptq"),
    _cand("m1 α=0.5, gptq", "minmax", anti_outlier="m1", alpha=0.5, weight_method="gptq"),
    _cand("none, gptq", "minmax", anti_outlier="none", weight_method="gptq"),
    _cand("m2, rtn (msModelSlim's recipe)", "m2", weight_method="rtn"),
    _cand("m2, gptq", "m2", weight_method="gptq"),
    _cand("hadamard, rtn", "hadamard", ("rotation",), weight_method="rtn"),
    _cand("hadamard + m1 α=0.5, rtn", "hadamard", ("rotation",), anti_outlier="m1", alpha=0.5, weight_method="rtn"),
    _cand("hadamard, gptq", "hadamard", ("rotation",), weight_method="gptq"),
    _cand("hadamard + m1 α=0.5, gptq", "hadamard", ("rotation",), anti_outlier="m1", alpha=0.5,
          weight_method="gptq"),
)


@dataclass(frozen=True)
class ScreenSpec:
    """The screening subset: a few image prompts (distinct photos first), text prompts, held-out tokens."""

    image_prompts: int = 2
    text_prompts: int = 1
    text_tokens: int = 510  # two 256-token windows: the float side is shared with the full evaluation


SCREEN = ScreenSpec()


def available(fields: tuple[tuple[str, Any], ...], requires: tuple[str, ...], base: Any) -> bool:
    """Whether this llavaq's QuantRecipe has ``requires`` and accepts ``fields`` (capability probe)."""
    from llavaq.recipe import QuantRecipe

    names = {f.name for f in dataclasses.fields(QuantRecipe)}
    if not set(requires) <= names or not {k for k, _ in fields} <= names:
        return False
    try:
        base.replace(**dict(fields))
    except (LlavaqError, TypeError, ValueError):
        return False
    return True


# ---------------------------------------------------------------------------------------------- evaluation data
@dataclass
class EvalData:
    prompts: list  # list[EvalPrompt]
    text_path: Path | None
    text: str | None
    answer_tokens: int
    digest: str = ""
    max_text_tokens: int = 4096

    @property
    def image_prompts(self) -> int:
        return sum(p.image is not None for p in self.prompts)

    def screen(self, spec: ScreenSpec) -> EvalData | None:
        """The screening subset, or None when it would be (almost) the whole set: score everything in full."""
        images, seen = [], set()
        for p in self.prompts:  # one prompt per photo first, then the others
            if p.image is not None and p.image not in seen:
                seen.add(p.image)
                images.append(p)
        images += [p for p in self.prompts if p.image is not None and p not in images]
        texts = [p for p in self.prompts if p.image is None]
        sub = images[: spec.image_prompts] + texts[: spec.text_prompts]
        tokens = min(spec.text_tokens, self.max_text_tokens)
        if len(sub) >= len(self.prompts) and (self.text is None or len(self.text.encode()) <= tokens):
            return None
        order = {id(p): i for i, p in enumerate(self.prompts)}
        return EvalData(sorted(sub, key=lambda p: order[id(p)]), self.text_path, self.text, self.answer_tokens,
                        self.digest + ":screen", tokens)


def load_eval_data(eval_prompts: str | Path | None, eval_images: str | Path | None, eval_text: str | Path | None,
                   answer_tokens: int) -> EvalData:
    """The evaluation set (defaults: the shipped held-out set) and its digest (prompts, image bytes, text)."""
    from llavaq.verify import _shipped, load_eval_prompts, load_heldout_text

    prompts = load_eval_prompts(eval_prompts, eval_images)
    text = load_heldout_text(eval_text)
    if text is None:
        raise LlavaqError("--recipe auto needs held-out text for perplexity: pass --eval_text "
                          "(the shipped held-out set is not installed)")
    text_path = Path(eval_text) if eval_text is not None else _shipped("heldout.txt")
    h = hashlib.sha256(f"v{SCORE_VERSION}:{answer_tokens}".encode())
    for p in prompts:
        h.update(json.dumps([p.question, file_sha256(p.image) if p.image is not None else None]).encode())
    h.update(text.encode())
    return EvalData(prompts, text_path, text, answer_tokens, h.hexdigest()[:16])


def _norm(text: str) -> str:
    """A prompt without its chat wrapper, whitespace and case: ``USER: <image>\\nQ ASSISTANT:`` -> ``q``."""
    s = " ".join(text.replace("<image>", " ").split()).casefold()
    if s.startswith("user:"):
        s = s[len("user:"):].strip()
    if s.endswith("assistant:"):
        s = s[: -len("assistant:")].strip()
    return s


def check_disjoint(calib_images: str | Path, text_prompts: tuple[str, ...], data: EvalData) -> None:
    """Refuse evaluation data that overlaps the calibration data: one line naming the first overlap."""
    from llavaq.calib.images import is_doc_file, list_image_files

    calib = {}
    for f in list_image_files(Path(calib_images)):
        if not is_doc_file(f):
            calib.setdefault(file_sha256(f), f)
    for p in data.prompts:
        if p.image is not None and (twin := calib.get(file_sha256(p.image))) is not None:
            raise LlavaqError(f"evaluation image {p.image} is identical to calibration image {twin}: the evaluation "
                              "data must not overlap the calibration data (pass other --eval_images/--eval_prompts "
                              "or --calib_images)")
    prompts = {_norm(t): t for t in text_prompts if _norm(t)}
    for p in data.prompts:
        if p.image is None and _norm(p.question) in prompts:
            raise LlavaqError(f"evaluation prompt {p.question!r} is also a calibration prompt: the evaluation data "
                              "must not overlap the calibration data (pass other --eval_prompts or --text_prompts)")
    text = data.text or ""
    pieces = [text, *text.split("\n\n"), *text.splitlines()]
    for piece in pieces:
        if _norm(piece) in prompts:
            raise LlavaqError(f"the held-out text {data.text_path} contains the calibration prompt "
                              f"{prompts[_norm(piece)]!r}: the evaluation data must not overlap the calibration "
                              "data (pass another --eval_text or --text_prompts)")


def shipped_text_prompts() -> tuple[str, ...]:
    """The shipped text-only calibration prompts (``llavaq/data/calib_text.json``), if installed."""
    from llavaq.calib.prompts import read_text_prompts

    try:
        from importlib.resources import files

        p = Path(str(files("llavaq").joinpath("data", "calib_text.json")))
    except (ModuleNotFoundError, TypeError):
        return ()
    return read_text_prompts(p) if p.is_file() else ()


# ---------------------------------------------------------------------------------------------- scores
@dataclass
class TuningRow:
    """One scored (or skipped) candidate: a row of the tuning table."""

    candidate: str
    calibration: str
    stage: str  # "screen" | "full" | "fallback"
    recipe: dict[str, Any]
    status: str = "scored"  # "scored" | "resumed" | "skipped: <why>"
    score: dict[str, Any] | None = None
    #: Linears kept in float beyond the module preset, most sensitive first, with their W8A8 error (None: unmeasured)
    float_errors: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0
    meets: bool | None = None
    failed: list[str] = field(default_factory=list)

    @property
    def kl(self) -> float:
        return self.score["kl"] if self.score else math.inf

    @property
    def scored(self) -> bool:
        return self.score is not None

    @property
    def float_linears(self) -> list[str]:
        return list(self.float_errors)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["float_linears"] = self.float_linears
        return d


SCORE_KEYS = ("ppl_fp", "ppl_q", "ppl_increase", "text_tokens", "text_top1", "text_kl", "image_top1", "image_kl",
              "image_positions", "text_prompt_top1", "text_prompt_kl", "text_prompt_positions", "top1", "kl")
RECIPE_KEYS = ("anti_outlier", "alpha", "act_method", "modules", "m2_search", "weight_method", "keep_float",
               "rotation", "smooth_vo")


def _score(report) -> dict[str, Any]:
    d = report.to_dict()
    d["ppl_increase"] = report.ppl_increase
    return {k: d.get(k) for k in SCORE_KEYS}


def target_gaps(score: dict[str, Any], max_ppl_increase: float, min_top1: float) -> list[str]:
    """The missed checks, each with by how much: Δppl ≤ P, held-out text top-1 ≥ T, image-answer top-1 ≥ T.

    Like ``verify --max_ppl_increase P --min_top1 T`` (:func:`llavaq.verify.check_thresholds`).
    """
    gaps = []
    inc = score.get("ppl_increase")
    if inc is None:
        gaps.append("no perplexity (held-out text needed)")
    elif inc > max_ppl_increase:
        gaps.append(f"perplexity {inc:+.2f} % > {max_ppl_increase:+g} % (by {inc - max_ppl_increase:.2f} points)")
    parts = [(what, score.get(k)) for what, k in (("held-out text", "text_top1"), ("image-prompt answers",
                                                                                  "image_top1"))
             if score.get(k) is not None]
    for what, t1 in parts or [("all scored positions", score.get("top1"))]:
        if t1 is not None and t1 < min_top1:
            gaps.append(f"top-1 on {what} {t1:.4f} < {min_top1:g} (by {min_top1 - t1:.4f})")
    return gaps


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


class ScoreStore:
    """Scores kept in a session cache directory (``<session>/tuning``), one atomic JSON file per key."""

    def __init__(self, session: Path) -> None:
        self.dir = Path(session) / "tuning"

    @staticmethod
    def key(fingerprint: dict, eval_digest: str, recipe: dict, fmt: str, part_file_size: float | None) -> str:
        """Model fingerprint + evaluation data (and subset) + candidate recipe + output format."""
        return _digest({"v": SCORE_VERSION, "fingerprint": fingerprint, "eval": eval_digest, "recipe": recipe,
                        "format": fmt, "part_file_size": part_file_size})

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            obj = json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return obj if isinstance(obj, dict) else None

    def put(self, key: str, obj: dict[str, Any]) -> None:
        from llavaq.calib.cache import atomic_write_bytes

        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / f"{key}.json", json.dumps(obj, indent=1, default=str).encode())

    @property
    def scratch(self) -> Path:
        """Candidates' exports while they may still be scored or chosen (removed when done or restarted)."""
        return self.dir / "scratch"


# ---------------------------------------------------------------------------------------------- the tuner
@dataclass
class CalibrationRun:
    name: str
    label: str
    cache: str
    seconds: float
    reused: bool


@dataclass
class TuningResult:
    save_directory: Path
    chosen: TuningRow
    met: bool
    missed: list[str]
    rows: list[TuningRow]
    calibrations: list[CalibrationRun]
    export: Any  # api.ExportResult of the written model
    seconds: float
    #: verify runs this call made (scores read back from the session cache are not counted)
    verify_calls: int
    target: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def table(self) -> dict[str, Any]:
        """What ``llavaq_tuning.json`` holds."""
        return tuning_document(self.rows, self.calibrations, self.chosen, self.met, self.missed, self.target,
                               self.seconds, self.notes)


def tuning_document(rows: list[TuningRow], calibrations: list[CalibrationRun], chosen: TuningRow, met: bool,
                    missed: list[str], target: dict[str, float], seconds: float, notes: list[str]) -> dict[str, Any]:
    return {"tool": "llavaq", "kind": "tuning", "version": SCORE_VERSION, "target": target,
            "chosen": chosen.candidate, "met": met, "missed": missed, "seconds": round(seconds, 1),
            "calibrations": [dataclasses.asdict(c) for c in calibrations], "notes": notes,
            "candidates": [r.to_dict() for r in rows]}


@dataclass
class _Export:
    path: Path
    result: Any  # api.ExportResult


class _Tuner:
    """One ``tune`` call's state; each step of the module docstring is a method."""

    def __init__(self, *, model_path: Path, calib_images: Path, base: Any, fmt: str, part_file_size: float | None,
                 device_type: str, trust_remote_code: bool, cache_dir: Path | None, progress: Any,
                 stream_memory_gb: float | None, data: EvalData, max_ppl_increase: float, min_top1: float,
                 time_budget_s: float | None, screen: ScreenSpec | None, finalists: int,
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
        self.caches: dict[str, Any] = {}
        self.cal_seconds: dict[str, float] = {}
        self.notes: list[str] = []
        self.verify_calls = 0
        self.timing: dict[str, list[float]] = {"screen": [], "full": []}
        self.recipes: dict[int, Any] = {}  # id(row) -> the QuantRecipe it was scored with
        self.row_export: dict[int, str] = {}  # id(row) -> export key
        self.exports: dict[str, _Export] = {}  # export key -> the export on disk (kept while it may be needed)
        self.pending: set[str] = set()  # export keys still to be scored in full
        self._float_model = None
        self.reference: dict = {}  # the float model's answers and logits, computed once

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
        from llavaq import api

        self.progress.log(f"calibrating: {spec.label}")
        cal = api.calibrate(self.model_path, self.calib_images, self.base.replace(**dict(spec.fields)),
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
    def float_model(self):
        if self._float_model is None:
            from llavaq.verify import load_float_model

            self._float_model = load_float_model(self.model_path)
        return self._float_model

    def export_key(self, calibration: str, recipe: Any) -> str:
        return _digest([str(self.caches[calibration].path), recipe.to_dict(), self.fmt, self.part_file_size])

    def export(self, calibration: str, recipe: Any) -> tuple[str, _Export]:
        """The candidate's output in the requested format (reused while it is kept)."""
        from llavaq import api

        key = self.export_key(calibration, recipe)
        if key not in self.exports:
            out = ScoreStore(self.caches[calibration].path).scratch / key
            res = api.export(self.model_path, self.caches[calibration], out, format=self.fmt, recipe=recipe,
                             part_file_size=self.part_file_size, overwrite=True, device_type=self.device_type,
                             trust_remote_code=self.trust)
            self.exports[key] = _Export(out, res)
        return key, self.exports[key]

    def score(self, name: str, calibration: str, recipe: Any, stage: str,
              float_errors: dict[str, float | None] | None = None) -> TuningRow:
        """Score ``recipe`` (export + verify), or read its stored score; ``stage`` screen = the screening subset."""
        from llavaq import verify as verify_mod

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
            report = verify_mod.verify(self.model_path, exp.path, prompts=data.prompts, text=data.text_path,
                                       answer_tokens=data.answer_tokens, max_text_tokens=data.max_text_tokens,
                                       float_model=self.float_model(), float_reference=self.reference,
                                       layer_errors=False)
            self.verify_calls += 1
            row.score = _score(report)
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

    def skip(self, name: str, calibration: str, recipe: Any, stage: str, why: str) -> None:
        d = recipe.to_dict()
        self.rows.append(TuningRow(name, calibration, stage, {k: d[k] for k in RECIPE_KEYS if k in d},
                                   status=f"skipped: {why}"))
        self.progress.log(f"  {name} [{stage}]: skipped ({why})")

    def _log(self, row: TuningRow) -> None:
        s = row.score or {}
        verdict = "" if row.meets is None else ("  meets the target" if row.meets else "  misses: " +
                                                "; ".join(row.failed))
        self.progress.log(f"  {row.candidate} [{row.stage}{', resumed' if row.status == 'resumed' else ''}]: "
                          f"Δppl {_fmt(s.get('ppl_increase'), '+.2f')} %, text top-1 {_fmt(s.get('text_top1'))}, "
                          f"image top-1 {_fmt(s.get('image_top1'))}, KL {_fmt(s.get('kl'), '.5f')} "
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
    def candidates_of(self, calibration: str) -> list[tuple[CandidateSpec, Any]]:
        recipe = self.base.replace(**dict(self.spec(calibration).fields))
        return [(c, recipe.replace(**dict(c.fields))) for c in self.candidate_table
                if c.calibration == calibration and available(c.fields, c.requires, recipe)]

    def run_candidates(self, calibration: str) -> None:
        """Score a calibration's round-to-nearest candidates — on the screening subset first, then the best
        :data:`FINALISTS` in full (of an extra calibration: only those that beat the finalists so far) — and
        then, in full, the GPTQ twins of the best :data:`GPTQ_TWINS` of them (GPTQ refines a smoothing that
        already won; its export costs several round-to-nearest ones)."""
        cands = self.candidates_of(calibration)
        twin = {c.name: _twin(c, [d for d, _ in cands]) for c, _ in cands}
        first = [(c, r) for c, r in cands if twin[c.name] is None]
        stage = "screen" if self.screen_data is not None else "full"
        mandatory = calibration == self.base_name
        self.progress.stage(f"tuning: {'screening' if stage == 'screen' else 'scoring'} {calibration} candidates",
                            len(first))
        rows = self._score_all(first, calibration, stage, mandatory)
        full = rows if stage == "full" else self._finalists(rows, calibration, mandatory)
        best = {r.candidate for r in sorted((r for r in full if r.scored), key=_rank)[:GPTQ_TWINS]}
        second = [(c, r) for c, r in cands if twin[c.name] is not None and twin[c.name] in best]
        for c, _ in cands:
            if twin[c.name] is not None and twin[c.name] not in best:
                self.notes.append(f"{c.name} not scored: its round-to-nearest twin ({twin[c.name]}) is not among the "
                                  f"best {GPTQ_TWINS} of this calibration scored in full")
        self._score_all(second, calibration, "full", False)

    def _finalists(self, rows: list[TuningRow], calibration: str, mandatory: bool) -> list[TuningRow]:
        """The best few screened rows — meeting the target on the subset first, then by KL — scored in full
        from the same exports; returns their full rows."""
        ranked = sorted((r for r in rows if r.scored), key=_rank)[: self.finalists]
        others = sorted(_rank(r) for r in self.rows if r.stage == "screen" and r.scored
                         and r.calibration != calibration)
        bar = others[self.finalists - 1] if len(others) >= self.finalists and not mandatory else (True, math.inf)
        picked = [r for r in ranked if _rank(r) < bar]
        self.pending = {self.row_export[id(r)] for r in picked if id(r) in self.row_export}
        self.prune()
        self.progress.stage(f"tuning: scoring the best {calibration} candidates on the whole evaluation set",
                            len(picked))
        full = []
        for i, r in enumerate(picked):
            recipe = self.recipes[id(r)]
            if (i or not mandatory) and not self.fits(self.estimate("full")):
                self.skip(r.candidate, calibration, recipe, "full", "time budget")
                continue
            full.append(self.score(r.candidate, calibration, recipe, "full"))
            self.pending.discard(self.row_export.get(id(r), ""))
            self.prune()
            self.progress.advance()
        self.pending = set()
        self.prune()
        return full

    def _score_all(self, cands: list[tuple[CandidateSpec, Any]], calibration: str, stage: str,
                   mandatory: bool) -> list[TuningRow]:
        rows = []
        for i, (c, recipe) in enumerate(cands):
            if (i or not mandatory) and not self.fits(self.estimate(stage)):
                self.skip(c.name, calibration, recipe, stage, "time budget")
                continue
            rows.append(self.score(c.name, calibration, recipe, stage))
            if stage == "screen":  # keep the exports of the best few: they are scored in full next
                ranked = sorted((r for r in self.rows if r.stage == "screen" and r.scored
                                 and r.calibration == calibration), key=_rank)[: self.finalists]
                self.prune({self.row_export[id(r)] for r in ranked if id(r) in self.row_export})
            else:
                self.prune()
            self.progress.advance()
        return rows

    def full_rows(self) -> list[TuningRow]:
        return [r for r in self.rows if r.stage in ("full", "fallback") and r.scored]

    def met(self) -> bool:
        return any(r.meets for r in self.full_rows())

    def extra_calibrations(self) -> None:
        """The other calibrations of the table: the cheap ones, the others only within a time budget."""
        for spec in self.calibration_table:
            if spec.name == self.base_name or not available(spec.fields, spec.requires, self.base):
                continue
            n = len(self.candidates_of(spec.name))
            if not n:
                continue
            per = self.estimate("screen" if self.screen_data is not None else "full")
            unit = self.cal_seconds.get(self.base_name, 0.0) / self.spec(self.base_name).cost
            est = unit * spec.cost + n * per + self.estimate("full")
            if self.budget is None and self.met():
                self.notes.append(f"{spec.name} ({spec.label}) not calibrated: the target is met; pass --time_budget "
                                  f"to try it too (about {est:.0f}s)")
                continue
            if self.budget is None and spec.cost > CHEAP_CALIBRATION:
                self.notes.append(f"{spec.name} ({spec.label}) not calibrated: about {est:.0f}s more; pass "
                                  f"--time_budget to try it")
                continue
            if not self.fits(est):
                self.notes.append(f"{spec.name} ({spec.label}) not calibrated: needs about {est:.0f}s, more than "
                                  "the time budget leaves")
                continue
            self.calibrate(spec)
            self.run_candidates(spec.name)

    def fallback(self, n_quantized: int, max_float_fraction: float) -> None:
        """Keep the most sensitive Linears of the lowest-KL candidate in float: the cap first; if that meets the
        target, the fewest that still do (bisection; every N keeps a prefix of the same sensitivity ranking)."""
        full = [r for r in self.full_rows() if r.stage == "full"]
        if not full:
            return
        best = min(full, key=lambda r: r.kl)
        recipe, calibration = self.recipes[id(best)], best.calibration
        cap = max(1, int(n_quantized * max_float_fraction))
        self.progress.stage(f"tuning: keeping the most sensitive Linears of {best.candidate} in float",
                            1 + max(0, math.ceil(math.log2(cap))))
        if not self.fits(self.estimate("fallback")):
            self.skip(f"{best.candidate}, keep_float {cap}", calibration, recipe.replace(keep_float=cap), "fallback",
                      "time budget")
            self.notes.append("no fallback: the time budget is spent")
            return
        top = self.score(f"{best.candidate}, keep_float {cap}", calibration, recipe.replace(keep_float=cap),
                         "fallback")
        self.progress.advance()
        if not top.meets:
            self.notes.append(f"keeping the {cap} most sensitive Linears ({max_float_fraction:.0%} of {n_quantized} "
                              f"quantized, the cap) in float does not meet the target either")
            return
        ranking, errors = top.float_linears, top.float_errors
        lo, hi = 0, cap
        while hi - lo > 1:
            mid = (lo + hi) // 2
            name = f"{best.candidate}, keep_float {mid}"
            step = recipe.replace(float_linears=tuple(sorted(ranking[:mid])))
            if not self.fits(self.estimate("fallback")):
                self.skip(name, calibration, step, "fallback", "time budget")
                self.notes.append(f"fallback stopped at keep_float {hi}: the time budget is spent")
                return
            row = self.score(name, calibration, step, "fallback", {n: errors.get(n) for n in ranking[:mid]})
            self.progress.advance()
            lo, hi = (lo, mid) if row.meets else (mid, hi)
            self.prune()

    def choose(self) -> tuple[TuningRow, bool]:
        """The lowest KL among the candidates meeting the target (fewest float Linears first), else the lowest KL."""
        rows = self.full_rows()
        passing = [r for r in rows if r.meets]
        if passing:
            return min(passing, key=lambda r: (len(r.float_errors), r.kl)), True
        return min(rows, key=lambda r: (r.kl, len(r.float_errors))), False

    def write(self, save_directory: Path, overwrite: bool, chosen: TuningRow, record: dict[str, Any],
              doc: dict[str, Any]) -> Any:
        """The chosen model: its scored export moved into place, or (scores read back) exported again."""
        from llavaq import api
        from llavaq.formats.base import AtomicOutputDir

        exp = self.exports.get(self.row_export.get(id(chosen), ""))
        if exp is None:
            return api.export(self.model_path, self.caches[chosen.calibration], save_directory, format=self.fmt,
                              recipe=self.recipes[id(chosen)], part_file_size=self.part_file_size,
                              overwrite=overwrite, device_type=self.device_type, trust_remote_code=self.trust,
                              extra_record=record, extra_json={TUNING_FILE: doc})
        with AtomicOutputDir(Path(save_directory), overwrite, [("model directory", self.model_path)]) as tmp:
            for f in sorted(exp.path.iterdir()):
                shutil.move(str(f), str(tmp / f.name))
            rec_file = tmp / "llavaq_record.json"
            rec_file.write_text(json.dumps({**json.loads(rec_file.read_text()), **record}, indent=2,
                                           ensure_ascii=False))
            (tmp / TUNING_FILE).write_text(json.dumps(doc, indent=1, ensure_ascii=False))
        shutil.rmtree(exp.path, ignore_errors=True)
        out = Path(save_directory)
        files = sorted(p.name for p in out.iterdir())
        return dataclasses.replace(exp.result, save_directory=out, files=files,
                                   bytes_written=sum((out / f).stat().st_size for f in files))


def _rank(row: TuningRow) -> tuple[bool, float]:
    """Screening order: meeting the target (on the subset) first, then the lowest KL."""
    return bool(row.failed), row.kl


def _twin(c: CandidateSpec, table: list[CandidateSpec]) -> str | None:
    """The round-to-nearest candidate a GPTQ candidate differs from only by its weights, if the table has it."""
    fields = dict(c.fields)
    if fields.get("weight_method") != "gptq":
        return None
    want = {**fields, "weight_method": "rtn"}
    return next((d.name for d in table if d.calibration == c.calibration and dict(d.fields) == want), None)


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def tune(
    model_path: str | Path,
    calib_images: str | Path,
    save_directory: str | Path,
    *,
    format: str = "msmodelslim",
    max_ppl_increase: float | None = None,
    min_top1: float | None = None,
    eval_prompts: str | Path | None = None,
    eval_images: str | Path | None = None,
    eval_text: str | Path | None = None,
    time_budget: float | None = None,
    text_prompts: tuple[str, ...] | None = None,
    modules: str = "msmodelslim",
    float_dtype: str = "auto",
    part_file_size: float | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    device_type: str = "cpu",
    trust_remote_code: bool = False,
    progress: Any = None,
    stream_memory_gb: float | None = None,
    answer_tokens: int = 16,
    screen: ScreenSpec | None = SCREEN,
    finalists: int = FINALISTS,
    max_float_fraction: float = MAX_FLOAT_FRACTION,
    candidates: tuple[CandidateSpec, ...] | None = None,
    calibrations: tuple[CalibrationSpec, ...] | None = None,
) -> TuningResult:
    """The best W8A8 model that meets ``Δppl ≤ max_ppl_increase`` % and top-1 ≥ ``min_top1`` (module docstring).

    ``time_budget``: minutes for the whole run (None: no limit; of the extra calibrations only the cheap ones).
    ``text_prompts``: text-only calibration prompts (default: the shipped ones). ``screen=None`` scores every
    candidate on the whole evaluation set; ``candidates`` / ``calibrations`` replace the tables
    :data:`CANDIDATES` / :data:`CALIBRATIONS` (the base calibration must be among them). The result says whether
    the target was met (``met``) and, if not, by how much it was missed (``missed``); the best model is written
    either way.
    """
    from llavaq import api
    from llavaq.calib.cache import default_cache_dir
    from llavaq.formats import get_format
    from llavaq.formats.base import AtomicOutputDir
    from llavaq.progress import NullProgress
    from llavaq.recipe import QuantRecipe, check_part_file_size

    P = DEFAULT_MAX_PPL_INCREASE if max_ppl_increase is None else float(max_ppl_increase)
    T = DEFAULT_MIN_TOP1 if min_top1 is None else float(min_top1)
    if not math.isfinite(P):
        raise LlavaqError(f"--max_ppl_increase must be a number of percent, not {max_ppl_increase}")
    if not 0.0 <= T <= 1.0:
        raise LlavaqError(f"--min_top1 must be in [0, 1], not {min_top1}")
    if time_budget is not None and not time_budget > 0:
        raise LlavaqError(f"--time_budget must be a positive number of minutes, not {time_budget}")
    check_part_file_size(part_file_size)  # (hostile: finite, in range)
    if not 0.0 < max_float_fraction <= 1.0:
        raise LlavaqError(f"max_float_fraction must be in (0, 1], not {max_float_fraction}")
    candidates = CANDIDATES if candidates is None else tuple(candidates)
    calibrations = CALIBRATIONS if calibrations is None else tuple(calibrations)
    get_format(format)
    AtomicOutputDir.check(Path(save_directory), overwrite, [  # (hostile: inputs are sacred)
        ("model directory", model_path), ("calibration photo directory", calib_images),
        ("evaluation prompts", eval_prompts), ("evaluation photos", eval_images), ("evaluation text", eval_text),
        ("session cache directory", cache_dir if cache_dir is not None else default_cache_dir())])
    arch = api.open_model(model_path, trust_remote_code=trust_remote_code)
    tp = tuple(text_prompts) if text_prompts is not None else shipped_text_prompts()
    base = QuantRecipe(modules=modules, float_dtype=float_dtype, text_prompts=tp)
    data = load_eval_data(eval_prompts, eval_images, eval_text, answer_tokens)
    check_disjoint(calib_images, tp, data)
    usable = [c for c in calibrations if available(c.fields, c.requires, base)
              and any(d.calibration == c.name for d in candidates)]
    if not usable:
        raise LlavaqError("no calibration of the table has candidates usable with this recipe (--modules)")
    tuner = _Tuner(model_path=Path(model_path), calib_images=Path(calib_images), base=base, fmt=format,
                   part_file_size=part_file_size, device_type=device_type, trust_remote_code=trust_remote_code,
                   cache_dir=Path(cache_dir) if cache_dir is not None else None, progress=progress or NullProgress(),
                   stream_memory_gb=stream_memory_gb, data=data, max_ppl_increase=P, min_top1=T,
                   time_budget_s=None if time_budget is None else time_budget * 60, screen=screen,
                   finalists=finalists, candidates=candidates, calibrations=calibrations)
    try:
        tuner.base_name = usable[0].name
        tuner.calibrate(usable[0])
        tuner.run_candidates(usable[0].name)
        tuner.extra_calibrations()
        if not tuner.met():
            tuner.fallback(len(arch.quantized_linears(modules)), max_float_fraction)
        chosen, met = tuner.choose()
        missed = [] if met else chosen.failed
        if not met and tuner.budget is None and any("--time_budget" in n for n in tuner.notes):
            tuner.notes.append("the target was missed: --time_budget lets the tuner try the calibrations above too")
        target = {"max_ppl_increase": P, "min_top1": T}
        doc = tuning_document(tuner.rows, tuner.calibrations, chosen, met, missed, target, tuner.elapsed(),
                              tuner.notes)
        record = {"tuning": {"chosen": chosen.candidate, "met": met, "missed": missed, "target": target,
                             "score": chosen.score, "float_linears": chosen.float_errors, "table": TUNING_FILE}}
        res = tuner.write(Path(save_directory), overwrite, chosen, record, doc)
    finally:
        tuner.cleanup()
    return TuningResult(Path(save_directory), chosen, met, missed, tuner.rows, tuner.calibrations, res,
                        tuner.elapsed(), tuner.verify_calls, target, tuner.notes)
