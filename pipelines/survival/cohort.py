"""Cohort utilities: a seeded, optionally stratified held-out split of a cohort table."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.survival.data import CohortError, read_table


@dataclass(frozen=True)
class Split:
    train: Path
    test: Path
    n_train: int
    n_test: int


def split_indices(frame: pd.DataFrame, test_fraction: float, seed: int,
                  stratify: str | None = None) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """Row indices (train, test); within each stratum round(fraction * size) rows go to test."""
    if not 0 < test_fraction < 1:
        raise CohortError(f"test fraction {test_fraction}: expected a number between 0 and 1")
    rng = np.random.default_rng(seed)
    if stratify is not None and stratify not in frame.columns:
        raise CohortError(f"stratify column {stratify!r} not in the table")
    keys = frame[stratify].astype(str).to_numpy() if stratify else np.zeros(len(frame), dtype=str)
    test: list[int] = []
    for key in sorted(set(keys)):
        idx = np.flatnonzero(keys == key)
        rng.shuffle(idx)
        test.extend(int(i) for i in idx[: int(round(test_fraction * len(idx)))])
    test_idx = np.asarray(sorted(test), dtype=int)
    train_idx = np.setdiff1d(np.arange(len(frame)), test_idx)
    return train_idx, test_idx


def split_file(data: Path, out_dir: Path, test_fraction: float, seed: int, stratify: str | None = None) -> Split:
    """Write ``train.csv``, ``test.csv`` and ``split.json`` (seed, fraction, source hash) to ``out_dir``."""
    frame, digest = read_table(data)
    train_idx, test_idx = split_indices(frame, test_fraction, seed, stratify)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = out_dir / "train.csv", out_dir / "test.csv"
    frame.iloc[train_idx].to_csv(train, index=False)
    frame.iloc[test_idx].to_csv(test, index=False)
    record = {"source": str(data), "sha256": digest, "seed": seed, "test_fraction": test_fraction,
              "stratify": stratify, "n_train": len(train_idx), "n_test": len(test_idx),
              "test_rows_sha256": hashlib.sha256(",".join(map(str, test_idx)).encode()).hexdigest()}
    (out_dir / "split.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return Split(train, test, len(train_idx), len(test_idx))
