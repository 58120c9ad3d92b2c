"""Every recipe in docs/studies/ runs end to end on small inputs (tests/recipes.py runs its blocks).

Image steps run on tiny phantom studies; modelling steps on the shared HNSCC table (HNSCC recipe)
or on synthetic cohorts with a known signal built from the columns the phantoms gave
(tests/recipe_data.py); each recipe ends with the node's pipelines filing a risk SR for a new study.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import pytest

from tests.recipes import STUDIES_DOCS, RecipeRun, blocks, run_recipe, site_variables

RECIPES = ("hnscc", "gastric", "sarcoma", "nsclc", "hcc")
HNSCC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "survival_csv_hn" / "HNSCC_clinical.csv"
NBOOT = "50"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.cohort_phantoms import abdomen_study, dual_phase_study, sphere_study

    root = tmp_path_factory.mktemp("recipe-inputs")
    abdomen_study(root / "abdomen" / "a0", 0)
    for i in range(2):
        sphere_study(root / "tumour" / f"t{i}", i, radius_mm=7.0 + 2 * i)
    dual_phase_study(root / "dual" / "d0", 0)
    new_pv = root / "new-portal"
    shutil.copytree(root / "dual" / "d0" / "pv", new_pv / "pv")
    shutil.copy(root / "dual" / "d0" / "seg.dcm", new_pv / "seg.dcm")
    return root


def _synthetic(inputs: Path, name: str, studies: Path, signal: dict[str, float], binary: str = "",
               models: dict[str, Path] | None = None, **options: Any) -> tuple[Path, Path]:
    """Extract the phantoms once (the column names), then a 120-patient cohort with ``signal``."""
    from pipelines.cohort_features.cli import CohortOptions, extract_cohort, study_folders
    from tests.recipe_data import synthetic_cohort

    pre = inputs / f"{name}-columns.csv"
    extract_cohort(study_folders(studies), pre, CohortOptions(**options), models, progress=False)
    return synthetic_cohort(pre, inputs / f"{name}-synthetic", 120, signal, seed=3, binary=binary)


def _check(run: RecipeRun, work: Path) -> dict[str, Any]:
    assert run.returncode == 0, f"recipe failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    features = pd.read_csv(work / "features.csv")
    assert len(features) >= 1 and not features["error"].fillna("").astype(bool).any()
    assert (work / "split" / "train.csv").is_file() and (work / "split" / "test.csv").is_file()
    compare: dict[str, Any] = json.loads((work / "compare.json").read_text())
    assert compare["n"] >= 20 and len(compare["models"]) >= 2
    html = (work / "compare.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    summary = json.loads((work / "new" / "risk" / "summary.json").read_text())
    assert summary["evaluable"], summary
    sr = pydicom.dcmread(next((work / "new" / "risk").glob("risk-sr-*.dcm")))
    assert sr.Modality == "SR"
    return compare


def _auc(compare: dict[str, Any], label: str) -> float:
    m = next(m for m in compare["models"] if m["label"] == label)
    return float(m.get("auc") or m.get("horizon_auc") or m["c_index"])


def test_every_recipe_has_site_and_recipe_blocks() -> None:
    index = (STUDIES_DOCS / "README.md").read_text()
    for name in RECIPES:
        text = (STUDIES_DOCS / f"{name}.md").read_text()
        assert blocks(text, "site") and blocks(text, "recipe") and f"({name}.md)" in index
        assert {"STUDIES", "OUTCOMES", "NEW_STUDY", "NBOOT"} <= set(site_variables(text))
        assert "What a site supplies" in text


def test_hnscc_recipe(inputs: Path, tmp_path: Path) -> None:
    if not HNSCC.is_file():
        pytest.skip(f"shared data missing: {HNSCC}")
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("study,time,event\na0,700,1\n")
    run = run_recipe("hnscc", tmp_path / "work", {
        "STUDIES": str(inputs / "abdomen"), "OUTCOMES": str(outcomes), "COHORT": str(HNSCC),
        "NEW_STUDY": str(inputs / "abdomen" / "a0" / "ct"), "NBOOT": NBOOT})
    compare = _check(run, tmp_path / "work")
    assert compare["n"] == 64 and compare["events"] == 23  # the documented held-out split (seed 42)
    assert _auc(compare, "clinical") > _auc(compare, "body-composition")
    features = pd.read_csv(tmp_path / "work" / "features.csv")
    assert features.loc[0, "bc_level"] == "L3" and features.loc[0, "bc_smi"] > 0
    assert (tmp_path / "work" / "nomogram.png").is_file()


def test_gastric_recipe(inputs: Path, tmp_path: Path) -> None:
    from tests.cohort_phantoms import encoder_weights

    weights = encoder_weights(tmp_path / "weights", dims=(2,))
    deep = {"arch": "resnet10", "size_2d": 48, "dims": [2]}
    f, o = _synthetic(inputs, "gastric", inputs / "abdomen",
                      {"bc_psoas_left_area_cm2": -0.8, "bc_erector_left_volume_cm3": -0.5, "bc_smi": -0.6},
                      models=weights, families=("body-composition", "deep"), deep=deep)
    run = run_recipe("gastric", tmp_path / "work", {
        "STUDIES": str(inputs / "abdomen"), "OUTCOMES": str(o), "FEATURES": str(f),
        "WEIGHTS_2D": str(weights["deep2d"]), "WEIGHTS_3D": "",
        "DEEP_OPTS": "--deep-arch resnet10 --deep-size 48 24 --deep-dims 2",
        "NEW_STUDY": str(inputs / "abdomen" / "a0" / "ct"), "NBOOT": NBOOT})
    compare = _check(run, tmp_path / "work")
    assert [m["label"] for m in compare["models"]] == ["smi", "muscle-2d", "muscle-3d", "deep-2d", "fused"]
    features = pd.read_csv(tmp_path / "work" / "features.csv")
    assert "deep2d_psoas_left_000" in features.columns and "deep3d_psoas_left_000" not in features.columns


def test_sarcoma_recipe(inputs: Path, tmp_path: Path) -> None:
    f, o = _synthetic(inputs, "sarcoma", inputs / "tumour",
                      {"rad_roi_volume_mm3": 0.8, "intra_firstorder_Mean": 0.5}, families=("radiomics",))
    run = run_recipe("sarcoma", tmp_path / "work", {
        "STUDIES": str(inputs / "tumour"), "OUTCOMES": str(o), "FEATURES": str(f), "WEIGHTS_2D": "",
        "WEIGHTS_3D": "", "DEEP_OPTS": "", "NEW_STUDY": str(inputs / "tumour" / "t1"), "NBOOT": NBOOT})
    compare = _check(run, tmp_path / "work")
    # no weights: no deep columns and no deep model, and the table says why
    assert [m["label"] for m in compare["models"]] == ["clinical", "radiomics", "combined"]
    features = pd.read_csv(tmp_path / "work" / "features.csv")
    assert features["deep_weights"].str.startswith("none: ").all()
    assert _auc(compare, "combined") > _auc(compare, "clinical")  # the signal is in volume and mean HU


def test_nsclc_recipe(inputs: Path, tmp_path: Path) -> None:
    from tests.cohort_phantoms import encoder_weights

    weights = encoder_weights(tmp_path / "weights", dims=(3,))
    f, o = _synthetic(inputs, "nsclc", inputs / "tumour", {"ring3_firstorder_Mean": 0.7, "intra_shape_VoxelVolume": 0.6},
                      models=weights, families=("radiomics", "deep"),
                      deep={"arch": "resnet10", "size_2d": 48, "size_3d": 24, "dims": [3]})
    run = run_recipe("nsclc", tmp_path / "work", {
        "STUDIES": str(inputs / "tumour"), "OUTCOMES": str(o), "FEATURES": str(f),
        "WEIGHTS_3D": str(weights["deep3d"]), "DEEP_OPTS": "--deep-arch resnet10 --deep-dims 3 --deep-size 48 24",
        "NEW_STUDY": str(inputs / "tumour" / "t0"), "NBOOT": NBOOT})
    compare = _check(run, tmp_path / "work")
    assert [m["label"] for m in compare["models"]] == ["intratumoral", "peritumoral", "pca-fusion", "deep-3d",
                                                       "combined"]


def test_hcc_recipe(inputs: Path, tmp_path: Path) -> None:
    f, o = _synthetic(inputs, "hcc", inputs / "dual", {"enh_art_minus_pv_hu": 1.0, "rad_roi_volume_mm3": 0.5},
                      binary="MVI", families=("radiomics", "dual-phase"))
    run = run_recipe("hcc", tmp_path / "work", {
        "STUDIES": str(inputs / "dual"), "OUTCOMES": str(o), "FEATURES": str(f), "WEIGHTS_2D": "",
        "WEIGHTS_3D": "", "DEEP_OPTS": "", "NEW_STUDY": str(inputs / "new-portal"), "NBOOT": NBOOT})
    compare = _check(run, tmp_path / "work")
    assert compare["endpoint"] == "binary"
    mvi = json.loads((tmp_path / "work" / "mvi.json").read_text())
    assert len(mvi["auc_ci"]) == 2 and mvi["calibration"] and mvi["net_benefit"]
    assert _auc(compare, "mvi-combined") > _auc(compare, "mvi-clinical")
