"""Repeated seeded held-out splits of a survival cohort: test Harrell's C of feature sets, and their difference.

A single 70/30 split of a small cohort gives a noisy C-index; this repeats the split (stratified on
the event) with seeds 0..N-1, fits each feature set on the training part and scores the test part.

    python scripts/survival_repeated_splits.py --data HNSCC_clinical.csv --time "Survival  (months)" \
        --event "Overall Survival Censor" --time-unit months --kind lasso-cox --splits 30 \
        --set clinical=Age,Sex,Stage,Site,"Smoking History" --set body=... --compare combined,clinical
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from pipelines.survival import metrics
from pipelines.survival.cohort import split_indices
from pipelines.survival.data import load_cohort
from pipelines.survival.fit import FitOptions, fit_model
from pipelines.survival.scoring import score_frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--time", required=True)
    ap.add_argument("--event", required=True)
    ap.add_argument("--time-unit", default="days")
    ap.add_argument("--kind", default="lasso-cox", choices=("cox", "lasso-cox", "logistic"))
    ap.add_argument("--penalizer", type=float, default=0.0, help="cox: ridge penalty")
    ap.add_argument("--splits", type=int, default=30)
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--set", action="append", required=True, metavar="NAME=COL,COL",
                    help="a feature set (repeatable); NAME=a+b joins earlier sets a and b")
    ap.add_argument("--compare", action="append", default=[], metavar="A,B", help="report C(A) - C(B)")
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    cohort = load_cohort(a.data, a.time, a.event, a.time_unit)
    sets: dict[str, tuple[str, ...]] = {}
    for item in a.set:
        name, cols = item.split("=", 1)
        if "+" in cols and all(p in sets for p in cols.split("+")):
            sets[name] = tuple(c for p in cols.split("+") for c in sets[p])
        else:
            sets[name] = tuple(c.strip() for c in cols.split(","))
    res: dict[str, list[float]] = {k: [] for k in sets}
    for seed in range(a.splits):
        _, test_idx = split_indices(cohort.frame, a.test_fraction, seed, a.event)
        is_test = np.zeros(cohort.n, dtype=bool)
        is_test[test_idx] = True
        train, test = cohort.subset(~is_test), cohort.subset(is_test)
        for name, feats in sets.items():
            model = fit_model(train, FitOptions(kind=a.kind, features=feats, n_boot=0, seed=seed,
                                                penalizer=a.penalizer, horizon_days=1826.0))
            s = score_frame(model, test.frame)
            ok = s.evaluable
            res[name].append(metrics.harrell_c(test.time_days[ok], test.event[ok], s.scores[ok]))
    out: dict[str, dict[str, float]] = {
        k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)), "q2.5": float(np.quantile(v, 0.025)),
            "q97.5": float(np.quantile(v, 0.975))} for k, v in res.items()}
    for pair in a.compare:
        x, y = pair.split(",")
        d = np.asarray(res[x]) - np.asarray(res[y])
        out[f"{x} - {y}"] = {"mean": float(d.mean()), "sd": float(d.std(ddof=1)), "fraction_positive": float((d > 0).mean())}
    print(json.dumps({"kind": a.kind, "splits": a.splits, "results": out}, indent=1))


if __name__ == "__main__":
    main()
