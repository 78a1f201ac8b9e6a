"""The types every study's `engramlab tour` step shares: what a step is given and what it returns. They live here,
below the studies, so that the tour imports the steps and no step imports the tour."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engramlab.report.html import Section


@dataclass
class TourContext:
    model: str
    out: Path
    device: str
    dtype: str
    seed: int
    overwrite: bool = False  # the tour's --overwrite, passed on to every step's own --out


@dataclass
class TourSection:
    name: str  # key in summary.json
    section: Section
    summary: dict[str, Any] = field(default_factory=dict)
