"""Fitting the three model kinds on a :class:`~pipelines.survival.data.Cohort`.

- ``cox``: lifelines ``CoxPHFitter`` (Efron ties), optional ridge ``penalizer``; per-SD hazard ratios
  with Wald 95% CIs from lifelines.
- ``lasso-cox``: scikit-survival ``CoxnetSurvivalAnalysis(l1_ratio=1)`` along an alpha path; alpha is
  chosen by seeded, event-stratified k-fold cross-validation of Harrell's C on the held-out folds
  (the largest alpha within one SE of the best with ``--one-se``); refitted on all patients at that
  alpha.  ``tests/test_survival_models.py`` cross-checks it against lifelines' ``penalizer`` with
  ``l1_ratio=1.0`` (same objective scaling: -loglik/n + alpha * |beta|_1).
- ``logistic``: event by the horizon (``time <= h`` and event) against survival past it; patients
  censored before the horizon are **excluded** (``censoring="exclude"``, complete case, the default)
  or, with ``censoring="ipcw"``, the patients whose status at the horizon is known are weighted by
  the inverse probability of remaining uncensored (Kaplan-Meier of the censoring times: ``1/G(T-)``
  for an event by the horizon, ``1/G(h)`` past it), which removes the complete-case bias toward
  events when censoring does not depend on the features; scikit-learn ``LogisticRegression``
  without penalty, Wald CIs for odds ratios from the observed information (robust sandwich CIs with
  weights, which ignore the uncertainty of the weights).  The model card says which was used.
- ``binary`` (a 0/1 outcome, no time): :mod:`pipelines.survival.binary`.

Without ``features`` every column but the outcome columns and ``exclude`` is a candidate
(:func:`pipelines.survival.columns.select_features`); the model stores what was used and dropped.

All kinds use the same fitted :class:`~pipelines.survival.design.Design` (median imputation,
standardisation, optional PCA fusion), store risk-group cut-offs from the training scores and, for
Cox kinds, the Breslow baseline survival at the stored horizons.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.survival import metrics
from pipelines.survival.artifact import RiskGroups, SurvivalModel
from pipelines.survival.columns import SelectionError, select_features
from pipelines.survival.data import Cohort, median_follow_up_days
from pipelines.survival.design import fit_design

log = logging.getLogger(__name__)
SEPARATION_LOG_OR = 25.0  # |log odds ratio| per standard deviation beyond this: separation, not an estimate
F64 = npt.NDArray[np.float64]

GROUP_METHODS: dict[str, tuple[tuple[float, ...], tuple[str, ...]]] = {
    "median": ((0.5,), ("low", "high")),
    "tertiles": ((1 / 3, 2 / 3), ("low", "intermediate", "high")),
    "quartiles": ((0.25, 0.5, 0.75), ("Q1", "Q2", "Q3", "Q4")),
}
STORED_HORIZONS_DAYS = (365.25, 730.5, 1095.75, 1826.25)
DEFAULT_HORIZON_DAYS = 1826.0
CENSORING = ("exclude", "ipcw")
DEFAULT_L1_RATIOS = (0.2, 0.5, 0.8)


class FitError(ValueError):
    """The model cannot be fitted; the message says why."""


@dataclass(frozen=True)
class FitOptions:
    kind: str
    features: tuple[str, ...]
    horizon_days: float | None = DEFAULT_HORIZON_DAYS
    categorical: tuple[str, ...] = ()
    groups: Mapping[str, Sequence[str]] = field(default_factory=dict)  # PCA fusion groups
    pca_variance: float = 0.9
    risk_groups: str = "median"
    name: str = "survival-model"
    version: str = "1.0.0"
    penalizer: float = 0.0  # cox: ridge penalty (lifelines)
    cv_folds: int = 5
    one_se: bool = False
    n_alphas: int = 50
    seed: int = 0
    n_boot: int = 200
    impute_at_prediction: bool = False
    time_column: str = ""
    event_column: str = ""
    time_unit: str = "days"
    censoring: str = "exclude"  # logistic: "exclude" (complete case) or "ipcw"
    exclude: tuple[str, ...] = ()  # columns left out of the default feature set
    outcome_column: str = ""  # binary
    penalty: str = "l1"  # binary: "l1" or "elasticnet"
    l1_ratios: tuple[float, ...] = DEFAULT_L1_RATIOS  # binary elasticnet: mixing values tried by CV


def resolve_features(frame: pd.DataFrame, opts: FitOptions,
                     reserved: Sequence[str]) -> tuple[tuple[str, ...], dict[str, Any] | None]:
    """``opts.features`` (and PCA group columns), or the default set: every usable column but ``reserved``."""
    group_cols = [c for cols in opts.groups.values() for c in cols]
    if opts.features:
        if opts.exclude:
            raise FitError("--exclude only applies to the default feature set: with --features, "
                           "leave the column out of --features")
        return tuple(dict.fromkeys([*opts.features, *group_cols])), None
    if not [c for c in reserved if c]:
        raise FitError("no features given, and the outcome columns are unknown (set time_column/event_column "
                       "or outcome_column, or give the features)")
    try:
        sel = select_features(frame, [c for c in reserved if c], opts.exclude, opts.categorical)
    except SelectionError as e:
        raise FitError(str(e)) from None
    used = list(sel.used)
    lost = [c for c in group_cols if c not in used]
    if lost:
        why = dict(sel.dropped)
        raise FitError("PCA group columns not usable: " + "; ".join(f"{c}: {why.get(c, 'excluded')}" for c in lost))
    log.info("default features: %d used, %d dropped", len(used), len(sel.dropped))
    return tuple(used), sel.to_dict()


def ipcw_weights(time: F64, event: npt.NDArray[np.bool_], horizon: float) -> F64:
    """Inverse probability of censoring weights for the status at ``horizon`` (0 where it is unknown).

    ``G`` is the Kaplan-Meier estimate of the censoring distribution (an event at the same time as a
    censoring comes first); an event by the horizon gets ``1/G(T-)``, a patient followed past it
    ``1/G(h)`` (``1/G(h-)`` if censored exactly at ``h``), a patient censored before it 0.
    """
    cens_times = np.unique(time[~event])
    factors = []
    for u in cens_times:
        at_risk = float(np.sum(time > u) + np.sum((time == u) & ~event))
        c = float(np.sum((time == u) & ~event))
        factors.append(1.0 - c / at_risk if at_risk > 0 else 1.0)
    cum = np.cumprod(factors) if factors else np.ones(0)

    def g_before(t: float) -> float:  # G(t-): censorings strictly before t
        k = int(np.searchsorted(cens_times, t, side="left"))
        return float(cum[k - 1]) if k > 0 else 1.0

    def g_at(t: float) -> float:  # G(t): censorings up to and including t
        k = int(np.searchsorted(cens_times, t, side="right"))
        return float(cum[k - 1]) if k > 0 else 1.0

    w = np.zeros(len(time))
    for i, (t, e) in enumerate(zip(time, event, strict=True)):
        if e and t <= horizon:
            g = g_before(t)
        elif t > horizon:
            g = g_at(horizon)
        elif t == horizon:
            g = g_before(horizon)
        else:
            continue
        w[i] = 1.0 / g if g > 0 else 0.0
    return w


def breslow_survival(time: F64, event: npt.NDArray[np.bool_], lp: F64, at: Sequence[float]) -> dict[float, float]:
    """Breslow baseline survival S0(t) = exp(-sum_{t_j<=t} d_j / sum_{R(t_j)} exp(lp)) at ``at``."""
    risk = np.exp(lp)
    event_times = np.unique(time[event])
    h = np.zeros(len(event_times))
    for j, t in enumerate(event_times):
        d = float(np.sum((time == t) & event))
        h[j] = d / float(np.sum(risk[time >= t]))
    cum = np.cumsum(h)
    out = {}
    for t in at:
        k = int(np.searchsorted(event_times, t, side="right"))
        out[float(t)] = float(math.exp(-(cum[k - 1] if k > 0 else 0.0)))
    return out


def _risk_groups(method: str, scores: F64) -> RiskGroups:
    if method not in GROUP_METHODS:
        raise FitError(f"risk groups {method!r}: expected one of {', '.join(GROUP_METHODS)}")
    qs, labels = GROUP_METHODS[method]
    cut = tuple(float(c) for c in np.quantile(scores, qs))
    return RiskGroups(method, cut, labels)


def _cox_lifelines(x: F64, time: F64, event: npt.NDArray[np.bool_], columns: Sequence[str],
                   penalizer: float, l1_ratio: float = 0.0) -> Any:
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    df = pd.DataFrame(x, columns=list(columns))
    df["__T"], df["__E"] = time, event.astype(int)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cph = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio).fit(df, "__T", "__E")
        except ConvergenceError as e:
            raise FitError(f"Cox fit did not converge ({str(e).split('.')[0]}): probably collinear columns or a "
                           "level without events; try --penalizer 0.01, lasso-cox, or fewer levels") from None
    messages = sorted({str(w.message).split("\n")[0].strip() for w in caught
                       if issubclass(w.category, UserWarning | RuntimeWarning)} - {""})
    for m in messages:
        log.warning("cox fit: %s", m)
    cph.prognode_warnings = messages
    return cph


def _coxnet_path(x: F64, time: F64, event: npt.NDArray[np.bool_], alphas: Sequence[float] | None,
                 n_alphas: int) -> Any:
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    y = Surv.from_arrays(event=event, time=time)
    est = CoxnetSurvivalAnalysis(l1_ratio=1.0, alphas=None if alphas is None else list(alphas),
                                 n_alphas=n_alphas, alpha_min_ratio=0.01, max_iter=200_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return est.fit(x, y)


def lasso_cv(x: F64, time: F64, event: npt.NDArray[np.bool_], folds: int, seed: int, n_alphas: int,
             one_se: bool) -> dict[str, Any]:
    """Choose alpha by k-fold CV of Harrell's C; returns the path, per-alpha mean/SE and the choice."""
    path = _coxnet_path(x, time, event, None, n_alphas)
    alphas = [float(a) for a in path.alphas_]
    rng = np.random.default_rng(seed)
    fold = np.empty(len(time), dtype=int)
    for stratum in (event, ~event):  # stratified by event status
        idx = np.flatnonzero(stratum)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    scores = np.full((folds, len(alphas)), np.nan)
    for k in range(folds):
        tr, te = fold != k, fold == k
        est = _coxnet_path(x[tr], time[tr], event[tr], alphas, n_alphas)
        fitted = np.asarray(est.alphas_, dtype=np.float64)
        for j, a in enumerate(alphas):
            # glmnet-style paths may stop early; an alpha beyond the fold's path uses its nearest end
            coef = est.coef_[:, int(np.argmin(np.abs(fitted - a)))]
            s = x[te] @ coef
            if np.ptp(s) == 0 or not event[te].any():
                scores[k, j] = 0.5
            else:
                scores[k, j] = metrics.harrell_c(time[te], event[te], s)
    mean = scores.mean(axis=0)
    se = scores.std(axis=0, ddof=1) / math.sqrt(folds)
    best = int(np.argmax(mean))
    chosen = best
    if one_se:
        ok = [j for j in range(len(alphas)) if mean[j] >= mean[best] - se[best]]
        chosen = min(ok, key=lambda j: -alphas[j]) if ok else best  # the largest alpha (sparsest)
    return {"alphas": alphas, "cv_c_index_mean": [float(m) for m in mean], "cv_c_index_se": [float(s) for s in se],
            "alpha": alphas[chosen], "cv_c_index": float(mean[chosen]), "cv_c_index_se_at_alpha": float(se[chosen]),
            "folds": folds, "seed": seed, "rule": "one-se" if one_se else "max"}


def apparent_metrics(time: F64, event: npt.NDArray[np.bool_], s: F64, horizon: float | None, n_boot: int,
                     seed: int) -> dict[str, Any]:
    c = metrics.harrell_c(time, event, s)
    ci = metrics.bootstrap_ci(lambda i: metrics.harrell_c(time[i], event[i], s[i]), len(s), n_boot, seed)
    out: dict[str, Any] = {"n": len(s), "events": int(event.sum()), "c_index": c, "c_index_ci": ci}
    try:
        out["uno_c_index"] = metrics.uno_c(time, event, s, horizon)
        out["uno_c_index_ci"] = metrics.bootstrap_ci(
            lambda i: metrics.uno_c(time[i], event[i], s[i], horizon), len(s), n_boot, seed)
    except ValueError as e:
        out["uno_c_index"], out["uno_error"] = None, str(e)
    return out


def fit_model(cohort: Cohort, opts: FitOptions, software_version: str = "") -> SurvivalModel:
    """Fit ``opts.kind`` on the whole cohort and return the artifact (not yet saved)."""
    if opts.kind == "logistic" and opts.horizon_days is None:
        raise FitError("logistic needs a horizon (--horizon DAYS)")
    if cohort.events < 2:
        raise FitError(f"only {cohort.events} events: nothing to fit")
    time, event = cohort.time_days, cohort.event
    training: dict[str, Any] = {"source": cohort.source, "sha256": cohort.sha256, "n": cohort.n,
                                "events": cohort.events, "median_follow_up_days": median_follow_up_days(cohort),
                                "time_column": opts.time_column, "event_column": opts.event_column,
                                "time_unit": opts.time_unit}
    frame = cohort.frame
    if opts.censoring not in CENSORING:
        raise FitError(f"censoring {opts.censoring!r}: expected one of {', '.join(CENSORING)}")
    if opts.censoring != "exclude" and opts.kind != "logistic":
        raise FitError(f"censoring {opts.censoring!r} applies to --kind logistic only (Cox kinds use every patient)")
    weights: F64 | None = None
    if opts.kind == "logistic":
        h = float(opts.horizon_days)  # type: ignore[arg-type]
        keep = (time >= h) | event
        training["censoring"] = opts.censoring
        training["excluded_censored"] = int((~keep).sum())
        if opts.censoring == "ipcw":
            weights = ipcw_weights(time, event, h)[keep]
            training["ipcw_weight_range"] = [float(weights.min()), float(weights.max())]
        training["horizon_events"] = int((event & (time <= h)).sum())
        frame = frame.loc[keep].reset_index(drop=True)
        time_fit, event_fit = time[keep], event[keep]
        if training["horizon_events"] < 2 or int((time_fit > h).sum()) < 2:
            raise FitError(f"logistic at {h:g} days: too few patients on one side of the horizon")
    else:
        time_fit, event_fit = time, event
    features, selection = resolve_features(frame, opts, reserved=(opts.time_column, opts.event_column))
    if selection is not None:
        training["feature_selection"] = selection
    design = fit_design(frame, features, opts.categorical, opts.groups, opts.pca_variance,
                        opts.impute_at_prediction)
    x, _ = design.transform(frame, impute=True)
    cols = list(design.columns)
    details: dict[str, Any] = {}
    hrs: list[dict[str, Any]] = []
    baseline: dict[float, float] = {}
    intercept, lp_center = 0.0, 0.0
    if opts.kind == "cox":
        cph = _cox_lifelines(x, time_fit, event_fit, cols, opts.penalizer)
        summ = cph.summary
        coef = np.asarray([float(cph.params_[c]) for c in cols])
        lp_center = float(np.asarray(cph._norm_mean[cols]) @ coef)
        for c in cols:
            r = summ.loc[c]
            hrs.append({"term": c, "ratio": float(r["exp(coef)"]), "lower": float(r["exp(coef) lower 95%"]),
                        "upper": float(r["exp(coef) upper 95%"]), "p": float(r["p"])})
        large = [c for c, b in zip(cols, coef, strict=True) if abs(b) > 5]
        if large:
            log.warning("cox: |coefficient| > 5 per SD for %s: probably separation (a level without events); "
                        "use --penalizer or lasso-cox", ", ".join(large))
        details = {"library": "lifelines.CoxPHFitter", "ties": "efron", "penalizer": opts.penalizer,
                   "warnings": [*cph.prognode_warnings,
                                *([f"|coefficient| > 5 per SD (separation?): {', '.join(large)}"] if large else [])],
                   "log_likelihood": float(cph.log_likelihood_), "concordance_lifelines": float(cph.concordance_index_)}
    elif opts.kind == "lasso-cox":
        cv = lasso_cv(x, time_fit, event_fit, opts.cv_folds, opts.seed, opts.n_alphas, opts.one_se)
        refit = "single alpha"
        try:
            est = _coxnet_path(x, time_fit, event_fit, [cv["alpha"]], opts.n_alphas)
            coef = np.asarray(est.coef_[:, 0], dtype=np.float64)
        except ArithmeticError:  # coxnet from a cold start can overflow where the warm-started path did not
            path = _coxnet_path(x, time_fit, event_fit, cv["alphas"], opts.n_alphas)
            k = int(np.argmin(np.abs(np.asarray(path.alphas_, dtype=np.float64) - cv["alpha"])))
            coef = np.asarray(path.coef_[:, k], dtype=np.float64)
            refit = "taken from the warm-started path (the single-alpha refit overflowed)"
            log.warning("lasso-cox: coefficients %s", refit)
        lp_center = float(np.mean(x @ coef))
        for c, b in zip(cols, coef, strict=True):
            hrs.append({"term": c, "ratio": math.exp(b), "lower": None, "upper": None, "p": None,
                        "note": "penalised: no valid CI"})
        details = {"library": "sksurv.linear_model.CoxnetSurvivalAnalysis", "l1_ratio": 1.0, "ties": "breslow",
                   "selected": [c for c, b in zip(cols, coef, strict=True) if b != 0], "refit": refit, **cv}
        if not details["selected"]:
            log.warning("lasso-cox: cross-validation chose alpha %.4g, which keeps no feature", cv["alpha"])
    elif opts.kind == "logistic":
        y = event_fit & (time_fit <= float(opts.horizon_days))  # type: ignore[arg-type]
        intercept, coef, se = metrics.logistic_fit(x, y, weights)
        sds = np.asarray(x, dtype=float).std(axis=0)
        diverged = [c for c, b, sd in zip(cols, coef, sds, strict=True)
                    if not math.isfinite(b) or abs(b) * float(sd) > SEPARATION_LOG_OR]
        if diverged:  # (quasi-)complete separation: the maximum-likelihood odds ratio is infinite
            raise FitError(f"logistic: the outcome is (nearly) separated by {', '.join(diverged)}: their odds "
                           "ratios diverge, so this unpenalised fit has no estimate; use fewer features, "
                           "--kind binary (penalised, cross-validated) or lasso-cox")
        for c, b, e in zip(cols, coef, se, strict=True):
            hrs.append({"term": c, "ratio": math.exp(b), "lower": math.exp(b - 1.96 * e) if math.isfinite(e) else None,
                        "upper": math.exp(b + 1.96 * e) if math.isfinite(e) else None,
                        "p": _wald_p(b, e), "measure": "odds ratio"})
        details = {"library": "sklearn.linear_model.LogisticRegression", "penalty": "none",
                   "outcome": f"event by {opts.horizon_days:g} days",
                   "censored_before_horizon": "excluded (complete case)" if weights is None else
                   "no weight; the others weighted by inverse probability of censoring (IPCW, KM of censoring)",
                   "standard_errors": "observed information" if weights is None else
                   "robust sandwich (weights taken as known)"}
    else:
        raise FitError(f"unknown kind {opts.kind!r}")
    _add_per_unit(hrs, design)
    scores = x @ coef + intercept - lp_center
    if opts.kind != "logistic":
        at = sorted({*STORED_HORIZONS_DAYS, *([float(opts.horizon_days)] if opts.horizon_days else [])})
        baseline = breslow_survival(time_fit, event_fit, scores, at)
    apparent = apparent_metrics(time_fit, event_fit, scores, opts.horizon_days, opts.n_boot, opts.seed)
    model_metrics: dict[str, Any] = {"training (apparent)": apparent}
    if opts.kind == "lasso-cox":
        model_metrics["cross-validation"] = {"c_index": details["cv_c_index"], "n": cohort.n,
                                             "events": cohort.events, "folds": opts.cv_folds}
    return SurvivalModel(
        name=opts.name, version=opts.version, kind=opts.kind, design=design,
        coefficients=tuple(float(b) for b in coef), risk_groups=_risk_groups(opts.risk_groups, scores),
        horizon_days=None if opts.horizon_days is None else float(opts.horizon_days),
        intercept=intercept, lp_center=lp_center, baseline_survival=baseline, training=training,
        metrics=model_metrics, hazard_ratios=tuple(hrs), fit_details=details,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(), software_version=software_version)


def _add_per_unit(hrs: list[dict[str, Any]], design: Any) -> None:
    """Ratios per original unit (per year of age; level vs reference for a category), beside per SD."""
    scale = dict(zip(design.encoded_columns, design.scales, strict=True))
    for h in hrs:
        sd = scale.get(h["term"])
        if sd is None:  # a PCA score has no original unit
            continue
        per = {"ratio": math.exp(math.log(h["ratio"]) / sd) if h["ratio"] > 0 else None}
        for k in ("lower", "upper"):
            v = h.get(k)
            per[k] = math.exp(math.log(v) / sd) if isinstance(v, float) and 0 < v < math.inf else None
        h["per_unit"] = per


def _wald_p(b: float, se: float) -> float | None:
    if not math.isfinite(se) or se <= 0:
        return None
    return float(math.erfc(abs(b / se) / math.sqrt(2)))
