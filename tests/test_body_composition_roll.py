"""The spine's roll (pipelines/body_composition/roll.py): a patient lying turned on the table.

The anatomical phantom turned about the head-feet axis (``AnatomySpec.roll_deg``): the roll measured from the
vertebra's mirror symmetry, the masks turned back and forth, and the segmenter with and without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, Anatomy, AnatomySpec, make_anatomy
from pipelines.body_composition.roll import (
    RollParams,
    SpineRoll,
    measure_roll,
    turn_back,
    turn_forward,
    turned_anatomy,
)
from pipelines.body_composition.types import SliceAnatomy


@pytest.fixture(scope="module")
def lumbar() -> dict[float, Anatomy]:
    """L2-L4 of the average phantom, unturned and turned 10 degrees each way (256 x 256 at 5 mm)."""
    return {deg: make_anatomy(AnatomySpec(top="L2", bottom="L4", rows=256, slice_mm=5.0, seed=3, roll_deg=deg))
            for deg in (0.0, 10.0, -10.0)}


def test_roll_measured_from_the_vertebra_follows_the_patient_turn(lumbar: dict[float, Anatomy]) -> None:
    p = RollParams()
    measured = {}
    for deg, ph in lumbar.items():
        k, anat = ph.at_level("L3")
        votes = [measure_roll(ph.hu[kk], (ph.spec.pixel_mm,) * 2, anat, p) for kk in (k - 1, k, k + 1)]
        assert all(v is not None and v[1] >= p.min_score for v in votes), (deg, votes)
        measured[deg] = float(np.median([v[0] for v in votes if v is not None]))
    # the VerSe spine inside the phantom has its own small roll: the turn is the difference
    assert abs(measured[0.0]) < p.min_deg
    assert measured[10.0] - measured[0.0] == pytest.approx(10.0, abs=1.5)
    assert measured[-10.0] - measured[0.0] == pytest.approx(-10.0, abs=1.5)


def test_no_bone_no_roll() -> None:
    hu = np.full((64, 64), 40.0, np.float32)
    assert measure_roll(hu, (1.0, 1.0), SliceAnatomy((32.0, 32.0), 15.0, 12.0), RollParams()) is None


def test_turn_back_and_forward_are_inverse_about_the_centre() -> None:
    """A bar along a line turned 12 degrees toward the patient's left runs down the rows once turned back, and
    a mask drawn on the turned slice lands back where the bar was."""
    spacing = (0.8, 0.7)  # anisotropic pixels: the turn is in mm
    rows, cols = 200, 220
    centre = (80.0, 110.0)
    t = np.deg2rad(12.0)
    rr, cc = np.mgrid[:rows, :cols]
    y, x = (rr - centre[0]) * spacing[0], (cc - centre[1]) * spacing[1]
    along = y * np.cos(t) + x * np.sin(t)  # mm along the turned posterior axis
    across = -y * np.sin(t) + x * np.cos(t)
    bar = (np.abs(across) <= 4.0) & (along >= 10.0) & (along <= 60.0)
    hu = np.where(bar, 400.0, -100.0).astype(np.float32)
    back = turn_back(hu, spacing, centre, 12.0)
    drawn = back > 150.0
    r, c = np.nonzero(drawn)
    assert np.abs((c - centre[1]) * spacing[1]).max() <= 5.0  # straight down the rows, within a pixel of 4 mm
    assert (r - centre[0]).min() * spacing[0] >= 8.0
    fw = turn_forward(drawn, spacing, centre, 12.0)
    assert 2 * (fw & bar).sum() / (fw.sum() + bar.sum()) > 0.9
    # the canal behind the centre on the turned axis is straight behind it once turned back
    canal = (centre[0] + 30.0 * np.cos(t) / spacing[0], centre[1] + 30.0 * np.sin(t) / spacing[1])
    a = turned_anatomy(SliceAnatomy(centre, 15.0, 12.0, canal_rc=canal), spacing, 12.0)
    assert a.canal_rc is not None and a.centre_rc == centre
    assert a.canal_rc[1] == pytest.approx(centre[1], abs=0.05)
    assert (a.canal_rc[0] - centre[0]) * spacing[0] == pytest.approx(30.0, abs=0.05)


def test_spine_roll_smooths_and_applies_only_above_its_threshold(lumbar: dict[float, Anatomy]) -> None:
    for deg, ph in lumbar.items():
        k, anat = ph.at_level("L3")

        def same(_k: int, a: SliceAnatomy = anat) -> SliceAnatomy:
            return a

        sr = SpineRoll(ph.hu, (ph.spec.pixel_mm,) * 2, ph.spec.slice_mm, same)
        at = sr.at(k)
        if deg == 0.0:
            assert at == 0.0  # below min_deg: the stored slice, untouched
        else:
            assert at == pytest.approx(deg, abs=3.0)
        off = SpineRoll(ph.hu, (ph.spec.pixel_mm,) * 2, ph.spec.slice_mm, same, RollParams(enabled=False))
        assert off.at(k) == 0.0


def test_rolled_patient_segmented_along_its_spine(tmp_path: Path) -> None:
    """The whole pipeline's stages on a written series of a patient turned 10 degrees: with the roll the erector
    and psoas follow the anatomy (each side's Dice at the level slice), and the note says the slice was turned."""
    from pipelines.body_composition.anatomy_phantom import Geometry, write_series
    from pipelines.body_composition.stages import ClassicalBackend, LevelFinder, SegmentInput, TissueSegmenter
    from pipelines.common.volume import load_series

    ph = make_anatomy(AnatomySpec(rows=256, slice_mm=5.0, seed=3, roll_deg=12.0))
    truth = write_series(ph, tmp_path / "ct", Geometry("HFS"))
    vol = load_series(truth.files).canonical_axial()[0]
    be = ClassicalBackend()
    level = LevelFinder(be, ("L3",)).run(vol)
    assert level.level == "L3" and level.slice_index is not None
    k = level.slice_index
    dice = {}
    for on in (False, True):
        seg = TissueSegmenter(be, roll=RollParams(enabled=on)).run(SegmentInput(vol, level))
        assert any("spine roll of +" in n for n in seg.slice_seg.notes) == on
        for key in ("erector_left", "erector_right", "psoas_left", "psoas_right"):
            t = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION[key]])
            m = seg.slice_seg.masks[key]
            dice[on, key] = 2.0 * float((m & t).sum()) / float(m.sum() + t.sum())
            if on and seg.volume_range is not None:  # the 3D masks are turned back too: the level slice's holds
                assert np.array_equal(seg.volume_masks[key][k], m)
    for key in ("erector_left", "erector_right", "psoas_left", "psoas_right"):
        assert dice[True, key] >= 0.88, (key, dice)
    assert min(dice[True, k] for k in ("erector_left", "erector_right")) > min(
        dice[False, k] for k in ("erector_left", "erector_right")) + 0.02, dice


def test_shoulder_girdle_of_a_turned_neck_is_no_iliac_crest(tmp_path: Path) -> None:
    """The anatomical neck (gl017) turned 10 degrees put big bone beside T1-T2 at the bottom of the field of view on
    both sides (scapulae, clavicles, humeral heads): the finder called it an iliac crest.  Vertebral bodies that
    narrow are not L4-S1: no such anchor (``LevelParams.crest_min_body_hw_mm``), and the notes say why."""
    from pipelines.body_composition.anatomy_phantom import Geometry, write_series
    from pipelines.body_composition.levels import SpineLevelFinder
    from pipelines.common.volume import load_series

    ph = make_anatomy(AnatomySpec(region="neck", spine="gl017", rows=160, slice_mm=3.0, roll_deg=-10.0))
    vol = load_series(write_series(ph, tmp_path / "ct", Geometry("HFS")).files).canonical_axial()[0]
    level = SpineLevelFinder().run(vol, ("L3", "C3"))
    assert "iliac crest" not in [a.name for a in level.anchors]
    assert level.level != "L3"
    assert any("shoulder girdle" in n for n in level.notes), level.notes


def test_turned_neck_parted_along_its_spine_at_c3(tmp_path: Path) -> None:
    """C3 on the anatomical neck turned 10 degrees (a head turned on the table), stored with mirrored rows: the roll is
    measured from the cervical vertebra, and left, right, beside and behind it are taken along its axes (the pixel
    grid's coordinates turned, the slice not resampled).  The paravertebral muscles' worse side gains over the
    stored axes, each side's Dice holds, and the note says the roll was applied."""
    from pipelines.body_composition.anatomy_phantom import Geometry, write_series
    from pipelines.body_composition.reader_level import LevelOverride, level_from_override
    from pipelines.body_composition.stages import ClassicalBackend, LevelFinder, SegmentInput, TissueSegmenter
    from pipelines.common.volume import load_series

    ph = make_anatomy(AnatomySpec(region="neck", rows=160, slice_mm=3.0, roll_deg=10.0))
    truth = write_series(ph, tmp_path / "ct", Geometry("HFS", mirror_rows=True))
    vol = load_series(truth.files).canonical_axial()[0]
    be = ClassicalBackend()
    # the finder does not name C3 on this phantom (one anchor): the level as a reader confirms it
    marker = {"level": "C3", "sop_instance_uid": truth.sop_uids[truth.level_slices["C3"]], "reader": "Reader^Rita",
              "source": "cli", "time": "2026-12-06T10:00:00Z"}
    level = level_from_override(vol, LevelOverride.from_mapping(marker, "test"), LevelFinder(be, ("C3",)).run(vol))
    assert level.level == "C3" and level.slice_index is not None
    k = level.slice_index
    dice = {}
    for on in (False, True):
        seg = TissueSegmenter(be, roll=RollParams(enabled=on)).run(SegmentInput(vol, level))
        assert any("spine roll of +" in n for n in seg.slice_seg.notes) == on, seg.slice_seg.notes
        for key in ("paravertebral_left", "paravertebral_right"):
            t = ph.labels[k] == LABELS[key]
            m = seg.slice_seg.masks[key]
            dice[on, key] = 2.0 * float((m & t).sum()) / float(m.sum() + t.sum())
        assert seg.slice_seg.masks["skeletal_muscle"].any()
    sides = ("paravertebral_left", "paravertebral_right")
    assert min(dice[True, s] for s in sides) >= 0.78, dice
    assert min(dice[True, s] for s in sides) > min(dice[False, s] for s in sides) + 0.03, dice
