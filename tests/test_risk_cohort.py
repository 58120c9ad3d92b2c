"""survival-risk on a model fitted on `cohort features` columns: the node computes them with the cohort's extraction.

Phantom studies with a tumour SEG (tests/cohort_phantoms.py) -> ``cohort features --families radiomics``
(the table and its ``.params.json``) -> a Cox model on radiomics columns with the cohort record ->
the pipeline on a new study: the same numbers as the table's row, a risk SR (dciodvfy, round trip);
and the refusals: no ROI, a parameter-hash mismatch, deep columns without weights, a model without
the record.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest

from dicom_templates.risk_sr import read_risk
from pipelines import registry
from pipelines.base import PipelineContext, PipelineOutput, SeriesInput, StageError
from pipelines.survival.artifact import load_model, save_model
from pipelines.survival.cohort_source import (
    RECORD_KEY,
    CohortRecordError,
    cohort_record,
    families_for,
    family_of,
)
from pipelines.survival.data import cohort_from_frame
from pipelines.survival.fit import FitOptions, fit_model
from tests.test_risk_sr import IDENTITY, check_sr

COLUMNS = ("rad_roi_volume_mm3", "intra_firstorder_Mean", "ring3_firstorder_Mean")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from pipelines.cohort_features.cli import CohortOptions, extract_cohort, study_folders
    from tests.cohort_phantoms import sphere_study

    root = tmp_path_factory.mktemp("risk-cohort")
    for i in range(2):
        sphere_study(root / "studies" / f"t{i}", i, radius_mm=7.0 + 2 * i)
    table = root / "features.csv"
    extract_cohort(study_folders(root / "studies"), table, CohortOptions(families=("radiomics",)), progress=False)
    real = pd.read_csv(table)
    rng = np.random.default_rng(2)
    n = 150
    frame = pd.DataFrame({c: float(real[c].mean()) * (1 + 0.2 * rng.normal(size=n)) for c in COLUMNS})
    lp = 0.8 * (frame[COLUMNS[0]] - frame[COLUMNS[0]].mean()) / frame[COLUMNS[0]].std()
    t, c = rng.exponential(1500 * np.exp(-lp)), rng.uniform(400, 3000, n)
    frame["time"], frame["event"] = np.minimum(t, c), (t <= c).astype(int)
    model = fit_model(cohort_from_frame(frame, "time", "event", source="synthetic"),
                      FitOptions(kind="cox", features=COLUMNS, horizon_days=1096.0, name="rad-risk", n_boot=10,
                                 time_column="time", event_column="event"))
    record = cohort_record(table, model.feature_names)
    model = dataclasses.replace(model, training={**model.training, RECORD_KEY: record})
    save_model(model, root / "rad-risk")
    return {"root": root, "table": table, "real": real, "model": root / "rad-risk"}


def run(study: Path, model_dir: Path, work: Path, options: dict[str, Any] | None = None,
        models: dict[str, Path] | None = None) -> PipelineOutput:
    """The pipeline as a study-level route gives it: the CT series, the SEG in ``extra_files``."""
    ct = sorted((study / "ct").glob("*"))
    ds = pydicom.dcmread(ct[0], stop_before_pixels=True)
    extra = tuple(sorted(study.glob("*.dcm")))
    pipeline = registry.create("survival-risk", options or {"model": "rad-risk"})
    ctx = PipelineContext(series=(SeriesInput(ds.SeriesInstanceUID, ds.StudyInstanceUID, tuple(ct), role="ct"),),
                          work_dir=work, identity=IDENTITY, models={"rad-risk": model_dir, **(models or {})},
                          extra_files=extra)
    return pipeline.run(ctx)


def test_families_by_column_name() -> None:
    assert [family_of(c) for c in ("bc_smi", "intra_x", "ring9_y", "deep3d_tumour_001", "art_z", "Age")] == \
        ["body-composition", "radiomics", "radiomics", "deep", "dual-phase", None]
    assert families_for(["deep2d_psoas_left_000", "intra_x"]) == ("body-composition", "radiomics", "deep")


def test_same_numbers_as_the_cohort_and_a_valid_sr(cohort: dict[str, Any], tmp_path: Path) -> None:
    out = run(cohort["root"] / "studies" / "t1", cohort["model"], tmp_path / "w")
    assert out.evaluable, out.reason
    row = cohort["real"].set_index("study").loc["t1"]
    for c in COLUMNS:  # exactly the extraction of the cohort
        assert out.summary["features"][c] == pytest.approx(float(row[c]), rel=1e-12)
    cf = out.summary["cohort_features"]
    assert cf["param_hash"] == cf["recorded_param_hash"] == row["param_hash"] and cf["families"] == ["radiomics"]
    sr = check_sr(out.files[0])
    got = read_risk(sr)
    assert got["numbers"]["Risk score"] == pytest.approx(out.summary["score"])
    assert got["algorithm"][0] == "rad-risk"
    card = (cohort["model"] / "MODEL_CARD.md").read_text()
    assert f"param_hash `{row['param_hash']}`, families: radiomics" in card


def test_no_roi_is_not_evaluable(cohort: dict[str, Any], tmp_path: Path) -> None:
    study = tmp_path / "noroi"
    shutil.copytree(cohort["root"] / "studies" / "t0" / "ct", study / "ct")
    out = run(study, cohort["model"], tmp_path / "w")
    assert not out.evaluable and out.reason == "radiomics: no SEG or RTSTRUCT ROI in the study folder"
    got = read_risk(check_sr(out.files[0]))
    assert got["codes"]["Evaluability"] == "Not evaluable" and got["texts"]["Reason not evaluable"] == out.reason
    assert got["numbers"] == {"Number of unusable model inputs": 3.0}


def test_param_hash_mismatch_is_not_evaluable(cohort: dict[str, Any], tmp_path: Path) -> None:
    model = load_model(cohort["model"])
    record = dict(model.training[RECORD_KEY])
    record["options"] = {**record["options"], "radiomics": {"rings_mode": "annular"}}  # another extraction
    save_model(dataclasses.replace(model, training={**model.training, RECORD_KEY: record}), tmp_path / "m")
    out = run(cohort["root"] / "studies" / "t0", tmp_path / "m", tmp_path / "w")
    assert not out.evaluable and out.reason.startswith("param hash mismatch: the model was fitted on features with "
                                                       f"param_hash {record['param_hash']}")
    assert "radiomics.rings_mode" in out.reason
    check_sr(out.files[0])


def test_deep_without_weights_is_not_evaluable(cohort: dict[str, Any], tmp_path: Path) -> None:
    model = load_model(cohort["model"])
    record = {**model.training[RECORD_KEY], "options": {**model.training[RECORD_KEY]["options"],
                                                        "families": ["radiomics", "deep"]}}
    m = dataclasses.replace(model, training={**model.training, RECORD_KEY: record})
    save_model(m, tmp_path / "m")
    # the deep family is asked for through a column mapped explicitly to the cohort source
    opts = {"model": "rad-risk", "features": {COLUMNS[0]: "cohort:deep3d_tumour_000"}}
    out = run(cohort["root"] / "studies" / "t0", tmp_path / "m", tmp_path / "w", options=opts)
    assert not out.evaluable and out.reason.startswith("deep features without pretrained weights: config [models] "
                                                       "has no models.deep3d")


def test_model_without_record_and_bad_tables(cohort: dict[str, Any], tmp_path: Path) -> None:
    model = load_model(cohort["model"])
    save_model(dataclasses.replace(model, training={k: v for k, v in model.training.items() if k != RECORD_KEY}),
               tmp_path / "m")
    with pytest.raises(StageError, match="--cohort-features"):
        run(cohort["root"] / "studies" / "t0", tmp_path / "m", tmp_path / "w")
    lone = tmp_path / "lone.csv"
    shutil.copy(cohort["table"], lone)
    with pytest.raises(CohortRecordError, match="no lone.params.json"):
        cohort_record(lone, list(COLUMNS))
    with pytest.raises(CohortRecordError, match="not in the table"):
        cohort_record(cohort["table"], ["intra_no_such_feature"])


def _fit(table: Path, columns: tuple[str, ...], name: str, out: Path) -> Path:
    """A Cox model on ``columns`` of a synthetic cohort around the table's values, with the cohort record."""
    real = pd.read_csv(table)
    rng = np.random.default_rng(4)
    n = 120
    frame = pd.DataFrame({c: float(real[c].mean()) + abs(float(real[c].mean()) or 1.0) * 0.2 * rng.normal(size=n)
                          for c in columns})
    lp = (frame[columns[0]] - frame[columns[0]].mean()) / frame[columns[0]].std()
    t, c = rng.exponential(1500 * np.exp(-lp)), rng.uniform(400, 3000, n)
    frame["time"], frame["event"] = np.minimum(t, c), (t <= c).astype(int)
    model = fit_model(cohort_from_frame(frame, "time", "event", source="synthetic"),
                      FitOptions(kind="cox", features=columns, horizon_days=1096.0, name=name, n_boot=10,
                                 time_column="time", event_column="event"))
    model = dataclasses.replace(model, training={**model.training, RECORD_KEY: cohort_record(table, columns)})
    save_model(model, out)
    return out


def _series(folder: Path, role: str = "") -> SeriesInput:
    files = tuple(sorted(folder.glob("*")))
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return SeriesInput(ds.SeriesInstanceUID, ds.StudyInstanceUID, files, role=role)


def test_dual_phase_model_needs_both_phases(tmp_path: Path) -> None:
    from pipelines.cohort_features.cli import CohortOptions, extract_cohort
    from tests.cohort_phantoms import dual_phase_study

    study = dual_phase_study(tmp_path / "studies" / "d0", 0)
    table = tmp_path / "features.csv"
    extract_cohort([study], table, CohortOptions(families=("dual-phase",)), progress=False)
    real = pd.read_csv(table).iloc[0]
    columns = tuple(c for c in ("enh_art_minus_pv_hu", "art_intra_firstorder_Mean", "pv_ring3_firstorder_Mean")
                    if c in real)
    assert len(columns) == 3, list(real.index)
    model = _fit(table, columns, "hcc-dp", tmp_path / "hcc-dp")
    pipeline = registry.create("survival-risk", {"model": "hcc-dp"})

    def ctx(*series: SeriesInput, work: str) -> PipelineContext:
        return PipelineContext(series=series, work_dir=tmp_path / work, identity=IDENTITY, models={"hcc-dp": model},
                               extra_files=(study / "seg.dcm",))

    both = pipeline.run(ctx(_series(study / "art", "arterial"), _series(study / "pv", "portal"), work="both"))
    assert both.evaluable, both.reason
    for c in columns:  # the cohort's own dual-phase run: registration included.  SimpleITK's multi-threaded
        # registration is not bit-reproducible between runs (CI saw 129.68981223 against 129.68981205, 1.4e-9
        # apart): 1e-6 still tells the same computation from any other
        assert both.summary["features"][c] == pytest.approx(float(real[c]), rel=1e-6)
    assert both.summary["cohort_features"]["families"] == ["dual-phase"]
    assert read_risk(check_sr(both.files[0]))["numbers"]["Risk score"] == pytest.approx(both.summary["score"])
    one = pipeline.run(ctx(_series(study / "pv"), work="one"))
    assert not one.evaluable and one.reason.startswith("dual-phase: not one arterial and one portal-venous CT series")
    check_sr(one.files[0])


def test_deep_model_with_the_cohort_weights(cohort: dict[str, Any], tmp_path: Path) -> None:
    from pipelines.cohort_features.cli import CohortOptions, extract_cohort
    from tests.cohort_phantoms import encoder_weights

    weights = encoder_weights(tmp_path / "weights", dims=(3,))
    study = cohort["root"] / "studies" / "t0"
    table = tmp_path / "features.csv"
    extract_cohort([study], table, CohortOptions(families=("radiomics", "deep"), deep={
        "arch": "resnet10", "size_3d": 24, "dims": [3]}), weights, progress=False)
    columns = ("deep3d_tumour_000", "deep3d_tumour_001", "intra_firstorder_Mean")
    model = _fit(table, columns, "deep-risk", tmp_path / "deep-risk")
    out = run(study, model, tmp_path / "w", options={"model": "deep-risk"}, models={"deep-risk": model, **weights})
    assert out.evaluable, out.reason
    real = pd.read_csv(table).iloc[0]
    for c in columns:
        assert out.summary["features"][c] == pytest.approx(float(real[c]), rel=1e-5, abs=1e-6)
    assert out.summary["cohort_features"]["families"] == ["radiomics", "deep"]
    check_sr(out.files[0])
    other = encoder_weights(tmp_path / "other", dims=(3,), arch="resnet18")  # not the cohort's weights
    out = run(study, model, tmp_path / "w2", options={"model": "deep-risk"}, models={"deep-risk": model, **other})
    assert not out.evaluable and out.reason.startswith("param hash mismatch") and "weights_sha256" in out.reason


def test_no_level_is_not_evaluable(cohort: dict[str, Any], tmp_path: Path) -> None:
    """A body-composition model on a study without a findable vertebral level (the sphere phantom)."""
    model = load_model(cohort["model"])
    record = {**model.training[RECORD_KEY], "options": {**model.training[RECORD_KEY]["options"],
                                                        "families": ["radiomics", "body-composition"]}}
    save_model(dataclasses.replace(model, training={**model.training, RECORD_KEY: record}), tmp_path / "m")
    from pipelines.cohort_features.families import CohortOptions, Plan

    record["param_hash"] = Plan(CohortOptions(families=("radiomics", "body-composition"))).hash
    save_model(dataclasses.replace(model, training={**model.training, RECORD_KEY: record}), tmp_path / "m")
    opts = {"model": "rad-risk", "features": {COLUMNS[0]: "cohort:bc_smi"}}
    out = run(cohort["root"] / "studies" / "t0", tmp_path / "m", tmp_path / "w", options=opts)
    assert not out.evaluable and out.reason.startswith("body-composition: "), out.reason
    check_sr(out.files[0])
