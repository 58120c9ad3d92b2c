"""Every recipe in docs/studies/ runs end to end on small inputs (tests/recipes.py runs its blocks).

Image steps run on tiny phantom studies; modelling steps on the shared HNSCC table (HNSCC recipe)
or on synthetic cohorts with a known signal built from the columns the phantoms gave
(tests/recipe_data.py); each recipe ends with the node's pipelines filing a risk SR for a new study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import highdicom as hd
import pandas as pd
import pydicom
import pytest

from dicom_templates.risk_sr import read_risk
from pipelines.survival.artifact import load_model
from tests.conftest import need
from tests.peers import dciodvfy
from tests.recipe_data import HNSCC, RECIPES, make_inputs, recipe_variables
from tests.recipes import STUDIES_DOCS, RecipeRun, blocks, run_recipe, site_variables


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("recipe-inputs"))


def _run(name: str, inputs: Path, tmp_path: Path) -> tuple[RecipeRun, Path]:
    work = tmp_path / "work"
    return run_recipe(name, work, recipe_variables(name, inputs, tmp_path / "scratch")), work


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
    run, work = _run("hnscc", inputs, tmp_path)
    compare = _check(run, work)
    assert compare["n"] == 64 and compare["events"] == 23  # the documented held-out split (seed 42)
    assert [m["label"] for m in compare["models"]] == ["clinical", "body-composition", "combined", "deployable"]
    assert _auc(compare, "clinical") > _auc(compare, "body-composition")
    features = pd.read_csv(work / "features.csv")
    assert features.loc[0, "bc_level"] == "L3" and features.loc[0, "bc_smi"] > 0
    assert (work / "nomogram.png").is_file()


def test_gastric_recipe(inputs: Path, tmp_path: Path) -> None:
    run, work = _run("gastric", inputs, tmp_path)
    compare = _check(run, work)
    assert [m["label"] for m in compare["models"]] == ["smi", "muscle-2d", "muscle-3d", "deep-2d", "fused"]
    features = pd.read_csv(work / "features.csv")
    assert "deep2d_psoas_left_000" in features.columns and "deep3d_psoas_left_000" not in features.columns


def test_sarcoma_recipe(inputs: Path, tmp_path: Path) -> None:
    run, work = _run("sarcoma", inputs, tmp_path)
    compare = _check(run, work)
    # no weights: no deep columns and no deep model, and the table says why
    assert [m["label"] for m in compare["models"]] == ["clinical", "radiomics", "combined"]
    features = pd.read_csv(work / "features.csv")
    assert features["deep_weights"].str.startswith("none: ").all()
    assert _auc(compare, "combined") > _auc(compare, "clinical")  # the signal is in volume and mean HU
    # deployed: the radiomics model's features computed on the new study by the cohort's extraction
    summary = json.loads((work / "new" / "risk" / "summary.json").read_text())
    model = json.loads((work / "models" / "radiomics" / "model.json").read_text())
    record = model["training"]["cohort_features"]
    assert record["param_hash"] == features.loc[0, "param_hash"] and record["families"] == ["radiomics"]
    cf = summary["cohort_features"]
    assert cf["param_hash"] == cf["recorded_param_hash"] == record["param_hash"] and cf["families"] == ["radiomics"]
    assert set(summary["features"]) == set(load_model(work / "models" / "radiomics").feature_names)
    row = features.set_index("study").loc["t1"]  # NEW_STUDY: the same extraction gives the same numbers
    for name, value in summary["features"].items():
        assert value == pytest.approx(float(row[name]), rel=1e-9), name
    sr_path = next((work / "new" / "risk").glob("risk-sr-*.dcm"))
    need("dciodvfy")
    ok, report = dciodvfy(sr_path)
    assert ok, report
    sr = pydicom.dcmread(sr_path)
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # highdicom reads it back
    got = read_risk(sr)
    assert got["numbers"]["Risk score"] == pytest.approx(summary["score"]) and got["algorithm"][0] == "radiomics"


def test_nsclc_recipe(inputs: Path, tmp_path: Path) -> None:
    run, work = _run("nsclc", inputs, tmp_path)
    compare = _check(run, work)
    assert [m["label"] for m in compare["models"]] == ["intratumoral", "peritumoral", "pca-fusion", "deep-3d",
                                                       "combined"]


def test_hcc_recipe(inputs: Path, tmp_path: Path) -> None:
    run, work = _run("hcc", inputs, tmp_path)
    compare = _check(run, work)
    assert compare["endpoint"] == "binary"
    mvi = json.loads((work / "mvi.json").read_text())
    assert len(mvi["auc_ci"]) == 2 and mvi["calibration"] and mvi["net_benefit"]
    assert _auc(compare, "mvi-combined") > _auc(compare, "mvi-clinical")
