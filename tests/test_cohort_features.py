"""``prognode cohort features``: every family per study folder, provenance, errors, resumable; ``cohort join``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipelines.radiomics.cohort import main
from tests.cohort_phantoms import abdomen_study, dual_phase_study, encoder_weights, sphere_study
from tests.phantoms import sphere_phantom, write_ct, write_seg

SPACING = (2.5, 1.0, 1.0)
DEEP = ["--deep-arch", "resnet10"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    for i, radius in enumerate((7.0, 9.0)):
        hu, tumour = sphere_phantom((12, 48, 48), SPACING, radius, seed=i, tumour_hu=50 + 10 * i)
        ct = write_ct(hu, SPACING, root / f"s{i}" / "ct", patient_id=f"P{i}")
        write_seg(ct, tumour, root / f"s{i}" / "seg.dcm")
    hu, _ = sphere_phantom((12, 48, 48), SPACING, 7.0)
    write_ct(hu, SPACING, root / "s9_no_roi" / "ct")  # a study without a ROI
    return root


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spine phantom with a tumour, a dual-phase study, a tumour without a spine, an empty folder."""
    root = tmp_path_factory.mktemp("families")
    abdomen_study(root / "abdomen", 0)
    dual_phase_study(root / "dual", 1, enhancement_hu=80.0)
    sphere_study(root / "sphere", 2)
    (root / "empty").mkdir()
    return root


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["study"]: r for r in csv.DictReader(f)}


def test_radiomics_family_resumable(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "features.csv"
    args = ["cohort", "features", str(cohort), "--out", str(out), "--no-progress", "--families", "radiomics"]
    assert main(args) == 0
    assert "2 extracted, 0 already" in capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == ["s0", "s1", "s9_no_roi"]
    s0, s1 = rows["s0"], rows["s1"]
    assert float(s1["intra_shape_VoxelVolume"]) > float(s0["intra_shape_VoxelVolume"])
    assert all(s0[k] for k in ("intra_firstorder_Mean", "ring3_glcm_Contrast", "ring9_firstorder_Mean"))
    assert s0["families"] == "radiomics" and not s0["error"] and s0["rad_pipeline"] == "tumour-radiomics"
    assert len(s0["rad_params_sha256"]) == 64 and s0["param_hash"] == s1["param_hash"]
    assert "bc_pipeline" not in s0  # not requested
    assert "radiomics: no SEG or RTSTRUCT" in rows["s9_no_roi"]["error"]  # named in --families: an error

    # Interrupted run: only s0 in the table -> the re-run does s1 (and retries the failed study).
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(s0))
        w.writeheader()
        w.writerow(s0)
    assert main(args) == 0
    assert "1 extracted, 1 already" in capsys.readouterr().out
    again = _rows(out)
    assert list(again) == ["s0", "s1", "s9_no_roi"] and again["s0"] == s0
    assert np.isclose(float(again["s1"]["intra_firstorder_Mean"]), float(s1["intra_firstorder_Mean"]))

    # Another parameter (annular rings) is another hash: every study is extracted again.
    assert main([*args, "--rings-mode", "annular"]) == 0
    assert "2 extracted, 0 already" in capsys.readouterr().out
    third = _rows(out)
    assert third["s0"]["param_hash"] != s0["param_hash"]
    assert float(third["s0"]["ring6_firstorder_Mean"]) != float(s0["ring6_firstorder_Mean"])


def test_every_family_without_weights(families: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "all.csv"
    assert main(["cohort", "features", str(families), "--out", str(out), "--no-progress", *DEEP]) == 0
    assert "3 extracted, 0 already in" in capsys.readouterr().out
    rows = _rows(out)
    a = rows["abdomen"]
    assert a["families"] == "body-composition,radiomics,deep" and not a["error"]
    assert (a["bc_pipeline"], a["bc_level"], a["bc_level_source"], a["bc_model"]) == (
        "body-composition", "L3", "automatic", "classical")
    assert a["bc_level_sop_instance_uid"] and a["bc_pipeline_version"]
    assert 5.0 < float(a["bc_psoas_left_area_cm2"]) < 12.0 and float(a["bc_smi"]) > 0
    assert float(a["intra_shape_VoxelVolume"]) > 0 and a["rad_roi_source"] == "SEG"
    # no pretrained weights: said so, and not one deep feature column
    assert a["deep_weights"].startswith("none: ") and "random init is not signal" in a["deep_weights"]
    assert not any(k.startswith(("deep2d_", "deep3d_")) for k in a)
    d = rows["dual"]
    assert d["families"] == "body-composition,radiomics,dual-phase,deep" and not d["error"]
    assert abs(float(d["enh_art_minus_pv_hu"]) - 80.0) < 10.0 and abs(float(d["reg_shift_x_mm"]) - 2.0) < 1.0
    assert d["dp_pipeline"] == "dual-phase" and d["dp_reference_phase"] == "pv"
    assert "level-finder" in d["bc_not_evaluable"]  # no spine: a result that says why, not an error
    s = rows["sphere"]
    assert s["families"] == "body-composition,radiomics,deep" and float(s["intra_firstorder_Mean"]) > 0
    assert rows["empty"]["error"] == "study: no CT series in the study folder"

    # a family named in --families that does not apply is an error of that study only
    out2 = tmp_path / "dp.csv"
    assert main(["cohort", "features", str(families), "--out", str(out2), "--no-progress",
                 "--families", "dual-phase"]) == 0
    rows2 = _rows(out2)
    assert not rows2["dual"]["error"] and "dual-phase: not one arterial" in rows2["sphere"]["error"]


def test_deep_features_of_tumour_and_muscles(families: Path, tmp_path: Path) -> None:
    weights = encoder_weights(tmp_path / "weights", dims=(2,))
    out = tmp_path / "deep.csv"
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "abdomen").symlink_to(families / "abdomen")
    base = ["cohort", "features", str(tmp_path / "one"), "--out", str(out), "--no-progress", *DEEP,
            "--deep-size", "48", "24",
            "--families", "body-composition,deep", "--weights-2d", str(weights["deep2d"])]
    assert main(base) == 0
    a = _rows(out)["abdomen"]
    assert a["deep_rois"] == "tumour,psoas_left,psoas_right,erector_left,erector_right"
    assert "2d: resnet10_2d.safetensors sha256" in a["deep_weights"] and "3d: none: " in a["deep_weights"]
    cols2 = [k for k in a if k.startswith("deep2d_")]
    assert len(cols2) == 5 * 512 and not any(k.startswith("deep3d_") for k in a)
    left, right = (np.array([float(a[f"deep2d_{m}_{i:03d}"]) for i in range(512)]) for m in ("psoas_left", "tumour"))
    assert np.isfinite(left).all() and not np.allclose(left, right)


def test_reader_confirmed_level(families: Path, tmp_path: Path) -> None:
    auto = tmp_path / "auto.csv"
    assert main(["cohort", "features", str(families), "--out", str(auto), "--no-progress",
                 "--families", "body-composition"]) == 0
    a = _rows(auto)["abdomen"]
    levels = tmp_path / "levels.csv"
    levels.write_text(f"study,level,sop_instance_uid,reader\nabdomen,L3,{a['bc_level_sop_instance_uid']},Doe^Jane\n")
    out = tmp_path / "reader.csv"
    assert main(["cohort", "features", str(families), "--out", str(out), "--no-progress",
                 "--families", "body-composition", "--reader-levels", str(levels)]) == 0
    r = _rows(out)["abdomen"]
    assert (r["bc_level_source"], r["bc_reader"]) == ("reader-confirmed", "Doe^Jane")
    assert r["param_hash"] != a["param_hash"] and r["bc_level_sop_instance_uid"] == a["bc_level_sop_instance_uid"]
    assert float(r["bc_psoas_left_area_cm2"]) == pytest.approx(float(a["bc_psoas_left_area_cm2"]))


def test_join_features_and_outcomes(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "features.csv"
    assert main(["cohort", "features", str(cohort), "--out", str(out), "--no-progress", "--families", "radiomics"]) == 0
    outcomes = tmp_path / "outcomes.csv"
    outcomes.write_text("patient,time,event\ns0,100,1\ns1,200,0\ns9_no_roi,300,1\nx,5,1\n")
    joined = tmp_path / "cohort.csv"
    assert main(["cohort", "join", "--features", str(out), "--outcomes", str(outcomes), "--outcome-key", "patient",
                 "--out", str(joined)]) == 0
    text = capsys.readouterr().out
    assert "2 studies with features and outcomes" in text and "outcomes only: ['s9_no_roi', 'x']" in text
    with joined.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["study"] for r in rows] == ["s0", "s1"] and rows[0]["time"] == "100"
    assert "rad_pipeline" not in rows[0] and "param_hash" not in rows[0] and "intra_firstorder_Mean" in rows[0]


def test_cohort_group_shared_with_survival_cli() -> None:
    """Both extensions add to one `cohort` group, in either order (node/cli.py EXTENSIONS)."""
    import argparse

    from pipelines.radiomics.cohort import register
    from pipelines.survival.cli import register as survival_register

    for order in ((register, survival_register), (survival_register, register)):
        parser = argparse.ArgumentParser(prog="prognode")
        sub = parser.add_subparsers(dest="command", required=True)
        for reg in order:
            reg(sub)
        args = parser.parse_args(["cohort", "features", "studies", "--out", "f.csv"])
        assert args.cohort_command == "features"
        assert parser.parse_args(["cohort", "split", "--data", "d.csv", "--out-dir", "o"]).cohort_command == "split"
