"""``llavaq quantize --recipe auto``: the best W8A8 model that meets an accuracy target, in one command.

Orchestration only: calibration, export, scoring and the sensitivity ranking are the project's own
(:func:`llavaq.pipeline.calibrate`, :func:`llavaq.pipeline.export`, :func:`llavaq.verify.verify`, ``--keep_float``).

1. Evaluation data that overlaps the calibration data (an identical image file, an identical prompt or
   text) is refused with one line, before any work.
2. One calibration — the base: the first entry of :data:`CALIBRATIONS` this recipe can use (the Hadamard
   rotation with min-max ranges and input moments; without a rotation, e.g. ``--modules with_down_proj``,
   the unrotated min-max one) — serves every candidate of :data:`CANDIDATES` on it without a forward pass:
   no smoothing / SmoothQuant α / auto-α (statistic ``max|X|`` or ``max − min``), with round-to-nearest or GPTQ
   weights.
3. Each candidate is exported (requested format, into a scratch directory beside the session cache) and scored
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

Modules: :mod:`~llavaq.tuning.tables` (the tables, as data), :mod:`~llavaq.tuning.evaldata` (the evaluation
set), :mod:`~llavaq.tuning.selection` (pure: rows, the target's messages, ranking, the choice),
:mod:`~llavaq.tuning.store` (the score store), :mod:`~llavaq.tuning.tuner` (state and scoring),
:mod:`~llavaq.tuning.steps` (steps 3 to 5) and :mod:`~llavaq.tuning.run` (``tune``); the rich table is
:func:`llavaq.cli.render.tuning_table`.
"""

from llavaq.files import TUNING_FILE
from llavaq.tuning.evaldata import EvalData, check_disjoint, load_eval_data, shipped_text_prompts
from llavaq.tuning.results import CalibrationRun, TuningResult, tuning_document
from llavaq.tuning.run import tune
from llavaq.tuning.selection import RECIPE_KEYS, SCORE_KEYS, TuningRow, choose, rank, score_of, target_gaps, twin
from llavaq.tuning.store import ScoreStore
from llavaq.tuning.tables import (
    CALIBRATIONS,
    CANDIDATES,
    CHEAP_CALIBRATION,
    DEFAULT_MAX_PPL_INCREASE,
    DEFAULT_MIN_TOP1,
    FALLBACK_STEPS,
    FINALISTS,
    GPTQ_TWINS,
    MAX_FLOAT_FRACTION,
    SCORE_VERSION,
    SCREEN,
    CalibrationSpec,
    CandidateSpec,
    ScreenSpec,
    available,
    calibration_spec,
    candidate_spec,
)
from llavaq.tuning.tuner import Tuner

__all__ = [
    "CALIBRATIONS", "CANDIDATES", "CHEAP_CALIBRATION", "DEFAULT_MAX_PPL_INCREASE", "DEFAULT_MIN_TOP1",
    "FALLBACK_STEPS", "FINALISTS", "GPTQ_TWINS", "MAX_FLOAT_FRACTION", "RECIPE_KEYS", "SCORE_KEYS", "SCORE_VERSION",
    "SCREEN", "TUNING_FILE", "CalibrationRun", "CalibrationSpec", "CandidateSpec", "EvalData", "ScoreStore",
    "ScreenSpec", "TuningResult", "TuningRow", "Tuner", "available", "calibration_spec", "candidate_spec",
    "check_disjoint", "choose", "load_eval_data", "rank", "score_of", "shipped_text_prompts", "target_gaps",
    "tune", "tuning_document", "twin",
]
