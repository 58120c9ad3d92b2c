"""Scoring one patient or a table with a fitted :class:`~pipelines.survival.artifact.SurvivalModel`.

The score is the model's linear predictor: for Cox kinds ``beta . z - lp_center`` (log relative hazard
against the baseline), for logistic ``intercept + beta . z`` (log-odds of the event by the horizon), for
binary the same (log-odds of the outcome; a binary model has no horizon, so no horizon probability).
Higher is worse in both.  ``horizon_probability`` is the predicted probability of the *event* by the
horizon: ``1 - S0(h) ** exp(score)`` for Cox kinds, ``sigmoid(score)`` for logistic.

A missing or unusable input never gets silently imputed: the result is "not evaluable" with the reason,
unless the model itself says it imputes (``impute_at_prediction``, stated in its model card).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.survival.artifact import SurvivalModel
from pipelines.survival.design import Value


@dataclass(frozen=True)
class Risk:
    score: float | None
    group: str | None
    horizon_probability: float | None  # P(event by the model's horizon), None without a horizon
    evaluable: bool = True
    reason: str = ""

    @property
    def label(self) -> str:
        return self.group if self.evaluable and self.group else "not evaluable"


def linear_predictor(model: SurvivalModel, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Scores for model-column rows ``x`` (NaN rows stay NaN)."""
    lp = x @ np.asarray(model.coefficients, dtype=np.float64)
    if model.kind in ("logistic", "binary"):
        return lp + model.intercept
    return lp - model.lp_center


def horizon_probability(model: SurvivalModel, scores: npt.NDArray[np.float64],
                        horizon_days: float | None = None) -> npt.NDArray[np.float64] | None:
    """P(event by the horizon) for each score, or None when the model has none for that horizon."""
    h = model.horizon_days if horizon_days is None else horizon_days
    if h is None:
        return None
    if model.kind == "logistic":
        if h != model.horizon_days:
            return None
        return np.asarray(1.0 / (1.0 + np.exp(-scores)), dtype=np.float64)
    s0 = model.baseline_survival.get(h)
    if s0 is None:
        return None
    return np.asarray(1.0 - np.power(s0, np.exp(scores)), dtype=np.float64)


def score(model: SurvivalModel, features: Mapping[str, Value]) -> Risk:
    """One patient's risk from raw feature values keyed by the model's feature names."""
    row, reasons = model.design.encode_row(features, model.design.impute_at_prediction)
    if row is None:
        return Risk(None, None, None, evaluable=False, reason="; ".join(reasons))
    s = float(linear_predictor(model, row[None, :])[0])
    if not math.isfinite(s):
        return Risk(None, None, None, evaluable=False, reason="score is not finite")
    prob = horizon_probability(model, np.asarray([s]))
    return Risk(s, model.risk_groups.group(s), None if prob is None else float(prob[0]))


@dataclass(frozen=True)
class ScoredTable:
    scores: npt.NDArray[np.float64]  # NaN where not evaluable
    groups: list[str | None]
    probabilities: npt.NDArray[np.float64] | None
    reasons: list[list[str]]

    @property
    def evaluable(self) -> npt.NDArray[np.bool_]:
        return np.asarray(np.isfinite(self.scores), dtype=np.bool_)


def score_frame(model: SurvivalModel, frame: pd.DataFrame) -> ScoredTable:
    x, reasons = model.design.transform(frame)
    s = linear_predictor(model, x)
    groups = [model.risk_groups.group(float(v)) if math.isfinite(v) else None for v in s]
    return ScoredTable(s, groups, horizon_probability(model, s), reasons)
