"""Validation metrics for survival risk scores.

- Harrell's C (``sksurv.metrics.concordance_index_censored``) and Uno's C (IPCW, truncated at the
  horizon; ``concordance_index_ipcw``) with seeded percentile-bootstrap confidence intervals;
- time-dependent cumulative/dynamic AUC (``cumulative_dynamic_auc``);
- calibration at the horizon: mean predicted event probability against the Kaplan-Meier observed
  event probability by quantile group of the prediction, the observed/expected ratio, and the
  calibration slope (Cox regression of the outcome on the score; 1 is ideal);
- hazard ratios with 95% CIs (lifelines ``CoxPHFitter``): per SD of the score, and each risk group
  against the lowest;
- Kaplan-Meier curves by risk group with the log-rank test (lifelines);
- net benefit for decision curves at the horizon (Vickers et al. 2008, survival version with KM
  estimates), with treat-all and treat-none.

The censoring distribution for Uno's C and the td-AUC is estimated on the evaluation data itself
(no training data travels with a model).  Every function takes times in days.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]


def _surv(time: F64, event: B) -> Any:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event, dtype=bool), time=np.asarray(time, dtype=float))


def _clean(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def midrank(x: F64) -> F64:
    """Ranks 1..n with ties given their average rank (numpy only)."""
    order = np.argsort(x, kind="mergesort")
    xs = np.asarray(x, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    out = np.empty(len(xs), dtype=np.float64)
    out[order] = np.repeat((starts + ends - 1) / 2 + 1, ends - starts)
    return out


def harrell_c(time: F64, event: B, score: F64) -> float:
    from sksurv.metrics import concordance_index_censored

    return float(concordance_index_censored(event.astype(bool), time, score)[0])


def uno_c(time: F64, event: B, score: F64, tau: float | None = None) -> float:
    from sksurv.metrics import concordance_index_ipcw

    y = _surv(time, event)
    tau_ok = None if tau is None or tau >= float(np.max(time)) else tau
    return float(concordance_index_ipcw(y, y, score, tau=tau_ok)[0])


def bootstrap_ci(stat: Callable[[npt.NDArray[np.intp]], float], n: int, n_boot: int, seed: int,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap over patients; resamples whose statistic fails or is NaN are skipped."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                v = stat(idx)
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
            continue
        if math.isfinite(v):
            values.append(v)
    if len(values) < max(20, n_boot // 2):
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def td_auc(time: F64, event: B, score: F64, times: Sequence[float]) -> dict[str, Any]:
    """Cumulative/dynamic AUC at ``times`` inside the follow-up; times outside it are dropped."""
    from sksurv.metrics import cumulative_dynamic_auc

    lo = float(np.min(time[event])) if event.any() else math.inf
    hi = float(np.max(time[~event])) if (~event).any() else float(np.max(time))
    hi = min(hi, float(np.max(time)))
    usable = sorted({float(t) for t in times if lo <= t < hi})
    if not usable:
        return {"times_days": [], "auc": [], "mean_auc": None}
    y = _surv(time, event)
    try:
        auc, mean = cumulative_dynamic_auc(y, y, score, usable)
    except ValueError as e:
        return {"times_days": [], "auc": [], "mean_auc": None, "error": str(e)}
    return {"times_days": usable, "auc": [_clean(a) for a in auc], "mean_auc": _clean(mean)}


def km_at(time: F64, event: B, t: float) -> tuple[float, float, float]:
    """Kaplan-Meier survival at ``t`` with its 95% CI (exponential Greenwood, as lifelines computes it).

    A few lines of numpy instead of a lifelines fit, because decision curves need it per threshold;
    ``tests/test_survival_models.py`` checks it against lifelines' ``KaplanMeierFitter``.
    """
    ev = np.unique(time[event & (time <= t)])
    if len(ev) == 0:
        return 1.0, 1.0, 1.0
    at_risk = np.asarray([np.sum(time >= u) for u in ev], dtype=np.float64)
    deaths = np.asarray([np.sum((time == u) & event) for u in ev], dtype=np.float64)
    s = float(np.prod(1 - deaths / at_risk))
    if s <= 0:
        return 0.0, 0.0, 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        greenwood = float(np.sum(deaths / (at_risk * (at_risk - deaths))))
    if s >= 1 or not math.isfinite(greenwood):
        return s, s, s
    z = 1.959963984540054
    half = z * math.sqrt(greenwood / math.log(s) ** 2)
    loglog = math.log(-math.log(s))
    return s, math.exp(-math.exp(loglog + half)), math.exp(-math.exp(loglog - half))


def logistic_fit(x: F64, y: B, weights: F64 | None = None) -> tuple[float, F64, F64]:
    """Unpenalised logistic regression (scikit-learn); intercept, coefficients, Wald standard errors.

    With ``weights`` (e.g. IPCW) the standard errors are the robust sandwich ``A^-1 B A^-1``.
    """
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = LogisticRegression(C=np.inf, max_iter=5000).fit(x, y.astype(int), sample_weight=weights)
    b0, b = float(est.intercept_[0]), np.asarray(est.coef_[0], dtype=np.float64)
    xd = np.column_stack([np.ones(len(x)), x])
    p = 1 / (1 + np.exp(-(xd @ np.concatenate([[b0], b]))))
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    info = xd.T @ (xd * (w * p * (1 - p))[:, None])
    try:
        inv = np.linalg.inv(info)
        if weights is not None:
            u = xd * (w * (y.astype(np.float64) - p))[:, None]
            inv = inv @ (u.T @ u) @ inv
        se = np.sqrt(np.clip(np.diag(inv)[1:], 0, None))
    except np.linalg.LinAlgError:
        se = np.full(len(b), np.nan)
    return b0, b, se


def calibration(time: F64, event: B, prob: F64, score: F64, horizon: float, n_groups: int = 5,
                logistic: bool = False) -> dict[str, Any]:
    """Predicted vs KM-observed event probability by quantile group of the prediction.

    The calibration slope is the Cox coefficient of the score (Cox kinds) or, for a logistic model,
    the logistic coefficient of the logit among patients whose status at the horizon is known.
    """
    n_groups = max(2, min(n_groups, len(prob) // 10 or 2))
    edges = np.quantile(prob, np.linspace(0, 1, n_groups + 1))
    which = np.clip(np.searchsorted(edges[1:-1], prob, side="right"), 0, n_groups - 1)
    rows = []
    exp_total = 0.0
    for g in range(n_groups):
        m = which == g
        if m.sum() == 0:
            continue
        s, lo, hi = km_at(time[m], event[m], horizon)
        rows.append({"group": g + 1, "n": int(m.sum()), "events": int(event[m].sum()),
                     "predicted": float(prob[m].mean()), "observed": 1 - s,
                     "observed_lower": 1 - hi, "observed_upper": 1 - lo})
        exp_total += float(prob[m].sum())
    s_all, _, _ = km_at(time, event, horizon)
    observed_total = (1 - s_all) * len(prob)
    if logistic:
        known = (time >= horizon) | event
        y = event[known] & (time[known] <= horizon)
        slope: dict[str, Any] = {"hr_log": None, "log_ci": None}
        if 0 < y.sum() < len(y):
            _, b, se = logistic_fit(score[known][:, None], y)
            slope = {"hr_log": _clean(b[0]), "log_ci": [_clean(b[0] - 1.96 * se[0]), _clean(b[0] + 1.96 * se[0])]}
        method = "logistic regression of the horizon outcome on the logit (known status only)"
    else:
        slope = cox_on_score(time, event, score)
        method = "Cox regression of the outcome on the linear predictor"
    return {"horizon_days": horizon, "groups": rows,
            "observed_expected": _clean(observed_total / exp_total) if exp_total > 0 else None,
            "calibration_slope": slope["hr_log"], "calibration_slope_ci": slope["log_ci"],
            "calibration_slope_method": method}


def cox_on_score(time: F64, event: B, x: F64) -> dict[str, Any]:
    """Univariable Cox of the outcome on ``x``: log-HR with its 95% CI and p."""
    from lifelines import CoxPHFitter

    df = pd.DataFrame({"x": x, "T": time, "E": event.astype(int)})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter().fit(df, "T", "E")
    except Exception as e:  # lifelines raises ConvergenceError and friends  # noqa: BLE001
        return {"hr_log": None, "log_ci": None, "p": None, "error": str(e)}
    s = cph.summary.loc["x"]
    return {"hr_log": _clean(s["coef"]), "log_ci": [_clean(s["coef lower 95%"]), _clean(s["coef upper 95%"])],
            "p": _clean(s["p"])}


def hazard_ratios(time: F64, event: B, score: F64, groups: Sequence[str], labels: Sequence[str]) -> list[dict[str, Any]]:
    """HR per SD of the score, and each risk group against the lowest, with 95% CIs."""
    out = []
    sd = float(np.std(score, ddof=1))
    if sd > 0:
        r = cox_on_score(time, event, (score - score.mean()) / sd)
        if r["hr_log"] is not None:
            out.append({"term": "score per SD", "ratio": math.exp(r["hr_log"]),
                        "lower": math.exp(r["log_ci"][0]), "upper": math.exp(r["log_ci"][1]), "p": r["p"]})
    for lab in labels[1:]:
        m = np.asarray([g in (labels[0], lab) for g in groups])
        if m.sum() < 3:
            continue
        x = np.asarray([1.0 if g == lab else 0.0 for g, keep in zip(groups, m, strict=True) if keep])
        if x.min() == x.max():
            continue
        r = cox_on_score(time[m], event[m], x)
        if r["hr_log"] is not None:
            out.append({"term": f"{lab} vs {labels[0]}", "ratio": math.exp(r["hr_log"]),
                        "lower": math.exp(r["log_ci"][0]), "upper": math.exp(r["log_ci"][1]), "p": r["p"]})
    return out


def km_by_group(time: F64, event: B, groups: Sequence[str], labels: Sequence[str] | None = None,
                horizon: float | None = None) -> dict[str, Any]:
    """Kaplan-Meier curve per group and the (multi-group) log-rank test."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    g = np.asarray(groups, dtype=object)
    order = list(labels) if labels is not None else sorted(set(groups))
    out_groups = []
    for lab in order:
        m = g == lab
        if m.sum() == 0:
            continue
        km = KaplanMeierFitter().fit(time[m], event[m])
        sf = km.survival_function_
        med = float(km.median_survival_time_)
        item: dict[str, Any] = {"group": lab, "n": int(m.sum()), "events": int(event[m].sum()),
                                "median_survival_days": _clean(med),
                                "curve": {"time_days": [float(t) for t in sf.index],
                                          "survival": [float(s) for s in sf.iloc[:, 0]]}}
        if horizon is not None:
            s, lo, hi = km_at(time[m], event[m], horizon)
            item["survival_at_horizon"] = [s, lo, hi]
        out_groups.append(item)
    present = [x["group"] for x in out_groups]
    result: dict[str, Any] = {"groups": out_groups, "logrank_p": None, "logrank_statistic": None}
    if len(present) >= 2:
        keep = np.isin(g, present)
        test = multivariate_logrank_test(time[keep], g[keep], event[keep])
        result["logrank_p"] = _clean(test.p_value)
        result["logrank_statistic"] = _clean(test.test_statistic)
        result["logrank_df"] = len(present) - 1
    return result


def net_benefit(time: F64, event: B, prob: F64, horizon: float,
                thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Decision-curve net benefit at the horizon; event status by KM so censoring is handled."""
    ts = list(thresholds) if thresholds is not None else [round(x, 2) for x in np.arange(0.01, 0.96, 0.01)]
    n = len(prob)
    s_all, _, _ = km_at(time, event, horizon)
    model_nb, all_nb = [], []
    for pt in ts:
        w = pt / (1 - pt)
        pos = prob >= pt
        if pos.sum() == 0:
            model_nb.append(0.0)
        else:
            s_pos, _, _ = km_at(time[pos], event[pos], horizon)
            frac = pos.sum() / n
            model_nb.append(float((1 - s_pos) * frac - s_pos * frac * w))
        all_nb.append(float((1 - s_all) - s_all * w))
    return {"horizon_days": horizon, "thresholds": ts, "model": model_nb, "treat_all": all_nb,
            "treat_none": [0.0] * len(ts)}


def default_auc_times(time: F64, horizon: float | None) -> list[float]:
    years = [365.25 * k for k in range(1, 11)]
    if not horizon:
        return years
    return sorted({*[y for y in years if abs(y - horizon) > 2.0], horizon})
