"""Evaluate a fitted model on a cohort: every metric of :mod:`pipelines.survival.metrics` in one object.

Patients whose inputs are missing are *not* imputed (unless the model imputes); they are counted in
``n_not_evaluable`` with their reasons and left out of every metric.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from pipelines.survival import metrics
from pipelines.survival.artifact import SurvivalModel
from pipelines.survival.data import Cohort
from pipelines.survival.scoring import score_frame


def evaluate(model: SurvivalModel, cohort: Cohort, n_boot: int = 200, seed: int = 0,
             calibration_groups: int = 5) -> dict[str, Any]:
    scored = score_frame(model, cohort.frame)
    ok = scored.evaluable
    reasons = Counter(r for rs in scored.reasons for r in rs)
    time, event, s = cohort.time_days[ok], cohort.event[ok], scored.scores[ok]
    horizon = model.horizon_days
    out: dict[str, Any] = {
        "model": {"name": model.name, "version": model.version, "kind": model.kind},
        "data": cohort.source, "n": int(ok.sum()), "events": int(event.sum()),
        "n_not_evaluable": int((~ok).sum()), "not_evaluable_reasons": dict(reasons.most_common(20)),
        "horizon_days": horizon, "seed": seed, "n_boot": n_boot,
    }
    if ok.sum() < 5 or event.sum() < 1:
        out["error"] = "too few evaluable patients or no events"
        out["c_index"], out["c_index_ci"] = None, None
        return out
    out["c_index"] = metrics.harrell_c(time, event, s)
    out["c_index_ci"] = metrics.bootstrap_ci(lambda i: metrics.harrell_c(time[i], event[i], s[i]), len(s), n_boot, seed)
    try:
        out["uno_c_index"] = metrics.uno_c(time, event, s, horizon)
        out["uno_c_index_ci"] = metrics.bootstrap_ci(lambda i: metrics.uno_c(time[i], event[i], s[i], horizon),
                                                     len(s), n_boot, seed)
        out["uno_tau_days"] = horizon if horizon is not None and horizon < float(np.max(time)) else None
    except ValueError as e:
        out["uno_c_index"], out["uno_c_index_ci"], out["uno_error"] = None, None, str(e)
    out["td_auc"] = metrics.td_auc(time, event, s, metrics.default_auc_times(time, horizon))
    groups = [g or "" for g, keep in zip(scored.groups, ok, strict=True) if keep]
    labels = list(model.risk_groups.labels)
    out["hazard_ratios"] = metrics.hazard_ratios(time, event, s, groups, labels)
    out["model_hazard_ratios"] = [dict(h) for h in model.hazard_ratios]
    out["kaplan_meier"] = metrics.km_by_group(time, event, groups, labels, horizon)
    out["risk_group_cutoffs"] = list(model.risk_groups.cutoffs)
    if scored.probabilities is not None and horizon is not None:
        p = scored.probabilities[ok]
        out["calibration"] = metrics.calibration(time, event, p, s, horizon, calibration_groups,
                                                logistic=model.kind == "logistic")
        out["net_benefit"] = metrics.net_benefit(time, event, p, horizon)
    else:
        out["calibration"], out["net_benefit"] = None, None
    return out


def format_table(result: dict[str, Any]) -> str:
    """A readable plain-text summary of :func:`evaluate`'s result."""

    def ci(key: str) -> str:
        v, c = result.get(key), result.get(f"{key}_ci")
        if v is None:
            return "n/a"
        return f"{v:.3f} (95% CI {c[0]:.3f}-{c[1]:.3f})" if c else f"{v:.3f}"

    m = result["model"]
    lines = [f"model      {m['name']} {m['version']} ({m['kind']})",
             f"data       {result['data']}",
             f"patients   {result['n']} evaluable, {result['events']} events, "
             f"{result['n_not_evaluable']} not evaluable"]
    for reason, count in result.get("not_evaluable_reasons", {}).items():
        lines.append(f"           - {count} x {reason}")
    if result.get("c_index") is None:
        lines.append(f"error      {result.get('error')}")
        return "\n".join(lines)
    lines += [f"Harrell C  {ci('c_index')}", f"Uno C      {ci('uno_c_index')}"
              + (f"  (tau {result['uno_tau_days']:g} d)" if result.get("uno_tau_days") else "")]
    auc = result.get("td_auc") or {}
    if auc.get("times_days"):
        pts = ", ".join(f"{t / 365.25:.1f}y {a:.3f}" for t, a in zip(auc["times_days"], auc["auc"], strict=True)
                        if a is not None)
        lines.append(f"td-AUC     {pts}; mean {auc['mean_auc']:.3f}")
    lines.append("hazard ratios (evaluation data)")
    for h in result.get("hazard_ratios", []):
        lines.append(f"  {h['term']:<28} {h['ratio']:.2f} ({h['lower']:.2f}-{h['upper']:.2f}) p={h['p']:.3g}")
    km = result.get("kaplan_meier") or {}
    lines.append("Kaplan-Meier by risk group" + (f" (log-rank p={km['logrank_p']:.3g})" if km.get("logrank_p")
                                                 is not None else ""))
    for g in km.get("groups", []):
        at = g.get("survival_at_horizon")
        med = g.get("median_survival_days")
        lines.append(f"  {g['group']:<13} n={g['n']:<4} events={g['events']:<4} median="
                     + (f"{med / 365.25:.1f}y" if med else "not reached")
                     + (f"  S(horizon)={at[0]:.2f} ({at[1]:.2f}-{at[2]:.2f})" if at else ""))
    cal = result.get("calibration")
    if cal:
        lines.append(f"calibration at {cal['horizon_days']:g} d: O/E={_f(cal['observed_expected'])}, "
                     f"slope={_f(cal['calibration_slope'])}")
        for g in cal["groups"]:
            lines.append(f"  group {g['group']}: n={g['n']:<4} predicted {g['predicted']:.2f}  observed "
                         f"{g['observed']:.2f} ({g['observed_lower']:.2f}-{g['observed_upper']:.2f})")
    nb = result.get("net_benefit")
    if nb:
        picks = [0.1, 0.2, 0.3, 0.4, 0.5]
        idx = [nb["thresholds"].index(p) for p in picks if p in nb["thresholds"]]
        lines.append("net benefit  threshold: model / treat all / treat none")
        for i in idx:
            lines.append(f"  {nb['thresholds'][i]:.2f}: {nb['model'][i]:+.3f} / {nb['treat_all'][i]:+.3f} / 0")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
