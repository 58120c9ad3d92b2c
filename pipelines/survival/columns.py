"""Which columns of a cohort table become model features when ``--features`` is not given.

Every column is a candidate except the outcome columns (time and event, or the binary outcome) and
the ones named by ``--exclude``.  A candidate is dropped, with the reason, when it

- has no values, or a single value (nothing to learn from);
- is missing in more than half of the rows (imputing most of a column invents the data);
- identifies rows: text with a different value in every row (a patient code), or integers that
  number the rows (one per row, consecutive: a row number or a numeric ID);
- is text with more distinct values than ``max_levels(rows)`` = ``MAX_LEVELS`` (20), or fewer when
  there would be under ``ROWS_PER_LEVEL`` (10) rows per value on average, but never fewer than 5
  (dates, free text, treatment descriptions): one-hot encoding it would add a column per rare value,
  and a new patient with an unseen value is not evaluable; name it with ``--features`` to use it anyway.

Other text columns are one-hot encoded by :func:`pipelines.survival.design.fit_design`.  Other
outcome columns (a second event, a date of death) cannot be recognised by name: ``--exclude`` them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

MAX_LEVELS = 20
MAX_MISSING_FRACTION = 0.5
ROWS_PER_LEVEL = 10
MIN_LEVEL_LIMIT = 5


def max_levels(rows: int) -> int:
    """The most distinct values a text column may have to be one-hot encoded by default."""
    return min(MAX_LEVELS, max(MIN_LEVEL_LIMIT, rows // ROWS_PER_LEVEL))


@dataclass(frozen=True)
class FeatureSelection:
    used: tuple[str, ...]
    dropped: tuple[tuple[str, str], ...]  # (column, reason)
    reserved: tuple[str, ...]  # outcome columns
    excluded: tuple[str, ...]  # --exclude

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "default (every column but the outcome and --exclude)", "used": list(self.used),
                "dropped": [{"column": c, "reason": r} for c, r in self.dropped],
                "outcome_columns": list(self.reserved), "excluded": list(self.excluded)}


class SelectionError(ValueError):
    """No usable feature column, or an --exclude that names no column."""


def _drop_reason(col: pd.Series, numeric: bool) -> str | None:  # type: ignore[type-arg]
    values = col.dropna()
    if not numeric:
        values = values[values.astype(str).str.strip() != ""]
    n, k = len(col), len(values)
    if k == 0:
        return "no values"
    distinct = values.nunique()
    if distinct < 2:
        return f"a single value ({values.iloc[0]!r})"
    if (n - k) > MAX_MISSING_FRACTION * n:
        return f"missing in {n - k} of {n} rows (more than {MAX_MISSING_FRACTION:.0%})"
    if numeric:
        v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        if k == n and distinct == n and n >= 10 and np.all(v == np.round(v)) and v.max() - v.min() == n - 1:
            return "identifies rows (integers 1 per row, consecutive: a row number or ID)"
        return None
    if distinct == k and k >= 10:
        return "identifies rows (a different text in every row)"
    limit = max_levels(k)
    if distinct > limit:
        return (f"text with {distinct} distinct values (more than {limit} for {k} rows: dates, free text?); "
                "name it with --features to one-hot encode it anyway")
    return None


def select_features(frame: pd.DataFrame, reserved: Sequence[str], exclude: Sequence[str] = (),
                    categorical: Sequence[str] = ()) -> FeatureSelection:
    """The default feature set of ``frame``: every column but ``reserved`` and ``exclude``, usable ones."""
    unknown = [c for c in exclude if c not in frame.columns]
    if unknown:
        raise SelectionError(f"--exclude names columns not in the table: {', '.join(map(repr, unknown))}")
    used: list[str] = []
    dropped: list[tuple[str, str]] = []
    for name in frame.columns:
        if name in reserved or name in exclude:
            continue
        numeric = pd.api.types.is_numeric_dtype(frame[name]) and name not in categorical
        why = _drop_reason(frame[name], numeric)
        if why is None:
            used.append(str(name))
        else:
            dropped.append((str(name), why))
            log.info("feature column %r dropped: %s", name, why)
    if not used:
        detail = "; ".join(f"{c}: {r}" for c, r in dropped) if dropped else "the table has no other columns"
        raise SelectionError(f"no usable feature column left: {detail}")
    return FeatureSelection(tuple(used), tuple(dropped), tuple(reserved), tuple(exclude))
