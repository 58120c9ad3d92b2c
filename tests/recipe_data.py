"""Synthetic cohorts with a known signal, with the columns ``cohort features`` really wrote.

The recipes' image steps run on a few tiny phantom studies; their modelling steps need a cohort.
:func:`synthetic_cohort` takes the feature table the phantoms gave (so every column name is one
prognode wrote), draws ``n`` patients whose features vary around the phantoms' values, and an
outcome that depends on the named ``signal`` columns only (Cox hazard or logistic log-odds, per
SD of the column).  Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.cohort_features.cli import FIRST_COLUMNS, _provenance


def synthetic_cohort(features_csv: Path, out_dir: Path, n: int, signal: Mapping[str, float], seed: int = 0,
                     binary: str = "", with_survival: bool = True) -> tuple[Path, Path]:
    """(features.csv, outcomes.csv) of ``n`` synthetic patients; ``signal``: column -> log-HR (or log-OR) per SD.

    Outcomes: ``study``, ``Age``, ``Sex``, ``Grade`` (clinical, ``Age`` carries a small signal),
    ``time`` (days) and ``event`` when ``with_survival``, and the 0/1 column ``binary`` when named.
    """
    rng = np.random.default_rng(seed)
    real = pd.read_csv(features_csv)
    numeric = [c for c in real.columns if c not in FIRST_COLUMNS and not _provenance(c)
               and pd.api.types.is_numeric_dtype(real[c]) and real[c].notna().any()]
    missing = [c for c in signal if c not in numeric]
    if missing:
        raise ValueError(f"signal columns not in {features_csv}: {missing}")
    data: dict[str, Any] = {}
    for c in numeric:
        base = float(real[c].mean())
        spread = abs(base) * 0.2 if base != 0 else 1.0
        data[c] = base + rng.normal(0.0, spread, n)
    frame = pd.DataFrame(data)
    frame.insert(0, "study", [f"syn{i:03d}" for i in range(n)])
    lp = np.zeros(n)
    for c, beta in signal.items():
        z = (frame[c] - frame[c].mean()) / frame[c].std()
        lp += beta * z.to_numpy()
    age = rng.normal(62.0, 10.0, n).round()
    lp += 0.2 * (age - 62.0) / 10.0
    outcomes = pd.DataFrame({"study": frame["study"], "Age": age,
                             "Sex": np.where(rng.random(n) < 0.6, "Male", "Female"),
                             "Grade": rng.choice(["G1", "G2", "G3"], n)})
    if with_survival:
        t = rng.exponential(1500.0 * np.exp(-lp))
        c = rng.uniform(400.0, 3000.0, n)
        outcomes["time"] = np.minimum(t, c).round()
        outcomes["event"] = (t <= c).astype(int)
    if binary:
        outcomes[binary] = (rng.random(n) < 1.0 / (1.0 + np.exp(-(lp - 0.3)))).astype(int)
    out_dir.mkdir(parents=True, exist_ok=True)
    f_path, o_path = out_dir / "features.csv", out_dir / "outcomes.csv"
    frame.to_csv(f_path, index=False)
    outcomes.to_csv(o_path, index=False)
    return f_path, o_path
