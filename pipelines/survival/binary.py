"""Binary outcomes (a 0/1 column, e.g. microvascular invasion): penalised logistic regression.

``prognode model fit --kind binary --outcome COL`` fits

    minimise  (1/n) sum_i logloss(y_i, b0 + x_i . w)  +  lambda * (r * |w|_1 + (1 - r) / 2 * |w|_2^2)

on the standardised design (:mod:`pipelines.survival.design`), with an unpenalised intercept, by
accelerated proximal gradient (FISTA with adaptive restart), the objective of glmnet and of
scikit-learn's ``LogisticRegression(C=1/(n*lambda), l1_ratio=r)`` (``tests/test_binary_models.py``
cross-checks the coefficients against scikit-learn's saga solver).  ``r = 1`` is the lasso (L1);
``--penalty elasticnet`` also chooses ``r`` from ``--l1-ratios``.  ``lambda`` (and ``r``) are chosen by
seeded, outcome-stratified k-fold cross-validation of the binomial deviance on the training rows only
(``--one-se``: the largest lambda within one standard error of the best), then the model is refitted
on all training rows.

Evaluation: AUC (Mann-Whitney, ties counted half) with a seeded percentile-bootstrap CI, Brier score,
calibration (slope: logistic regression of the outcome on the predicted log-odds; intercept:
calibration-in-the-large, the intercept with the predicted log-odds as an offset; observed vs
predicted by fifths of the prediction with Wilson 95% CIs) and net benefit (Vickers 2006).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.survival import metrics
from pipelines.survival.artifact import SurvivalModel
from pipelines.survival.data import CohortError, read_table
from pipelines.survival.design import fit_design

if TYPE_CHECKING:
    from pipelines.survival.fit import FitOptions

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

N_LAMBDAS = 40
LAMBDA_MIN_RATIO = 1e-3
PENALTIES = ("l1", "elasticnet")


@dataclass(frozen=True)
class BinaryCohort:
    """A 0/1 outcome ``y[i]`` and the feature row ``frame.iloc[i]``."""

    y: B
    frame: pd.DataFrame
    source: str = ""
    sha256: str = ""
    outcome_column: str = ""

    @property
    def n(self) -> int:
        return int(self.y.shape[0])

    @property
    def events(self) -> int:
        return int(self.y.sum())


def binary_from_frame(frame: pd.DataFrame, outcome: str, source: str = "", sha256: str = "") -> BinaryCohort:
    """Rows with a missing outcome, or one that is not 0/1, are refused (not dropped)."""
    if outcome not in frame.columns:
        close = [c for c in frame.columns if c.replace(" ", "").lower() == outcome.replace(" ", "").lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CohortError(f"outcome column {outcome!r} not in {source or 'the table'}{hint}")
    raw = pd.to_numeric(frame[outcome], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(raw, (0.0, 1.0))
    if bad.any():
        examples = ", ".join(repr(v) for v in frame[outcome][bad].head(3).tolist())
        raise CohortError(f"outcome column {outcome!r}: {int(bad.sum())} rows are not 0 or 1 (e.g. {examples}); "
                          "a binary outcome is 1 (present) or 0 (absent), with no missing values")
    return BinaryCohort(raw.astype(bool), frame.reset_index(drop=True), source, sha256, outcome)


def load_binary_cohort(path: Path, outcome: str) -> BinaryCohort:
    frame, digest = read_table(path)
    return binary_from_frame(frame, outcome, source=str(path), sha256=digest)


# Penalised logistic regression ----------------------------------------------------------------------
def lambda_max(x: F64, y: B, l1_ratio: float) -> float:
    """The smallest lambda at which every coefficient is zero."""
    g = np.abs(x.T @ (y.astype(float) - float(y.mean()))) / len(y)
    return float(g.max() / max(l1_ratio, 1e-3)) if g.size else 1.0


def logistic_path(x: F64, y: B, lambdas: npt.ArrayLike, l1_ratio: float, tol: float = 1e-7,
                  max_iter: int = 10_000) -> list[tuple[float, F64]]:
    """(intercept, coefficients) at each lambda (descending), warm-started along the path.

    As glmnet does, the path stops once the fit explains 99.9% of the null deviance (the data are
    nearly separated); the remaining, smaller lambdas get that last solution.
    """
    n, p = x.shape
    yf = y.astype(np.float64)
    step = 1.0 / (float(np.linalg.norm(x, 2)) ** 2 / (4 * n) + 0.25) if p else 4.0
    ybar = min(max(float(yf.mean()), 1e-6), 1 - 1e-6)
    w, b = np.zeros(p), math.log(ybar / (1 - ybar))
    null_dev = _deviance(y, np.full(n, b))
    out: list[tuple[float, F64]] = []
    lams = np.asarray(lambdas, dtype=np.float64)
    for lam in lams:
        if out and _deviance(y, x @ w + b) < 1e-3 * null_dev:
            out.append((float(b), w.copy()))
            continue
        zw, zb, t = w.copy(), b, 1.0
        shrink, scale = step * lam * l1_ratio, 1.0 + step * lam * (1.0 - l1_ratio)
        for _ in range(max_iter):
            g = 1.0 / (1.0 + np.exp(-(x @ zw + zb))) - yf
            vw = zw - step * (x.T @ g) / n
            wn = np.sign(vw) * np.maximum(np.abs(vw) - shrink, 0.0) / scale
            bn = zb - step * float(g.mean())
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            if float((zw - wn) @ (wn - w)) + (zb - bn) * (bn - b) > 0:  # adaptive restart
                t_next, zw, zb = 1.0, wn.copy(), bn
            else:
                zw, zb = wn + (t - 1) / t_next * (wn - w), bn + (t - 1) / t_next * (bn - b)
            delta = max(float(np.max(np.abs(wn - w))) if p else 0.0, abs(bn - b))
            w, b, t = wn, bn, t_next
            if delta < tol:
                break
        out.append((float(b), w.copy()))
    return out


def auc(y: npt.ArrayLike, s: npt.ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney; ties count half).  ValueError with a single class."""
    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both outcomes")
    r = metrics.midrank(np.asarray(s, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _deviance(y: B, eta: F64) -> float:
    return float(np.mean(np.logaddexp(0.0, eta) - y * eta))


def stratified_folds(y: B, folds: int, seed: int) -> npt.NDArray[np.intp]:
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.intp)
    for stratum in (y, ~y):
        idx = np.flatnonzero(stratum)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    return fold


def penalised_cv(x: F64, y: B, folds: int, seed: int, l1_ratios: tuple[float, ...], one_se: bool) -> dict[str, Any]:
    """Choose (lambda, l1_ratio) by k-fold CV of the deviance; the curves and the choice."""
    if min(int(y.sum()), int((~y).sum())) < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} patients with each outcome")
    fold = stratified_folds(y, folds, seed)
    curves: list[dict[str, Any]] = []
    for r in l1_ratios:
        lams = lambda_max(x, y, r) * np.logspace(0, math.log10(LAMBDA_MIN_RATIO), N_LAMBDAS)
        dev = np.zeros((folds, len(lams)))
        oof = np.zeros((len(y), len(lams)))
        for k in range(folds):
            tr, te = fold != k, fold == k
            for j, (b0, w) in enumerate(logistic_path(x[tr], y[tr], lams, r)):
                eta = x[te] @ w + b0
                dev[k, j] = _deviance(y[te], eta)
                oof[te, j] = eta
        curves.append({"l1_ratio": r, "lambdas": [float(v) for v in lams],
                       "cv_deviance_mean": [float(v) for v in dev.mean(axis=0)],
                       "cv_deviance_se": [float(v) for v in dev.std(axis=0, ddof=1) / math.sqrt(folds)],
                       "_oof": oof})
    best_c, best_j = min(((c, j) for c in range(len(curves)) for j in range(N_LAMBDAS)),
                         key=lambda cj: curves[cj[0]]["cv_deviance_mean"][cj[1]])
    chosen = best_j
    if one_se:
        cur = curves[best_c]
        limit = cur["cv_deviance_mean"][best_j] + cur["cv_deviance_se"][best_j]
        chosen = min(j for j in range(N_LAMBDAS) if cur["cv_deviance_mean"][j] <= limit)  # largest lambda
    cur = curves[best_c]
    oof = cur["_oof"][:, chosen]
    for c in curves:
        c.pop("_oof")
    try:
        cv_auc = auc(y, oof)
    except ValueError:
        cv_auc = float("nan")
    return {"lambda": cur["lambdas"][chosen], "l1_ratio": cur["l1_ratio"],
            "cv_deviance": cur["cv_deviance_mean"][chosen], "cv_deviance_se": cur["cv_deviance_se"][chosen],
            "cv_auc_pooled": cv_auc, "folds": folds, "seed": seed, "rule": "one-se" if one_se else "min deviance",
            "path": curves}


# Fit --------------------------------------------------------------------------------------------------
def fit_binary(cohort: BinaryCohort, opts: FitOptions, software_version: str = "") -> SurvivalModel:
    """Fit ``--kind binary`` on the whole cohort; the artifact (not yet saved)."""
    from pipelines.survival.fit import FitError, _add_per_unit, _risk_groups, resolve_features

    y = cohort.y
    if cohort.events < 2 or cohort.n - cohort.events < 2:
        raise FitError(f"outcome {cohort.outcome_column!r}: {cohort.events} of {cohort.n} are 1: "
                       "both outcomes are needed, at least 2 of each")
    if opts.penalty not in PENALTIES:
        raise FitError(f"penalty {opts.penalty!r}: expected one of {', '.join(PENALTIES)}")
    ratios = (1.0,) if opts.penalty == "l1" else tuple(opts.l1_ratios)
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise FitError(f"--l1-ratios {ratios}: each must be in (0, 1]")
    features, selection = resolve_features(cohort.frame, opts, reserved=(cohort.outcome_column,))
    design = fit_design(cohort.frame, features, opts.categorical, opts.groups, opts.pca_variance,
                        opts.impute_at_prediction)
    x, _ = design.transform(cohort.frame, impute=True)
    cols = list(design.columns)
    try:
        cv = penalised_cv(x, y, opts.cv_folds, opts.seed, ratios, opts.one_se)
    except ValueError as e:
        raise FitError(f"binary: {e}") from None
    (b0, w), = logistic_path(x, y, [cv["lambda"]], cv["l1_ratio"])
    selected = [c for c, b in zip(cols, w, strict=True) if b != 0]
    if not selected:
        log.warning("binary: cross-validation chose lambda %.4g, which keeps no feature", cv["lambda"])
    ors: list[dict[str, Any]] = [{"term": c, "ratio": math.exp(b), "lower": None, "upper": None, "p": None,
                                  "measure": "odds ratio", "note": "penalised: no valid CI"}
                                 for c, b in zip(cols, w, strict=True)]
    _add_per_unit(ors, design)
    scores = x @ w + b0
    training: dict[str, Any] = {"source": cohort.source, "sha256": cohort.sha256, "n": cohort.n,
                                "events": cohort.events, "outcome_column": cohort.outcome_column}
    if selection is not None:
        training["feature_selection"] = selection
    try:
        apparent: dict[str, Any] = {"n": cohort.n, "events": cohort.events, "auc": auc(y, scores),
                                    "auc_ci": metrics.bootstrap_ci(lambda i: auc(y[i], scores[i]), cohort.n,
                                                                   opts.n_boot, opts.seed)}
    except ValueError:
        apparent = {"n": cohort.n, "events": cohort.events, "auc": None, "auc_ci": None}
    details = {"library": "prognode FISTA (glmnet objective; checked against sklearn saga)",
               "penalty": opts.penalty, "objective": "mean logloss + lambda*(l1_ratio*|w|_1 + (1-l1_ratio)/2*|w|^2)",
               "sklearn_C": 1.0 / (cohort.n * cv["lambda"]), "selected": selected, **cv}
    return SurvivalModel(
        name=opts.name, version=opts.version, kind="binary", design=design,
        coefficients=tuple(float(b) for b in w), risk_groups=_risk_groups(opts.risk_groups, scores),
        horizon_days=None, intercept=float(b0), training=training,
        metrics={"training (apparent)": apparent,
                 "cross-validation": {"auc": cv["cv_auc_pooled"], "deviance": cv["cv_deviance"], "n": cohort.n,
                                      "events": cohort.events, "folds": opts.cv_folds}},
        hazard_ratios=tuple(ors), fit_details=details,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(), software_version=software_version)


# Evaluate ---------------------------------------------------------------------------------------------
def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def calibration_in_the_large(y: B, eta: F64) -> tuple[float, float]:
    """Intercept (and its SE) of a logistic model with ``eta`` as offset: 0 is ideal."""
    a = 0.0
    yf = y.astype(np.float64)
    info = 1.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-(eta + a)))
        info = float(np.sum(p * (1 - p)))
        if info <= 0:
            return (math.nan, math.nan)
        step = float(np.sum(yf - p)) / info
        a += step
        if abs(step) < 1e-10:
            break
    return a, 1 / math.sqrt(info)


def calibration_groups(y: B, prob: F64, n_groups: int = 5) -> list[dict[str, Any]]:
    """Mean predicted against observed proportion by quantile group of the prediction (Wilson 95% CIs);
    at most one group per 10 patients, at least 2."""
    n_groups = max(2, min(n_groups, len(prob) // 10 or 2))
    edges = np.quantile(prob, np.linspace(0, 1, n_groups + 1))
    which = np.clip(np.searchsorted(edges[1:-1], prob, side="right"), 0, n_groups - 1)
    rows = []
    for g in range(n_groups):
        m = which == g
        if not m.any():
            continue
        k, n = int(y[m].sum()), int(m.sum())
        lo, hi = _wilson(k, n)
        rows.append({"group": g + 1, "n": n, "events": k, "predicted": float(prob[m].mean()),
                     "observed": k / n, "observed_lower": lo, "observed_upper": hi})
    return rows


def binary_calibration(y: B, prob: F64, n_groups: int = 5) -> dict[str, Any]:
    eta = np.log(np.clip(prob, 1e-12, 1 - 1e-12) / np.clip(1 - prob, 1e-12, 1))
    rows = calibration_groups(y, prob, n_groups)
    slope: float | None = None
    slope_ci: list[float | None] | None = None
    if 0 < y.sum() < len(y) and np.ptp(eta) > 0:
        _, b, se = metrics.logistic_fit(eta[:, None], y)
        slope = metrics._clean(b[0])
        slope_ci = [metrics._clean(b[0] - 1.96 * se[0]), metrics._clean(b[0] + 1.96 * se[0])]
    a, se_a = calibration_in_the_large(y, eta)
    return {"slope": slope, "slope_ci": slope_ci, "intercept": metrics._clean(a),
            "intercept_ci": [metrics._clean(a - 1.96 * se_a), metrics._clean(a + 1.96 * se_a)],
            # the same slope under the survival JSON's key names, so one reader handles both
            "calibration_slope": slope, "calibration_slope_ci": slope_ci,
            "observed_expected": metrics._clean(float(y.sum()) / float(prob.sum())) if prob.sum() > 0 else None,
            "groups": rows,
            "method": "slope: logistic regression of the outcome on the predicted log-odds (1 is ideal); "
                      "intercept: calibration-in-the-large, the predicted log-odds as offset (0 is ideal)"}


def binary_net_benefit(y: B, prob: F64) -> dict[str, Any]:
    ts = [round(float(v), 2) for v in np.arange(0.01, 0.96, 0.01)]
    n = len(y)
    prev = float(y.mean())
    model, treat_all = [], []
    for pt in ts:
        w = pt / (1 - pt)
        pos = prob >= pt
        model.append(float((y & pos).sum() / n - (~y & pos).sum() / n * w))
        treat_all.append(prev - (1 - prev) * w)
    return {"thresholds": ts, "model": model, "treat_all": treat_all, "treat_none": [0.0] * len(ts)}


def evaluate_binary(model: SurvivalModel, cohort: BinaryCohort, n_boot: int = 200, seed: int = 0) -> dict[str, Any]:
    from pipelines.survival.scoring import score_frame

    scored = score_frame(model, cohort.frame)
    ok = scored.evaluable
    reasons = Counter(r for rs in scored.reasons for r in rs)
    y, s = cohort.y[ok], scored.scores[ok]
    out: dict[str, Any] = {
        "model": {"name": model.name, "version": model.version, "kind": model.kind},
        "data": cohort.source, "outcome_column": cohort.outcome_column,
        "n": int(ok.sum()), "events": int(y.sum()),
        "n_not_evaluable": int((~ok).sum()), "not_evaluable_reasons": dict(reasons.most_common(20)),
        "seed": seed, "n_boot": n_boot,
    }
    if ok.sum() < 5 or y.sum() == 0 or y.sum() == len(y):
        out["error"] = "too few evaluable patients, or a single outcome"
        out["auc"], out["auc_ci"] = None, None
        return out
    prob = 1 / (1 + np.exp(-s))
    out["auc"] = auc(y, s)
    out["auc_ci"] = metrics.bootstrap_ci(lambda i: auc(y[i], s[i]), len(s), n_boot, seed)
    out["prevalence"] = float(y.mean())
    out["brier"] = float(np.mean((prob - y) ** 2))
    out["calibration"] = binary_calibration(y, prob)
    out["net_benefit"] = binary_net_benefit(y, prob)
    groups = [g or "" for g, keep in zip(scored.groups, ok, strict=True) if keep]
    out["risk_groups"] = [{"group": lab, "n": int(sum(g == lab for g in groups)),
                           "events": int(sum(bool(v) for g, v in zip(groups, y, strict=True) if g == lab))}
                          for lab in model.risk_groups.labels]
    out["risk_group_cutoffs"] = list(model.risk_groups.cutoffs)
    out["model_odds_ratios"] = [dict(h) for h in model.hazard_ratios]
    return out


def format_binary_table(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [f"model      {m['name']} {m['version']} ({m['kind']})",
             f"data       {result['data']} (outcome {result.get('outcome_column')!r})",
             f"patients   {result['n']} evaluable, {result['events']} with the outcome, "
             f"{result['n_not_evaluable']} not evaluable"]
    for reason, count in result.get("not_evaluable_reasons", {}).items():
        lines.append(f"           - {count} x {reason}")
    if result.get("auc") is None:
        lines.append(f"error      {result.get('error')}")
        return "\n".join(lines)
    ci = result.get("auc_ci")
    lines.append(f"AUC        {result['auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
    lines.append(f"Brier      {result['brier']:.3f} (prevalence {result['prevalence']:.3f})")
    cal = result["calibration"]

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines.append(f"calibration slope={f(cal['slope'])}, intercept={f(cal['intercept'])}, "
                 f"O/E={f(cal['observed_expected'])}")
    for g in cal["groups"]:
        lines.append(f"  group {g['group']}: n={g['n']:<4} predicted {g['predicted']:.2f}  observed "
                     f"{g['observed']:.2f} ({g['observed_lower']:.2f}-{g['observed_upper']:.2f})")
    for g in result.get("risk_groups", []):
        lines.append(f"  risk group {g['group']:<12} n={g['n']:<4} with outcome {g['events']}")
    nb = result["net_benefit"]
    lines.append("net benefit  threshold: model / treat all / treat none")
    for p in (0.1, 0.2, 0.3, 0.4, 0.5):
        if p in nb["thresholds"]:
            i = nb["thresholds"].index(p)
            lines.append(f"  {p:.2f}: {nb['model'][i]:+.3f} / {nb['treat_all'][i]:+.3f} / 0")
    return "\n".join(lines)
