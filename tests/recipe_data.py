"""Synthetic cohorts with a known signal, with the columns ``cohort features`` really wrote.

The recipes' image steps run on a few tiny phantom studies; their modelling steps need a cohort.
:func:`synthetic_cohort` takes the feature table the phantoms gave (so every column name is one
prognode wrote), draws ``n`` patients whose features vary around the phantoms' values, and an
outcome that depends on the named ``signal`` columns only (Cox hazard or logistic log-odds, per
SD of the column).  Everything is seeded.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    hashes = real["param_hash"].dropna().unique() if "param_hash" in real.columns else []
    if len(hashes) == 1:  # drawn from one extraction: its param_hash and parameter file, for --cohort-features
        frame.insert(1, "param_hash", hashes[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    f_path, o_path = out_dir / "features.csv", out_dir / "outcomes.csv"
    sidecar = features_csv.with_suffix(".params.json")
    if sidecar.is_file():
        shutil.copy(sidecar, f_path.with_suffix(".params.json"))
    frame.to_csv(f_path, index=False)
    outcomes.to_csv(o_path, index=False)
    return f_path, o_path


RECIPES = ("hnscc", "gastric", "sarcoma", "nsclc", "hcc")
HNSCC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "survival_csv_hn" / "HNSCC_clinical.csv"


def make_inputs(root: Path) -> Path:
    """The phantom studies every recipe's image steps run on (a few seconds)."""
    from tests.cohort_phantoms import abdomen_study, dual_phase_study, sphere_study

    abdomen_study(root / "abdomen" / "a0", 0)
    for i in range(2):
        sphere_study(root / "tumour" / f"t{i}", i, radius_mm=7.0 + 2 * i)
    dual_phase_study(root / "dual" / "d0", 0)
    new_pv = root / "new-portal"
    shutil.copytree(root / "dual" / "d0" / "pv", new_pv / "pv")
    shutil.copy(root / "dual" / "d0" / "seg.dcm", new_pv / "seg.dcm")
    return root


def _synthetic(inputs: Path, name: str, studies: Path, signal: Mapping[str, float], binary: str = "",
               models: Mapping[str, Path] | None = None, **options: Any) -> tuple[Path, Path]:
    """Extract the phantoms once (the column names), then a 120-patient cohort with ``signal``."""
    from pipelines.cohort_features.cli import CohortOptions, extract_cohort, study_folders

    pre = inputs / f"{name}-columns.csv"
    extract_cohort(study_folders(studies), pre, CohortOptions(**options), models, progress=False)
    return synthetic_cohort(pre, inputs / f"{name}-synthetic", 120, signal, seed=3, binary=binary)


def recipe_variables(name: str, inputs: Path, scratch: Path, nboot: str = "50") -> dict[str, str]:
    """The site variables of recipe ``name`` set to small inputs (synthetic cohorts built in ``scratch``)."""
    from tests.cohort_phantoms import encoder_weights

    scratch.mkdir(parents=True, exist_ok=True)
    if name == "hnscc":
        outcomes = scratch / "outcomes.csv"
        outcomes.write_text("study,time,event\na0,700,1\n")
        return {"STUDIES": str(inputs / "abdomen"), "OUTCOMES": str(outcomes), "COHORT": str(HNSCC),
                "NEW_STUDY": str(inputs / "abdomen" / "a0" / "ct"), "NBOOT": nboot}
    if name == "gastric":
        weights = encoder_weights(scratch / "weights", dims=(2,))
        f, o = _synthetic(scratch, name, inputs / "abdomen",
                          {"bc_psoas_left_area_cm2": -0.8, "bc_erector_left_volume_cm3": -0.5, "bc_smi": -0.6},
                          models=weights, families=("body-composition", "deep"),
                          deep={"arch": "resnet10", "size_2d": 48, "dims": [2]})
        return {"STUDIES": str(inputs / "abdomen"), "OUTCOMES": str(o), "FEATURES": str(f),
                "WEIGHTS_2D": str(weights["deep2d"]), "WEIGHTS_3D": "",
                "DEEP_OPTS": "--deep-arch resnet10 --deep-size 48 24 --deep-dims 2",
                "NEW_STUDY": str(inputs / "abdomen" / "a0" / "ct"), "NBOOT": nboot}
    if name == "sarcoma":
        f, o = _synthetic(scratch, name, inputs / "tumour", {"rad_roi_volume_mm3": 0.8, "intra_firstorder_Mean": 0.5},
                          families=("radiomics", "deep"))  # as the recipe's step 1 (no weights: no deep columns)
        return {"STUDIES": str(inputs / "tumour"), "OUTCOMES": str(o), "FEATURES": str(f), "WEIGHTS_2D": "",
                "WEIGHTS_3D": "", "DEEP_OPTS": "", "NEW_STUDY": str(inputs / "tumour" / "t1"), "NBOOT": nboot}
    if name == "nsclc":
        weights = encoder_weights(scratch / "weights", dims=(3,))
        f, o = _synthetic(scratch, name, inputs / "tumour",
                          {"ring3_firstorder_Mean": 0.7, "intra_shape_VoxelVolume": 0.6}, models=weights,
                          families=("radiomics", "deep"), deep={"arch": "resnet10", "size_2d": 48, "size_3d": 24,
                                                                "dims": [3]})
        return {"STUDIES": str(inputs / "tumour"), "OUTCOMES": str(o), "FEATURES": str(f),
                "WEIGHTS_3D": str(weights["deep3d"]), "DEEP_OPTS": "--deep-arch resnet10 --deep-dims 3 --deep-size 48 24",
                "NEW_STUDY": str(inputs / "tumour" / "t0"), "NBOOT": nboot}
    if name == "hcc":
        f, o = _synthetic(scratch, name, inputs / "dual", {"enh_art_minus_pv_hu": 1.0, "rad_roi_volume_mm3": 0.5},
                          binary="MVI", families=("radiomics", "dual-phase"))
        return {"STUDIES": str(inputs / "dual"), "OUTCOMES": str(o), "FEATURES": str(f), "WEIGHTS_2D": "",
                "WEIGHTS_3D": "", "DEEP_OPTS": "", "NEW_STUDY": str(inputs / "new-portal"), "NBOOT": nboot}
    raise ValueError(f"no recipe {name!r}: expected one of {RECIPES}")
