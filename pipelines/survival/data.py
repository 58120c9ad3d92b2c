"""Cohort tables: a CSV with one row per patient, a time column, an event column and features.

Times are converted to days on load (``--time-unit``); every horizon in prognode is in days.
A month is 30.4375 days and a year 365.25 days (the Julian year, as most survival software uses).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

TimeUnit = Literal["days", "months", "years"]
DAYS_PER: dict[str, float] = {"days": 1.0, "months": 30.4375, "years": 365.25}


class CohortError(ValueError):
    """A cohort table cannot be used; the message names the column and the problem."""


@dataclass(frozen=True)
class Cohort:
    """Survival data of a cohort: ``time_days[i]``, ``event[i]`` and feature row ``frame.iloc[i]``."""

    time_days: npt.NDArray[np.float64]
    event: npt.NDArray[np.bool_]
    frame: pd.DataFrame  # feature columns (and any others), same row order
    source: str = ""
    sha256: str = ""

    @property
    def n(self) -> int:
        return int(self.time_days.shape[0])

    @property
    def events(self) -> int:
        return int(self.event.sum())

    def subset(self, mask: npt.NDArray[np.bool_]) -> Cohort:
        return Cohort(self.time_days[mask], self.event[mask], self.frame.loc[mask].reset_index(drop=True),
                      self.source, self.sha256)


def to_days(values: npt.ArrayLike, unit: str) -> npt.NDArray[np.float64]:
    if unit not in DAYS_PER:
        raise CohortError(f"time unit {unit!r}: expected one of {', '.join(DAYS_PER)}")
    return np.asarray(values, dtype=np.float64) * DAYS_PER[unit]


def read_table(path: Path) -> tuple[pd.DataFrame, str]:
    """The CSV as strings-or-numbers (pandas inference) and the SHA-256 of its bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CohortError(f"cohort file not found: {path}") from None
    frame = pd.read_csv(path)
    return frame, hashlib.sha256(raw).hexdigest()


def load_cohort(path: Path, time_col: str, event_col: str, time_unit: str = "days") -> Cohort:
    """Read ``path``; rows with a missing or negative time or a missing event are refused, not dropped."""
    frame, digest = read_table(path)
    return cohort_from_frame(frame, time_col, event_col, time_unit, source=str(path), sha256=digest)


def cohort_from_frame(frame: pd.DataFrame, time_col: str, event_col: str, time_unit: str = "days",
                      source: str = "", sha256: str = "") -> Cohort:
    for col in (time_col, event_col):
        if col not in frame.columns:
            close = [c for c in frame.columns if c.replace(" ", "").lower() == col.replace(" ", "").lower()]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CohortError(f"column {col!r} not in {source or 'the table'}{hint}")
    time = pd.to_numeric(frame[time_col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(time) | (time < 0)
    if bad.any():
        raise CohortError(f"column {time_col!r}: {int(bad.sum())} rows without a valid non-negative time")
    event_raw = pd.to_numeric(frame[event_col], errors="coerce").to_numpy(dtype=np.float64)
    if (~np.isin(event_raw, (0.0, 1.0))).any():
        raise CohortError(f"column {event_col!r}: events must be 0 (censored) or 1 (event)")
    return Cohort(to_days(time, time_unit), event_raw.astype(bool), frame.reset_index(drop=True), source, sha256)


def median_follow_up_days(cohort: Cohort) -> float:
    """Median follow-up by the reverse Kaplan-Meier method (censoring as the event)."""
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(cohort.time_days, ~cohort.event)
    value = float(km.median_survival_time_)
    return value if np.isfinite(value) else float(np.max(cohort.time_days))
