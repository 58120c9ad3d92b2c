"""``prognode cohort features``: table from a folder of studies, errors recorded, resumable."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipelines.radiomics.cohort import main
from tests.phantoms import sphere_phantom, write_ct, write_seg

SPACING = (2.5, 1.0, 1.0)


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


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_cohort_features_resumable(cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "features.csv"
    assert main(["cohort", "features", str(cohort), "--out", str(out), "--no-progress"]) == 0
    assert "2 extracted, 0 already" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["study"] for r in rows] == ["s0", "s1"]
    assert float(rows[1]["intra_shape_VoxelVolume"]) > float(rows[0]["intra_shape_VoxelVolume"])
    assert all(rows[0][k] for k in ("intra_firstorder_Mean", "ring3_glcm_Contrast", "ring9_firstorder_Mean"))
    errors = _rows(out.with_name("features.errors.csv"))
    assert [e["study"] for e in errors] == ["s9_no_roi"] and "no SEG or RTSTRUCT" in errors[0]["reason"]

    # Interrupted run: only s0 in the table -> the re-run does s1 alone and keeps s0 untouched.
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow(rows[0])
    assert main(["cohort", "features", str(cohort), "--out", str(out), "--no-progress"]) == 0
    assert "1 extracted, 1 already" in capsys.readouterr().out
    again = _rows(out)
    assert [r["study"] for r in again] == ["s0", "s1"] and again[0] == rows[0]
    assert np.isclose(float(again[1]["intra_firstorder_Mean"]), float(rows[1]["intra_firstorder_Mean"]))


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
