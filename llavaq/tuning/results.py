"""What a ``tune`` call returns and writes: its calibrations, rows and choice (``llavaq_tuning.json``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavaq.pipeline import ExportResult
from llavaq.tuning.selection import TuningRow
from llavaq.tuning.tables import SCORE_VERSION


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
    export: ExportResult  # of the written model
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
    """The ``llavaq_tuning.json`` document."""
    return {"tool": "llavaq", "kind": "tuning", "version": SCORE_VERSION, "target": target,
            "chosen": chosen.candidate, "met": met, "missed": missed, "seconds": round(seconds, 1),
            "calibrations": [dataclasses.asdict(c) for c in calibrations], "notes": notes,
            "candidates": [r.to_dict() for r in rows]}
