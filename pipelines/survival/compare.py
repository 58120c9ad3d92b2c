"""``prognode model compare``: several fitted models on the same test patients, side by side.

Every model scores the same rows; only patients evaluable under *every* model are compared (the others
are counted with each model's reasons), so each difference is paired.

Two endpoints:

- **survival** (all of today's kinds: ``cox``, ``lasso-cox``, ``logistic`` at a horizon): Harrell's C of
  each score with a seeded percentile-bootstrap 95% CI, and every pairwise difference with its CI from
  the *same* bootstrap resamples; the cumulative/dynamic time-dependent AUC at the horizon
  (``sksurv``) likewise.  At the horizon the models are also compared as classifiers of "event by the
  horizon" among the patients whose status there is known (complete case: censored before the horizon
  excluded, as ``logistic`` is fitted): AUC with the DeLong variance, DeLong's paired test, a
  bootstrap CI of each difference, and the net reclassification improvement (NRI).
- **binary**: when a model's ``kind`` (in its ``model.json``) is one of :data:`BINARY_KINDS`, the
  endpoint is its 0/1 outcome column (``training.outcome_column``, or ``--outcome``): AUC, DeLong, NRI,
  calibration and net benefit on that outcome.  This is the hook for binary models; nothing else in
  this module depends on how they are fitted.

DeLong's test uses the fast algorithm of Sun & Xu (IEEE Signal Process. Lett. 2014), midranks in
O(n log n); ``tests/test_survival_compare.py`` checks it against a hand-computed example, a brute-force
placement-value implementation and the bootstrap.

NRI (Pencina et al. 2008/2011) compares predicted probabilities of the same outcome (event by the
horizon, or the binary outcome), so it needs both models to give that probability: the continuous
(category-free) NRI always, the categorical NRI at ``--nri-cutoffs`` when given.  It is computed on
the known-status patients; a censoring-adjusted NRI is not implemented.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipelines.survival import metrics
from pipelines.survival.artifact import SurvivalModel, load_model
from pipelines.survival.binary import auc, binary_net_benefit, calibration_groups
from pipelines.survival.data import CohortError, read_table
from pipelines.survival.scoring import horizon_probability, score_frame

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

BINARY_KINDS = ("binary",)  # kinds whose score is the log-odds of a 0/1 outcome column (no time)
Z95 = 1.959963984540054


# DeLong -----------------------------------------------------------------------------------
def delong(y: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[F64, F64]:
    """AUCs of each row of ``scores`` (k x n, higher = more likely positive) and their DeLong covariance.

    Sun & Xu's fast algorithm: with midranks ``tz`` of all n values, ``tx`` of the m positives and ``ty``
    of the n0 negatives, AUC = (sum tz[pos] - m(m+1)/2) / (m n0); the placement values are
    V10 = (tz[pos] - tx) / n0 per positive and V01 = 1 - (tz[neg] - ty) / m per negative, and
    cov = cov(V10) / m + cov(V01) / n0.
    """
    yb = np.asarray(y).astype(bool)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    m, n0 = int(yb.sum()), int((~yb).sum())
    if m < 2 or n0 < 2:
        raise ValueError(f"DeLong needs at least 2 positives and 2 negatives (got {m} and {n0})")
    pos, neg = s[:, yb], s[:, ~yb]
    k = s.shape[0]
    tx = np.vstack([metrics.midrank(pos[r]) for r in range(k)])
    ty = np.vstack([metrics.midrank(neg[r]) for r in range(k)])
    tz = np.vstack([metrics.midrank(np.concatenate([pos[r], neg[r]])) for r in range(k)])
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n0)
    v10 = (tz[:, :m] - tx) / n0
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n0
    return np.asarray(aucs, dtype=np.float64), np.asarray(cov, dtype=np.float64)


def delong_paired(y: npt.ArrayLike, a: npt.ArrayLike, b: npt.ArrayLike) -> dict[str, Any]:
    """DeLong's test of AUC(a) - AUC(b) on the same patients: difference, SE, 95% CI, z and two-sided p."""
    aucs, cov = delong(y, np.vstack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(var) if var > 0 else 0.0
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    p = float(math.erfc(abs(z) / math.sqrt(2))) if math.isfinite(z) else 0.0
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": diff, "se": se,
            "ci": [diff - Z95 * se, diff + Z95 * se], "z": z if math.isfinite(z) else None, "p": p}


# NRI ----------------------------------------------------------------------------------------
def nri(y: npt.ArrayLike, p_new: npt.ArrayLike, p_old: npt.ArrayLike,
        cutoffs: Sequence[float] = ()) -> dict[str, Any]:
    """Net reclassification improvement of ``p_new`` over ``p_old`` for the 0/1 outcome ``y``.

    Continuous NRI counts any upward (downward) move; the categorical NRI counts moves between the
    risk categories cut at ``cutoffs`` (empty: not computed).  Both are the sum of the event and the
    non-event parts, each reported too.
    """
    yb = np.asarray(y).astype(bool)
    new, old = np.asarray(p_new, dtype=np.float64), np.asarray(p_old, dtype=np.float64)

    def parts(up: B, down: B) -> dict[str, float]:
        ev = float(up[yb].mean() - down[yb].mean())
        ne = float(down[~yb].mean() - up[~yb].mean())
        return {"nri": ev + ne, "events": ev, "non_events": ne}

    out: dict[str, Any] = {"continuous": parts(new > old, new < old)}
    if cutoffs:
        cuts = np.asarray(sorted(cutoffs), dtype=np.float64)
        cn, co = np.searchsorted(cuts, new, side="right"), np.searchsorted(cuts, old, side="right")
        out["categorical"] = {**parts(cn > co, cn < co), "cutoffs": [float(c) for c in cuts]}
    return out


# Binary calibration and net benefit ------------------------------------------------------------
def binary_calibration(y: B, p: F64, n_groups: int = 5) -> dict[str, Any]:
    """Mean predicted vs observed proportion by quantile group of the prediction (Wilson 95% CIs)."""
    exp_total = float(p.sum())
    return {"groups": calibration_groups(y, p, n_groups),
            "observed_expected": float(y.sum()) / exp_total if exp_total > 0 else None}


# ROC curves -----------------------------------------------------------------------------------
def roc_curve(y: B, s: F64) -> tuple[list[float], list[float]]:
    """Empirical ROC: false- and true-positive rates over all thresholds (from (0,0) to (1,1))."""
    thr = np.unique(s)[::-1]
    m, n0 = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr, tpr = [0.0], [0.0]
    for t in thr:
        pos = s >= t
        fpr.append(float((pos & ~y).sum() / n0))
        tpr.append(float((pos & y).sum() / m))
    return fpr, tpr


def td_roc_curve(time: F64, event: B, s: F64, t: float) -> tuple[list[float], list[float]]:
    """Cumulative/dynamic ROC at ``t``: cases die by ``t`` (IPCW-weighted by the censoring KM), controls
    survive past ``t``.  The curve behind ``sksurv``'s ``cumulative_dynamic_auc``."""
    cases = event & (time <= t)
    controls = time > t
    g = np.asarray([_censoring_survival(time, event, float(u)) for u in time[cases]])
    w = 1.0 / np.clip(g, 1e-12, None)
    sc, sn = s[cases], s[controls]
    fpr, tpr = [0.0], [0.0]
    wsum = float(w.sum()) or 1.0
    for thr in np.unique(s)[::-1]:
        fpr.append(float((sn >= thr).sum() / max(len(sn), 1)))
        tpr.append(float(w[sc >= thr].sum() / wsum))
    return fpr, tpr


def _censoring_survival(time: F64, event: B, u: float) -> float:
    """KM of the censoring distribution just before ``u``."""
    cens = np.unique(time[(~event) & (time < u)])
    s = 1.0
    for c in cens:
        s *= 1.0 - float(np.sum((time == c) & ~event)) / float(np.sum(time >= c))
    return s


# The comparison -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    path: str
    model: SurvivalModel
    label: str


def _labels(models: Sequence[SurvivalModel], paths: Sequence[Path]) -> list[str]:
    names = [m.name for m in models]
    counts = Counter(names)
    return [n if counts[n] == 1 else f"{n} ({p})" for n, p in zip(names, paths, strict=True)]


def _boot_indices(n: int, n_boot: int, seed: int) -> list[npt.NDArray[np.intp]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(n_boot)]


def _ci(values: Sequence[float], n_boot: int, level: float = 0.95) -> list[float] | None:
    v = [x for x in values if math.isfinite(x)]
    if len(v) < max(20, n_boot // 2):
        return None
    lo, hi = np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def _boot_matrix(stat: Any, k: int, idx: Sequence[npt.NDArray[np.intp]]) -> F64:
    """``stat(model_index, rows)`` over every resample (rows shared by all models); NaN where it fails."""
    out = np.full((len(idx), k), np.nan)
    for b, i in enumerate(idx):
        for j in range(k):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out[b, j] = stat(j, i)
            except (ValueError, ZeroDivisionError, FloatingPointError):
                pass
    return out


def _td_auc_at(time: F64, event: B, s: F64, t: float) -> float:
    from sksurv.metrics import cumulative_dynamic_auc

    y = metrics._surv(time, event)
    a, _ = cumulative_dynamic_auc(y, y, s, [t])
    return float(a[0])


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def compare(model_paths: Sequence[Path], data: Path, *, time_col: str | None = None, event_col: str | None = None,
            time_unit: str | None = None, outcome_col: str | None = None, horizon_days: float | None = None,
            n_boot: int = 200, seed: int = 0, nri_cutoffs: Sequence[float] = (),
            curves: bool = False) -> dict[str, Any]:
    """Compare the models in ``model_paths`` on the table ``data``; see the module docstring.

    With ``curves`` the result also holds the points of the ROC curves (key ``curves``) for the report.
    """
    if len(model_paths) < 2:
        raise CohortError("model compare needs at least two models (--models A B ...)")
    models = [load_model(Path(p)) for p in model_paths]
    labels = _labels(models, [Path(p) for p in model_paths])
    frame, digest = read_table(Path(data))
    binary = outcome_col is not None or any(m.kind in BINARY_KINDS for m in models)
    k = len(models)

    # Every model scores every row; compare the rows evaluable under all of them.
    scored = [score_frame(m, frame) for m in models]
    ok = np.logical_and.reduce([s.evaluable for s in scored])
    out: dict[str, Any] = {
        "data": str(data), "sha256": digest, "endpoint": "binary" if binary else "survival",
        "n_rows": len(frame), "n_not_evaluable": int((~ok).sum()), "seed": seed, "n_boot": n_boot,
        "models": [{"label": lab, "path": str(p), "name": m.name, "version": m.version, "kind": m.kind,
                    "horizon_days": m.horizon_days,
                    "not_evaluable_reasons": dict(Counter(r for rs in s.reasons for r in rs).most_common(10))}
                   for lab, p, m, s in zip(labels, model_paths, models, scored, strict=True)],
        "pairs": [{"a": labels[i], "b": labels[j], "difference": "a - b"} for i, j in _pairs(k)],
    }
    scores = [s.scores[ok] for s in scored]
    curve_out: dict[str, Any] = {}

    if binary:
        col = outcome_col or next(str(m.training.get("outcome_column", "")) for m in models if m.kind in BINARY_KINDS)
        if not col or col not in frame.columns:
            raise CohortError(f"outcome column {col!r} not in {data} (give --outcome COL)")
        raw = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
        known = ok & np.isin(raw, (0.0, 1.0))
        out["outcome_column"] = col
        out["n_missing_outcome"] = int((ok & ~known).sum())
        y = raw[known].astype(bool)
        s_known = [s.scores[known] for s in scored]
        probs = [_binary_probability(m, s) for m, s in zip(models, s_known, strict=True)]
        out["n"], out["events"] = int(known.sum()), int(y.sum())
        _classifier_block(out, y, s_known, probs, n_boot, seed, nri_cutoffs, "auc", curve_out)
        for j, p in enumerate(probs):
            if p is not None:
                out["models"][j]["calibration"] = binary_calibration(y, p)
                out["models"][j]["net_benefit"] = binary_net_benefit(y, p)
        if curves:
            out["curves"] = curve_out
        return out

    # Survival endpoint.
    time_col = time_col or models[0].training.get("time_column")
    event_col = event_col or models[0].training.get("event_column")
    unit = time_unit or models[0].training.get("time_unit") or "days"
    if not time_col or not event_col:
        raise CohortError("the first model does not record its time/event columns: give --time and --event")
    for m, lab in zip(models[1:], labels[1:], strict=True):
        if m.training.get("time_column") not in (None, "", time_col) or \
                m.training.get("event_column") not in (None, "", event_col):
            log.warning("model %s was trained on %s/%s; comparing on %s/%s", lab, m.training.get("time_column"),
                        m.training.get("event_column"), time_col, event_col)
    from pipelines.survival.data import cohort_from_frame

    cohort = cohort_from_frame(frame, time_col, event_col, unit, source=str(data))
    time, event = cohort.time_days[ok], cohort.event[ok]
    out.update({"time_column": time_col, "event_column": event_col, "time_unit": unit,
                "n": int(ok.sum()), "events": int(event.sum())})
    if ok.sum() < 5 or event.sum() < 2:
        out["error"] = "too few evaluable patients or events"
        return out
    h = horizon_days if horizon_days is not None else next((m.horizon_days for m in models if m.horizon_days), None)
    out["horizon_days"] = h
    idx = _boot_indices(len(time), n_boot, seed)

    c = [metrics.harrell_c(time, event, s) for s in scores]
    cb = _boot_matrix(lambda j, i: metrics.harrell_c(time[i], event[i], scores[j][i]), k, idx)
    for j in range(k):
        out["models"][j]["c_index"] = c[j]
        out["models"][j]["c_index_ci"] = _ci(list(cb[:, j]), n_boot)
    for pair, (i, j) in zip(out["pairs"], _pairs(k), strict=True):
        d = cb[:, i] - cb[:, j]
        pair["c_index_difference"] = c[i] - c[j]
        pair["c_index_difference_ci"] = _ci(list(d), n_boot)
        pair["c_index_difference_p"] = _boot_p(d)
    if h is None:
        out["horizon_note"] = "no model has a horizon: time-dependent AUC, calibration and NRI not computed"
        return out

    usable = bool(event[time <= h].any()) and bool((time > h).any())
    if usable:
        ta = [_safe(lambda s=s: _td_auc_at(time, event, s, h)) for s in scores]
        tb = _boot_matrix(lambda j, i: _td_auc_at(time[i], event[i], scores[j][i], h), k, idx)
        for j in range(k):
            out["models"][j]["td_auc"] = ta[j]
            out["models"][j]["td_auc_ci"] = _ci(list(tb[:, j]), n_boot)
        for pair, (i, j) in zip(out["pairs"], _pairs(k), strict=True):
            ti, tj = ta[i], ta[j]
            if ti is not None and tj is not None:
                pair["td_auc_difference"] = ti - tj
                pair["td_auc_difference_ci"] = _ci(list(tb[:, i] - tb[:, j]), n_boot)
        if curves:
            curve_out["td_roc"] = [td_roc_curve(time, event, s, h) for s in scores]
    else:
        out["td_auc_note"] = f"no events by, or nobody followed past, {h:g} days"

    # Classifiers of "event by the horizon" on the known-status patients.
    known = event & (time <= h) | (time > h)
    y = event[known] & (time[known] <= h)
    out["horizon_outcome"] = {"horizon_days": h, "n_known": int(known.sum()), "events": int(y.sum()),
                              "excluded_censored_before_horizon": int((~known).sum()),
                              "method": "complete case (censored before the horizon excluded)"}
    all_probs = [horizon_probability(m, s, h) for m, s in zip(models, scores, strict=True)]
    probs = [None if p is None else p[known] for p in all_probs]
    _classifier_block(out, y, [s[known] for s in scores], probs, n_boot, seed, nri_cutoffs, "horizon_auc",
                      curve_out)
    for j, (m, p) in enumerate(zip(models, all_probs, strict=True)):
        if p is None:
            out["models"][j]["calibration_note"] = f"{m.kind} model gives no probability at {h:g} days"
            continue
        out["models"][j]["calibration"] = metrics.calibration(time, event, p, scores[j], h,
                                                              logistic=m.kind == "logistic")
        out["models"][j]["net_benefit"] = metrics.net_benefit(time, event, p, h)
    if curves:
        out["curves"] = curve_out
    return out


def _safe(f: Any) -> float | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v = float(f())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _boot_p(d: F64) -> float | None:
    """Two-sided bootstrap p of a paired difference: twice the smaller share of resamples on one side of 0."""
    v = d[np.isfinite(d)]
    if len(v) == 0:
        return None
    return float(min(1.0, max(2 * min(np.mean(v <= 0), np.mean(v >= 0)), 1.0 / len(v))))  # floor: 1/resamples


def _binary_probability(model: SurvivalModel, s: F64) -> F64 | None:
    if model.kind in BINARY_KINDS:
        return np.asarray(1.0 / (1.0 + np.exp(-s)), dtype=np.float64)
    return None


def _classifier_block(out: dict[str, Any], y: B, scores: Sequence[F64], probs: Sequence[F64 | None], n_boot: int,
                      seed: int, nri_cutoffs: Sequence[float], key: str, curve_out: dict[str, Any]) -> None:
    """AUC (DeLong SE and CI, bootstrap CI) per model; DeLong test, bootstrap CI and NRI per pair."""
    k = len(scores)
    if y.sum() < 2 or (~y).sum() < 2:
        out[f"{key}_note"] = f"too few events or non-events ({int(y.sum())}/{int((~y).sum())}) for AUC"
        return
    aucs, cov = delong(y, np.vstack(scores))
    idx = _boot_indices(len(y), n_boot, seed)
    ab = _boot_matrix(lambda j, i: auc(y[i], scores[j][i]), k, idx)
    for j in range(k):
        se = math.sqrt(max(float(cov[j, j]), 0.0))
        out["models"][j][key] = float(aucs[j])
        out["models"][j][f"{key}_ci"] = _ci(list(ab[:, j]), n_boot)
        out["models"][j][f"{key}_delong_se"] = se
        out["models"][j][f"{key}_delong_ci"] = [float(aucs[j]) - Z95 * se, float(aucs[j]) + Z95 * se]
    for pair, (i, j) in zip(out["pairs"], _pairs(k), strict=True):
        dl = delong_paired(y, scores[i], scores[j])
        pair[f"{key}_difference"] = dl["difference"]
        pair[f"{key}_delong"] = {"se": dl["se"], "ci": dl["ci"], "z": dl["z"], "p": dl["p"]}
        pair[f"{key}_difference_bootstrap_ci"] = _ci(list(ab[:, i] - ab[:, j]), n_boot)
        pi, pj = probs[i], probs[j]
        if pi is None or pj is None:
            pair["nri_note"] = "NRI needs both models' probabilities of the same outcome"
            continue
        pair["nri"] = nri(y, pi, pj, nri_cutoffs)
        boot = []
        for ii in idx:
            if y[ii].all() or not y[ii].any():
                continue
            boot.append(nri(y[ii], pi[ii], pj[ii])["continuous"]["nri"])
        pair["nri"]["continuous"]["ci"] = _ci(boot, n_boot)
    curve_out["roc"] = [roc_curve(y, s) for s in scores]


def format_compare(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`compare`'s result."""

    def v(x: Any, ci: Any = None) -> str:
        if x is None:
            return "n/a"
        return f"{x:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    lines = [f"data       {result['data']}",
             f"patients   {result.get('n')} compared, {result.get('events')} events, "
             f"{result['n_not_evaluable']} not evaluable under every model",
             f"bootstrap  {result['n_boot']} paired resamples, seed {result['seed']}"]
    if result.get("error"):
        return "\n".join([*lines, f"error      {result['error']}"])
    surv = result["endpoint"] == "survival"
    key = "horizon_auc" if surv else "auc"
    if surv and result.get("horizon_outcome"):
        ho = result["horizon_outcome"]
        lines.append(f"horizon    {ho['horizon_days']:g} d: {ho['n_known']} with known status ({ho['events']} events), "
                     f"{ho['excluded_censored_before_horizon']} censored before it excluded from AUC/NRI")
    head = f"{'model':<28} {'kind':<10}"
    if surv:
        head += f" {'Harrell C (95% CI)':<24} {'td-AUC at horizon':<24}"
    head += f" {'AUC (DeLong 95% CI)':<24}"
    lines += ["", head]
    for m in result["models"]:
        row = f"{m['label'][:28]:<28} {m['kind']:<10}"
        if surv:
            row += f" {v(m.get('c_index'), m.get('c_index_ci')):<24} {v(m.get('td_auc'), m.get('td_auc_ci')):<24}"
        row += f" {v(m.get(key), m.get(f'{key}_delong_ci')):<24}"
        lines.append(row)
    lines += ["", "paired differences (a - b)"]
    for p in result["pairs"]:
        lines.append(f"  {p['a']} - {p['b']}")
        if surv:
            lines.append(f"    Harrell C   {v(p.get('c_index_difference'), p.get('c_index_difference_ci'))}"
                         + (f"  bootstrap p={p['c_index_difference_p']:.3g}"
                            if p.get("c_index_difference_p") is not None else ""))
            if p.get("td_auc_difference") is not None:
                lines.append(f"    td-AUC      {v(p['td_auc_difference'], p.get('td_auc_difference_ci'))}")
        if p.get(f"{key}_delong"):
            d = p[f"{key}_delong"]
            lines.append(f"    AUC         {v(p[f'{key}_difference'], d['ci'])}  DeLong p={d['p']:.3g}")
        if p.get("nri"):
            cn = p["nri"]["continuous"]
            lines.append(f"    NRI (cont.) {v(cn['nri'], cn.get('ci'))}  events {cn['events']:+.3f}, "
                         f"non-events {cn['non_events']:+.3f}")
            if p["nri"].get("categorical"):
                ca = p["nri"]["categorical"]
                lines.append(f"    NRI (cat. at {', '.join(f'{c:g}' for c in ca['cutoffs'])}) {ca['nri']:+.3f}")
    return "\n".join(lines)


# HTML report ----------------------------------------------------------------------------------
def render_compare(result: dict[str, Any]) -> str:
    """A self-contained HTML page: the table and the overlaid ROC, calibration and decision curves."""
    import html

    from pipelines.survival.artifact import INTENDED_USE
    from pipelines.survival.report import _img, _png

    labels = [m["label"] for m in result["models"]]
    curves = result.get("curves", {})
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>prognode model comparison: {html.escape(', '.join(labels))}</title>",
             "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}figure{margin:1em 0}"
             "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}"
             ".warn{background:#fff3cd;padding:.5em 1em}</style></head><body>",
             f"<h1>Model comparison ({html.escape(result['endpoint'])} endpoint)</h1>",
             f"<p class='warn'>{html.escape(INTENDED_USE)}</p>",
             f"<h2>Summary</h2><pre>{html.escape(format_compare(result))}</pre>"]
    h = result.get("horizon_days")
    if curves.get("td_roc"):
        parts.append("<h2>Time-dependent ROC at the horizon</h2>" + _img(_png(_roc_draw(
            curves["td_roc"], [f"{lab} (AUC {m.get('td_auc') or float('nan'):.3f})"
                               for lab, m in zip(labels, result["models"], strict=True)],
            f"Cumulative/dynamic ROC at {h:g} days"), (5.5, 5.0)), "time-dependent ROC"))
    if curves.get("roc"):
        key = "horizon_auc" if result["endpoint"] == "survival" else "auc"
        title = f"ROC of event by {h:g} days (known status)" if key == "horizon_auc" else \
            f"ROC of {result.get('outcome_column')}"
        parts.append("<h2>ROC</h2>" + _img(_png(_roc_draw(
            curves["roc"], [f"{lab} (AUC {m.get(key) or float('nan'):.3f})"
                            for lab, m in zip(labels, result["models"], strict=True)], title), (5.5, 5.0)), "ROC"))
    cal = [(lab, m["calibration"]) for lab, m in zip(labels, result["models"], strict=True) if m.get("calibration")]
    if cal:
        parts.append("<h2>Calibration</h2>" + _img(_png(_cal_draw(cal)), "calibration"))
    nb = [(lab, m["net_benefit"]) for lab, m in zip(labels, result["models"], strict=True) if m.get("net_benefit")]
    if nb:
        parts.append("<h2>Decision curves</h2>" + _img(_png(_dca_draw(nb)), "decision curve"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _roc_draw(curves: Sequence[tuple[list[float], list[float]]], names: Sequence[str], title: str) -> Any:
    def draw(ax: Any) -> None:
        for (fpr, tpr), name in zip(curves, names, strict=True):
            ax.step(fpr, tpr, where="post", label=name)
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(title)
        ax.legend(loc="lower right")
    return draw


def _cal_draw(items: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    def draw(ax: Any) -> None:
        top = 0.1
        for lab, c in items:
            xs = [g["predicted"] for g in c["groups"]]
            ys = [g["observed"] for g in c["groups"]]
            ax.plot(xs, ys, "o-", label=lab)
            top = max([top, *xs, *ys])
        ax.plot([0, top * 1.1], [0, top * 1.1], ls="--", c="grey", label="ideal")
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed")
        ax.set_title("Calibration by fifths of the prediction")
        ax.legend()
    return draw


def _dca_draw(items: Sequence[tuple[str, dict[str, Any]]]) -> Any:
    def draw(ax: Any) -> None:
        hi = 0.05
        for lab, nb in items:
            ax.plot(nb["thresholds"], nb["model"], label=lab)
            hi = max(hi, *nb["model"])
        first = items[0][1]
        ax.plot(first["thresholds"], first["treat_all"], c="grey", ls="--", label="treat all")
        ax.plot(first["thresholds"], first["treat_none"], c="k", ls=":", label="treat none")
        hi = max(hi, *first["treat_all"])
        ax.set_ylim(-0.05, hi * 1.1)
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.set_title("Decision curves")
        ax.legend()
    return draw
