"""Nomograms for Cox and logistic models: points per variable, total points, predicted risk.

A fitted model's score is affine in the raw inputs (one-hot levels, standardisation and PCA fusion
are all linear), so it can be written ``score = b0 + sum_j beta_j * x_j`` over the raw encoded columns
(a numeric value, or 1/0 for each non-reference level).  :func:`nomogram_spec` recovers ``b0`` and
``beta_j`` from the model itself (scoring the zero row and each unit row through the model's own
preprocessing), so the nomogram cannot drift from :mod:`pipelines.survival.scoring`.

Points: each variable's contribution ``beta_j * x`` over its drawn range (numeric: the range of the
values in the data given, else the training mean +- 2 SD; categorical: its levels) is shifted to
start at 0; the variable with the largest contribution range spans 0-100 points and the others are
scaled alike.  Total points ``T`` map back to the score ``score = lp0 + T * lp_per_point``, and the
score to the predicted risk: ``1 - S0(h) ** exp(score)`` for Cox kinds (the stored Breslow baseline
survival at the model's horizon), ``sigmoid(score)`` for logistic kinds.  Patients outside the drawn
range get points outside 0-100 on that variable; their risk is still exact.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.survival.artifact import SurvivalModel
from pipelines.survival.design import Value, _as_float, _as_level
from pipelines.survival.scoring import horizon_probability, linear_predictor

COX_KINDS = ("cox", "lasso-cox")
LOGISTIC_KINDS = ("logistic", "binary")  # score = log-odds of the outcome ("binary": the 0/1-outcome kind)
RISK_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


class NomogramError(ValueError):
    """The model cannot be drawn as a nomogram; the message says why."""


@dataclass(frozen=True)
class VariableScale:
    name: str
    kind: str  # "numeric" or "categorical"
    beta: float  # numeric: score per unit of the raw value
    lo: float  # numeric: drawn range
    hi: float
    levels: tuple[tuple[str, float], ...]  # categorical: (level, score contribution vs reference)
    offset: float  # the smallest contribution over the drawn range (points 0)

    def contribution(self, value: Value) -> float:
        if self.kind == "numeric":
            x = _as_float(value)
            if x is None:
                raise NomogramError(f"{self.name}: missing or not a number ({value!r})")
            return self.beta * x
        level = _as_level(value)
        for lv, c in self.levels:
            if lv == level:
                return c
        raise NomogramError(f"{self.name}: level {level!r} not in the model")

    @property
    def spread(self) -> float:
        if self.kind == "numeric":
            return abs(self.beta) * (self.hi - self.lo)
        cs = [c for _, c in self.levels]
        return max(cs) - min(cs)


@dataclass(frozen=True)
class NomogramSpec:
    variables: tuple[VariableScale, ...]
    points_per_score: float  # 100 / the largest contribution spread
    lp0: float  # score at 0 total points
    total_max: float  # total points when every variable is at its highest-points end
    risk_label: str
    kind: str

    def points(self, var: VariableScale, value: Value) -> float:
        return (var.contribution(value) - var.offset) * self.points_per_score

    def total_points(self, values: Mapping[str, Value]) -> float:
        return float(sum(self.points(v, values.get(v.name)) for v in self.variables))

    def score(self, total: float | npt.NDArray[np.float64]) -> Any:
        return self.lp0 + np.asarray(total, dtype=np.float64) / self.points_per_score


def _raw_linear(model: SurvivalModel) -> tuple[float, npt.NDArray[np.float64]]:
    """``b0`` and ``beta`` over the raw encoded columns, from the model's own preprocessing and scoring."""
    d = model.design
    k = len(d.encoded_columns)
    rows = np.vstack([np.zeros(k), np.eye(k)])
    lp = linear_predictor(model, d._project(rows))
    return float(lp[0]), np.asarray(lp[1:] - lp[0], dtype=np.float64)


def nomogram_spec(model: SurvivalModel, frame: pd.DataFrame | None = None) -> NomogramSpec:
    """The scales of the nomogram of ``model``; numeric ranges from ``frame`` when given."""
    h = model.horizon_days
    if model.kind in COX_KINDS:
        if h is None or h not in model.baseline_survival:
            raise NomogramError("the Cox model stores no baseline survival at its horizon: no risk axis")
        label = _horizon_label(h)
    elif model.kind in LOGISTIC_KINDS:
        label = _horizon_label(h) if model.kind == "logistic" and h else "P(outcome)"
    else:
        raise NomogramError(f"no nomogram for kind {model.kind!r}")
    b0, beta = _raw_linear(model)
    d = model.design
    col = {c: i for i, c in enumerate(d.encoded_columns)}
    variables: list[VariableScale] = []
    for spec in d.features:
        if spec.kind == "numeric":
            i = col[spec.name]
            lo, hi = d.means[i] - 2 * d.scales[i], d.means[i] + 2 * d.scales[i]
            if frame is not None and spec.name in frame.columns:
                vals = pd.to_numeric(frame[spec.name], errors="coerce").to_numpy(dtype=np.float64)
                vals = vals[np.isfinite(vals)]
                if len(vals) >= 2 and np.ptp(vals) > 0:
                    lo, hi = float(vals.min()), float(vals.max())
            b = float(beta[i])
            v = VariableScale(spec.name, "numeric", b, lo, hi, (), min(b * lo, b * hi))
        else:
            levels = ((spec.levels[0], 0.0),
                      *((lv, float(beta[col[f"{spec.name}={lv}"]])) for lv in spec.levels[1:]))
            v = VariableScale(spec.name, "categorical", 0.0, 0.0, 0.0, levels, min(c for _, c in levels))
        if v.spread > 1e-12:  # a variable the model does not use (e.g. dropped by the lasso) is not drawn
            variables.append(v)
    if not variables:
        raise NomogramError("the model uses no variable")
    widest = max(v.spread for v in variables)
    per = 100.0 / widest
    lp0 = b0 + sum(v.offset for v in variables)
    total = sum(v.spread for v in variables) * per
    return NomogramSpec(tuple(variables), per, lp0, total, label, model.kind)


def _horizon_label(h: float) -> str:
    years = h / 365.25
    if years >= 0.99 and abs(years - round(years)) < 0.01:
        return f"P(event by {round(years):g} years)"
    return f"P(event by {h:g} days)"


def points_to_risk(model: SurvivalModel, spec: NomogramSpec, total: float | Sequence[float]) -> npt.NDArray[np.float64]:
    """Predicted risk at ``total`` points: the same function the bottom axis is drawn with."""
    s = np.atleast_1d(spec.score(np.asarray(total, dtype=np.float64)))
    if model.kind in LOGISTIC_KINDS and model.kind != "logistic":
        return np.asarray(1.0 / (1.0 + np.exp(-s)), dtype=np.float64)
    p = horizon_probability(model, s)
    if p is None:
        raise NomogramError("the model gives no probability at its horizon")
    return p


def risk_to_points(model: SurvivalModel, spec: NomogramSpec, risk: float) -> float:
    """Inverse of :func:`points_to_risk`."""
    if model.kind in LOGISTIC_KINDS:
        s = math.log(risk / (1 - risk))
    else:
        s0 = model.baseline_survival[model.horizon_days]  # type: ignore[index]
        if not 0 < s0 < 1:
            raise NomogramError(f"baseline survival {s0} at the horizon gives no risk scale")
        s = math.log(math.log(1 - risk) / math.log(s0))
    return (s - spec.lp0) * spec.points_per_score


def _nice(lo: float, hi: float, n: int = 6) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]
    return [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]


def axes(model: SurvivalModel, spec: NomogramSpec) -> list[tuple[str, list[tuple[float, str, float]]]]:
    """Every row of the drawing: (title, [(x position 0-100, label, value)]).

    Variable rows and the points row are in points; the total-points and risk rows are drawn across
    the same width, so their x is ``total * 100 / total_axis_max``.  :func:`draw` draws exactly this.
    """
    rows: list[tuple[str, list[tuple[float, str, float]]]] = [
        ("Points", [(float(p), f"{p:g}", float(p)) for p in range(0, 101, 10)])]
    for v in spec.variables:
        if v.kind == "numeric":
            width = v.spread * spec.points_per_score
            ticks = _nice(v.lo, v.hi, max(2, min(6, int(width / 8))))
            if len(ticks) < 2:  # a short scale: label its ends
                ticks = [v.lo, v.hi]
            rows.append((v.name, [(spec.points(v, t), f"{t:.3g}", t) for t in ticks]))
        else:
            rows.append((v.name, [(spec.points(v, lv), lv, c) for lv, c in v.levels]))
    first = _nice(0, spec.total_max)
    step = first[1] - first[0] if len(first) > 1 else 10.0
    tmax = math.ceil(spec.total_max / step - 1e-9) * step
    scale = 100.0 / tmax
    rows.append(("Total points", [(t * scale, f"{t:g}", t) for t in _nice(0, tmax)]))
    risk_row = []
    for r in RISK_TICKS:
        t = risk_to_points(model, spec, r)
        if 0 <= t <= tmax:
            risk_row.append((t * scale, f"{r:g}", r))
    rows.append((spec.risk_label, risk_row))
    return rows


def total_axis_scale(rows: Sequence[tuple[str, list[tuple[float, str, float]]]]) -> float:
    """Drawn x per total point (from the total-points row of :func:`axes`)."""
    total = next(r for title, r in rows if title == "Total points")
    return total[-1][0] / total[-1][2]


def draw(model: SurvivalModel, spec: NomogramSpec) -> bytes:
    """The nomogram as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = axes(model, spec)
    extents = {v.name: [spec.points(v, v.lo), spec.points(v, v.hi)] for v in spec.variables if v.kind == "numeric"}
    fig = Figure(figsize=(9.0, 0.9 + 0.55 * len(rows)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    n = len(rows)
    for k, (title, ticks) in enumerate(rows):
        y = n - k
        xs = [t[0] for t in ticks] + extents.get(title, [])
        if xs:
            ax.plot([min(xs), max(xs)], [y, y], c="k", lw=1)
        above: tuple[float, str] = (-math.inf, "")
        under: tuple[float, str] = (-math.inf, "")
        for x, label, _ in sorted(ticks):
            def clear(prev: tuple[float, str], x: float = x, label: str = label) -> bool:
                return x - prev[0] >= 0.45 * (len(prev[1]) + len(label)) + 1.0  # label widths in points units

            below = not clear(above) and clear(under)  # a label too close to the previous one goes under the line
            if not clear(above) and not below:
                continue  # no room above or below: leave this tick out
            ax.plot([x, x], [y, y - 0.12 if below else y + 0.12], c="k", lw=1)
            ax.text(x, y - 0.18 if below else y + 0.18, label, ha="center", va="top" if below else "bottom",
                    fontsize=7)
            if below:
                under = (x, label)
            else:
                above = (x, label)
        ax.text(-4, y, title[:34], ha="right", va="center", fontsize=8)
    ax.set_xlim(-45, 105)
    ax.set_ylim(0.4, n + 0.8)
    ax.axis("off")
    ax.set_title(f"Nomogram: {model.name} {model.version} ({model.kind})", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
