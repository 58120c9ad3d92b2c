"""Dual-phase study: registration recovers a known shift; the node-less pipeline run gives both phases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.base import PipelineContext, SeriesInput
from pipelines.common.volume import load_series
from pipelines.dualphase.registration import PhaseRegistration, RegistrationInput
from pipelines.registry import create
from pipelines.roi import RoiToMask
from pipelines.roi.geometry import to_sitk
from tests.phantoms import IDENTITY, sphere_phantom, write_ct, write_seg

SPACING = (2.5, 1.0, 1.0)
SHIFT = (-3.3, 2.7, 2.0)  # x, y, z mm: the anatomy moved between the phases


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("dual")
    shape = (20, 80, 80)
    centre = (9.0, 36.0, 44.0)
    pv_hu, tumour = sphere_phantom(shape, SPACING, 10.0, centre=centre, tumour_hu=60.0, seed=1)
    art_hu, _ = sphere_phantom(shape, SPACING, 10.0, centre=centre, tumour_hu=140.0, seed=2)
    import hashlib

    study_uid = "1.2.826.0.1.3680043.8.498." + str(int(hashlib.sha1(b"dual").hexdigest()[:12], 16))
    for_uid = study_uid + ".9"
    origin = (-40.0, -40.0, 0.0)
    pv = write_ct(pv_hu, SPACING, root / "pv", origin=origin, study_uid=study_uid, frame_of_reference=for_uid,
                  description="PORTAL VENOUS", series_number=3)
    art = write_ct(art_hu, SPACING, root / "art", study_uid=study_uid, frame_of_reference=for_uid,
                   origin=(origin[0] + SHIFT[0], origin[1] + SHIFT[1], origin[2] + SHIFT[2]),
                   description="ARTERIAL", series_number=2)
    seg = write_seg(pv, tumour, root / "seg.dcm")
    return {"pv": pv, "art": art, "seg": seg, "tumour": tumour}


def test_registration_recovers_known_shift(study: dict[str, object]) -> None:
    pv, art = load_series(study["pv"]), load_series(study["art"])  # type: ignore[arg-type]
    roi = RoiToMask().run(study["seg"], pv)  # type: ignore[arg-type]
    res = PhaseRegistration().run(RegistrationInput(to_sitk(pv), to_sitk(art), roi.mask))
    voxel = (SPACING[2], SPACING[1], SPACING[0])  # x, y, z
    for got, want, v in zip(res.translation_mm, SHIFT, voxel, strict=True):
        assert abs(got - want) < v, (res.translation_mm, SHIFT)


def test_dual_phase_pipeline(study: dict[str, object], tmp_path: Path) -> None:
    ctx = PipelineContext(
        series=(SeriesInput("", "", tuple(study["art"]), role="arterial"),  # type: ignore[arg-type]
                SeriesInput("", "", tuple(study["pv"]), role="portal")),  # type: ignore[arg-type]
        work_dir=tmp_path, identity=IDENTITY, extra_files=(study["seg"],),  # type: ignore[arg-type]
    )
    out = create("dual-phase", {}).run(ctx)
    assert out.evaluable, out.reason
    f = out.summary["features"]
    assert out.summary["reference_phase"] == "pv"
    for prefix in ("art_intra_", "art_ring3_", "art_ring9_", "pv_intra_", "pv_ring6_", "fat_"):
        assert any(k.startswith(prefix) for k in f), prefix
    # Registered arterial tumour is bright where the ROI is: enhancement ~ 140 - 60 HU.
    assert f["enh_art_minus_pv_hu"] == pytest.approx(80.0, abs=15.0)
    assert f["art_intra_firstorder_Mean"] > f["pv_intra_firstorder_Mean"] + 50
    assert np.allclose([f["reg_shift_x_mm"], f["reg_shift_y_mm"], f["reg_shift_z_mm"]], SHIFT, atol=1.0)
    assert (tmp_path / "features.csv").is_file()


def test_missing_phase_not_evaluable(study: dict[str, object], tmp_path: Path) -> None:
    ctx = PipelineContext(series=(SeriesInput("", "", tuple(study["pv"]), role="portal"),),  # type: ignore[arg-type]
                          work_dir=tmp_path, identity=IDENTITY, extra_files=(study["seg"],))  # type: ignore[arg-type]
    out = create("dual-phase", {}).run(ctx)
    assert not out.evaluable and "arterial" in out.reason
