"""Tissues bounded by anatomy, C3 by its own definition, and the gates that stop wrong numbers.

Real CT: the shared TotalSegmentator example (T11-T12, contrast, the patient's right arm
touching the trunk) with TotalSegmentator's labels as reference.  Synthetic: a schematic C3
neck slice with truth (tests/neck_slice.py) and hand-made values for the gates.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from numpy.typing import NDArray

from pipelines.body_composition.plausibility import apply_gates, load_gates
from pipelines.body_composition.reference import PatientFactors, load_table
from pipelines.body_composition.stages import Measure, MeasureInput
from pipelines.body_composition.tissues import (
    TissueParams,
    TissueSlicer,
    bony_landmarks,
    lumbar_named,
    process_reach_mm,
    with_neighbours,
)
from pipelines.body_composition.types import (
    C3_KEYS,
    L3_KEYS,
    LevelResult,
    Segmentation,
    SideBone,
    SliceAnatomy,
    SliceSegmentation,
    Value,
    Vertebra,
)
from tests.peers import REPO
from tests.schematic_slices import neck_slice, trunk_with_arm

if TYPE_CHECKING:
    from pipelines.body_composition.anatomy_phantom import Anatomy

LIVER, SPLEEN, STOMACH = 5, 1, 6
HUMERUS = (69, 70)


@pytest.fixture(scope="module")
def real_ct(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    sys.path.insert(0, str(REPO / "bench"))
    from body_composition_agreement import with_uids

    from pipelines.body_composition.labels import read_labels_on_volume
    from pipelines.body_composition.levels import SpineLevelFinder
    from pipelines.common.volume import load_series

    base = shared_data / "totalseg_example_ct_dicom"
    vol = load_series(with_uids(base / "dicom", tmp_path_factory.mktemp("realct"))).canonical_axial()[0]
    ref = read_labels_on_volume(base / "example_seg_dicom.nii.gz", vol)
    lr = SpineLevelFinder().run(vol, ("L3",))  # no anchor in view (T11-T12): the vertebrae stay unnamed
    return SimpleNamespace(vol=vol, ref=ref, level=lr)


def _anat(real_ct: Any, k: int) -> SliceAnatomy:
    from pipelines.body_composition.levels import anatomy_for_slice

    return anatomy_for_slice(real_ct.level, k)


def _anatomy(**spec: Any) -> Anatomy:
    """The anatomical phantom of these ``AnatomySpec`` fields; the test is skipped where the VerSe masks it is built
    on are missing."""
    from pipelines.body_composition.anatomy_phantom import AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    return make_anatomy(AnatomySpec(**spec))


def _dice(a: np.ndarray, b: np.ndarray) -> float:  # type: ignore[type-arg]
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


# --- real CT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 9, 18])
def test_real_ct_organs_and_arm_are_not_muscle_or_sat(real_ct: Any, k: int) -> None:
    """Liver, spleen and stomach touch the wall but are not muscle; the right arm touches the trunk but is cut off."""
    vol, ref = real_ct.vol, real_ct.ref
    px = vol.pixel_area_mm2 / 100.0
    seg = TissueSlicer().run(vol.hu[k], vol.pixel_spacing, _anat(real_ct, k), "L3")
    muscle = seg.masks["skeletal_muscle"]
    for organ in (LIVER, SPLEEN, STOMACH):
        assert (ref[k] == organ).sum() * px > 15.0  # the organ is on the slice
        assert float((muscle & (ref[k] == organ)).sum()) * px < 4.0, organ  # was 8-180 cm2 per organ
        for key in ("sat", "vat", "imat"):  # fat-density gastric content and label edges: a few cm2 at most
            assert float((seg.masks[key] & (ref[k] == organ)).sum()) * px < 3.0, (organ, key)
    # both arms (one lying apart, one touching the trunk from slice 1 on) are limbs, never trunk tissue
    humerus = np.isin(ref[k], HUMERUS)
    assert humerus.sum() > 200 and not (seg.body & humerus).any()
    assert seg.limbs is not None and 90.0 < float(seg.limbs.sum()) * px < 130.0  # both arms, ~50 + ~55 cm2 (no table)
    for key in ("skeletal_muscle", "sat", "vat", "imat"):
        assert not (seg.masks[key] & seg.limbs).any(), key
    # the paraspinal compartment is muscle: most of TotalSegmentator's autochthon is in the muscle mask
    auto = np.isin(ref[k], (86, 87))
    assert float((muscle & auto).sum()) > 0.8 * float(auto.sum())
    # and the whole-slice muscle is a plausible share of the trunk (it was ~0.7 with the liver in it)
    assert seg.body_area_cm2 is not None and 0.1 < float(muscle.sum()) * px / seg.body_area_cm2 < 0.4


UNENHANCED = ((LIVER, 55.0), (SPLEEN, 45.0), (52, 40.0), (63, 40.0), (64, 40.0), (7, 40.0))  # organ, vessel HU


def unenhanced(hu: np.ndarray, ref: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    """The contrast series as if unenhanced: liver, spleen, pancreas and the great vessels shifted to muscle-like HU."""
    out = hu.copy()
    for lab, target in UNENHANCED:
        m = ref == lab
        if m.any():
            out[m] = hu[m] - float(np.median(hu[m])) + target
    return out


@pytest.mark.parametrize("k", [0, 9])
def test_real_ct_unenhanced_organs_are_not_muscle(real_ct: Any, k: int) -> None:
    """Without contrast, HU cannot tell liver, spleen or aorta from muscle: the geometry (bulk, depth, position) must."""
    vol, ref = real_ct.vol, real_ct.ref
    px = vol.pixel_area_mm2 / 100.0
    hu = unenhanced(vol.hu[k], ref[k])
    assert abs(float(np.median(hu[ref[k] == LIVER])) - 55.0) < 1.0
    seg = TissueSlicer().run(hu, vol.pixel_spacing, _anat(real_ct, k), "L3")
    muscle = seg.masks["skeletal_muscle"]
    for organ in (LIVER, SPLEEN, STOMACH, 52):
        assert float((muscle & (ref[k] == organ)).sum()) * px < 4.0, organ


def test_real_ct_erector_agrees_with_totalsegmentator(real_ct: Any) -> None:
    """Erector spinae (paraspinal compartment) against TotalSegmentator's autochthon, every slice counted."""
    vol, ref = real_ct.vol, real_ct.ref
    scores: dict[str, list[float]] = {"erector_left": [], "erector_right": []}
    p = TissueParams()

    @functools.cache
    def landmarks(kk: int) -> tuple[SideBone, SideBone]:
        return bony_landmarks(vol.hu[kk], vol.pixel_spacing, _anat(real_ct, kk), p)

    for k in range(0, vol.shape[0], 2):
        # as the pipeline's stage does: each slice with the bony landmarks of the slices within half a pitch
        anat = with_neighbours(_anat(real_ct, k), k, landmarks, vol.shape[0], vol.slice_spacing, p,
                               process_reach_mm(real_ct.level, k, vol.slice_spacing, p))
        ours = lumbar_named(vol.hu[k], vol.pixel_spacing, anat, p)
        for key, lab in (("erector_left", 86), ("erector_right", 87)):
            r = ref[k] == lab
            if r.any():
                scores[key].append(_dice(ours[key], r) if ours[key].any() else 0.0)
    # With the anatomy the pipeline uses (levels.SpineLevelFinder: vertebral body centre on the canal's
    # midline) these 10 slices give left 0.822, right 0.852 with a slice between two ribs bounded by the ribs of
    # its neighbours (tissues._wall); 0.810 / 0.847 before, with the erector as its compartment (outline
    # smoothed by a pixel, fat clefts narrower than 8 mm in: tissues._outline); 0.792 (min 0.75) /
    # 0.825 (min 0.78) before, with muscle-window pixels only; 0.794 / 0.825 with the
    # nearest slice's process tip instead of each process's longest reach; 0.780 / 0.822 with a
    # fixed reach of 10 mm (tp_context_mm) instead of half the vertebral pitch; 0.731 / 0.820 before a
    # slice without a transverse process took the process tip and floor of the nearest slices with one
    # (it had the fixed 70 mm lateral bound and its pedicle as floor); 0.722 / 0.811 before the
    # back surface was taken as the subcutaneous fat only (not intramuscular clefts joined to it by a thin
    # channel along the spinous process: sat_channel_mm); 0.712 / 0.802 before the
    # transverse process was taken behind the body's wall (not against the body's width) and the body's
    # width across its anterior half.  With the old finder's anatomy (a bone centroid ~9 mm off the midline
    # on this series, which narrowed the left compartment and widened the right) they gave 0.760 / 0.764;
    # 0.688 / 0.727 with the old segmenter.  The Done-when bar of 0.90 is NOT reached on this T11-T12
    # series (6-10 % of TotalSegmentator's autochthon is fat by HU, which muscle never holds).
    floor = {"erector_left": 0.815, "erector_right": 0.845}
    for key, s in scores.items():
        assert len(s) >= 10, key
        assert float(np.mean(s)) > floor[key] and min(s) > 0.7, (key, s)


def test_noise_estimate_reads_white_noise() -> None:
    from pipelines.body_composition.tissues import noise_hu

    rng = np.random.default_rng(0)
    flat = np.where(np.arange(200)[None, :] < 100, 40.0, -100.0) + np.zeros((200, 1))  # muscle beside fat
    for sd in (0.0, 10.0, 30.0):
        got = noise_hu((flat + rng.normal(0.0, sd, flat.shape)).astype(np.float32))
        assert abs(got - sd) < 0.1 * sd + 0.5, (sd, got)


def test_low_dose_noise_does_not_break_the_named_muscles(real_ct: Any) -> None:
    """Pixel noise of low-dose CT (white noise of 30 HU added to the real CT) broke the erector apart (Dice 0.52
    against TotalSegmentator); the named muscles are now found on a smoothed copy, and the slice says so."""
    vol, ref = real_ct.vol, real_ct.ref
    rng = np.random.default_rng(0)
    p = TissueParams()
    scores: dict[str, list[float]] = {"erector_left": [], "erector_right": []}
    unsmoothed: dict[str, list[float]] = {"erector_left": [], "erector_right": []}
    for k in (4, 10, 16):
        hu = (vol.hu[k] + rng.normal(0.0, 30.0, vol.hu[k].shape)).astype(np.float32)
        seg = TissueSlicer(p).run(hu, vol.pixel_spacing, _anat(real_ct, k), "L3")
        raw = TissueSlicer(replace(p, noise_smooth_above_hu=1e9)).run(hu, vol.pixel_spacing, _anat(real_ct, k), "L3")
        assert any("image noise" in n for n in seg.notes), seg.notes
        for key, lab in (("erector_left", 86), ("erector_right", 87)):
            scores[key].append(_dice(seg.masks[key], ref[k] == lab))
            unsmoothed[key].append(_dice(raw.masks[key], ref[k] == lab))
        # each pixel's tissue is read from the slice as it is: smoothing decides the regions only
        assert not (seg.masks["skeletal_muscle"] & ((hu < -29) | (hu > 150))).any()
        assert not (seg.masks["sat"] & ((hu < -190) | (hu > -30))).any()
        # the regions hold: organs stay out of muscle, and speckle does not close the envelope across the SAT
        # (with the regions on the noisy slice: liver and spleen 10-11 cm2 in muscle, SAT halved)
        clean = TissueSlicer(p).run(vol.hu[k], vol.pixel_spacing, _anat(real_ct, k), "L3")
        px = vol.pixel_area_mm2 / 100.0
        assert float((seg.masks["skeletal_muscle"] & np.isin(ref[k], (LIVER, SPLEEN))).sum()) * px < 4.0
        assert seg.masks["sat"].sum() > 0.8 * clean.masks["sat"].sum()
    # bench (all 20 slices, with the neighbours' landmarks and ribs): 0.799 / 0.846, against 0.817 / 0.845 without
    # noise (0.775 / 0.838 and 0.804 / 0.840 before a slice between two ribs took its neighbours' ribs),
    # and 0.523 / 0.525 with noise and no smoothing.  These 3 slices alone: 0.71 / 0.85 against 0.48 / 0.58
    for key in scores:
        assert np.mean(scores[key]) > 0.65 and np.mean(scores[key]) > np.mean(unsmoothed[key]) + 0.15, (
            scores, unsmoothed)
    quiet = TissueSlicer(p).run(vol.hu[10], vol.pixel_spacing, _anat(real_ct, 10), "L3")
    assert not any("image noise" in n for n in quiet.notes)  # this diagnostic CT (about 12 HU) is left as it is


def test_a_slice_between_transverse_processes_takes_the_nearest_ones_within_reach() -> None:
    """Landmarks come from slices within reach only and are interpolated along the spine between the process
    above and the one below: the floor from the nearest slice, the tip as the longest reach of each."""
    from pipelines.body_composition.tissues import _carried

    p = TissueParams()  # tp_context_mm 10
    tips = {1: 50.0, 3: 30.0, 4: 32.0, 12: 40.0, 13: 60.0}  # slice -> left process tip (mm); 2 mm slices

    def landmarks(kk: int) -> tuple[SideBone, SideBone]:
        t = tips.get(kk)
        return (SideBone(t, (t,) * 86) if t is not None else SideBone(None)), SideBone(None)

    anat = with_neighbours(SliceAnatomy((0.0, 0.0), 20.0, 15.0), 8, landmarks, 20, 2.0, p)
    # the reach is +-5 slices (10 mm): slices 3, 4, 12 and 13; slice 1 (14 mm away) is out of reach
    assert sorted(nb.dz_mm for nb in anat.neighbours) == [-10.0, -8.0, 8.0, 10.0]
    carried = _carried(anat.neighbours, "left", p)
    assert carried is not None
    # below: slices 3 and 4 (longest 32 mm; nearest slice 4, 8 mm away); above: slices 12 and 13 (longest
    # 60 mm; nearest slice 12, 8 mm away): equal weights
    assert carried[0] == pytest.approx(46.0)
    assert carried[1][0] == pytest.approx(36.0)  # the floors of slices 4 (32) and 12 (40)
    assert _carried(anat.neighbours, "right", p) is None  # no process on that side: the fixed bound stays
    # one side only within reach: that slice's landmarks as they are
    only = with_neighbours(SliceAnatomy((0.0, 0.0), 20.0, 15.0), 16, landmarks, 20, 2.0, p)
    got = _carried(only.neighbours, "left", p)
    assert got is not None and got[0] == pytest.approx(60.0)
    assert with_neighbours(anat, 8, landmarks, 20, 2.0, replace(p, tp_context_mm=0.0)) is anat
    # half the vertebral pitch where the finder measured it (30 mm: 15 mm), never less than tp_context_mm
    v = Vertebra("", 3, 14, 40.0, False, (0.0, 0.0), 20.0, 15.0, pitch=15.0)
    level = LevelResult(None, None, (v,), (0.0, 0.0))
    assert process_reach_mm(level, 16, 2.0, p) == pytest.approx(15.0)
    assert process_reach_mm(replace(level, vertebrae=(replace(v, pitch=None),)), 16, 2.0, p) == p.tp_context_mm
    wide = with_neighbours(SliceAnatomy((0.0, 0.0), 20.0, 15.0), 8, landmarks, 20, 2.0, p, 15.0)
    assert min(nb.dz_mm for nb in wide.neighbours) == -14.0  # slice 1 is in reach now


# measured at the true L3 middle (tissue segmenter alone, 256 x 256, 1.95 mm pixels, seed 3): psoas
# left/right, erector left/right Dice.  Before the psoas belly and the patient's-own bony floor:
# average psoas 0.62-0.68 (quadratus lumborum and a non-enhanced kidney joined it), thin erector 0
# (the table behind a thin back was taken as the bony floor).
# Erector before the 1 mm fascia margin (erector_fascia_mm, was 2 mm) and the rib test by the rib angle's
# distance: thin 0.861 0.850, average 0.881 0.883, obese 0.852 0.853.
# Erector before it became the compartment (its fat clefts in, against truth without the phantom's IMAT
# blobs inside it): thin 0.889 0.877, average 0.909 0.913, obese 0.882 0.884.  Psoas before it became its
# outline (fat specks in; truth without the IMAT blobs inside it): thin 0.962 0.988, average 0.953 0.933,
# obese 0.843 0.857; the same masks against the truth with its blobs: 0.895 0.988, 0.953 0.931, 0.822 0.737
# (the obese psoas is riddled with blobs 1.5 x larger; the right one's belly is cut at a blob).
# Since the phantom's slab samples every 1 mm (it was every 1.67 mm at 5 mm slices, which hit its 1 mm endplates or
# missed them): thin 0.975 0.988 0.890 0.886, average 0.986 0.988 0.922 0.916, obese 0.836 0.796 0.903 0.895.  The
# obese seed-3 psoas is marbled to a mean of -2..+4 HU, and its left one lost a fat-riddled lobe it had kept on the
# coarser slab (0.921): a fatty obese psoas is cut (the closing note's "left alone"), the floor says how much.
PHANTOM_FLOORS = {
    ("thin", True): (0.89, 0.96, 0.87, 0.87),  # measured 0.909 0.988 0.890 0.883
    ("average", True): (0.93, 0.91, 0.90, 0.90),  # measured 0.991 0.991 0.914 0.914 (0.950 0.934 before the
    # psoas stopped at the quadratus lumborum: psoas_sheet_stop, psoas_contact_mm)
    ("obese", False): (0.80, 0.77, 0.87, 0.87),  # measured 0.921 0.792 0.891 0.895 (kidney not enhanced)
}


@pytest.mark.parametrize(("habitus", "contrast"), list(PHANTOM_FLOORS))
def test_anatomical_phantom_psoas_and_erector_at_true_l3(habitus: str, contrast: bool) -> None:
    """Psoas (quadratus lumborum, crus and kidney cut off) and erector (to the fascia) on a real VerSe spine."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus=habitus, contrast=contrast, top="L2", bottom="L4", seed=3))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    # the phantom's grid is canonical: rows toward the back (+y), columns toward the patient's left (+x)
    seg = TissueSlicer().run(ph.hu[k], (px, px), anat)
    keys = ("psoas_left", "psoas_right", "erector_left", "erector_right")
    for key, floor in zip(keys, PHANTOM_FLOORS[(habitus, contrast)], strict=True):
        truth = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION[key]])
        assert _dice(seg.masks[key], truth) >= floor, (key, _dice(seg.masks[key], truth))


@pytest.mark.parametrize("rows", [256, 512])
def test_vertebral_body_area_holds_at_any_pixel_size(rows: int) -> None:
    """The psoas-to-vertebral-body gate needs the body's cross-section: a cortical ring with gaps around cancellous
    bone below bone_hu.  On 1 mm pixels (512 rows over the 500 mm field) it read 0.2 cm2 before, and every psoas
    was "not evaluable"; now both pixel sizes give the body (the finder's ellipse, about 11 cm2 at L3)."""
    from pipelines.body_composition.anatomy_phantom import AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="thin", contrast=False, top="L3", bottom="L3", seed=3, rows=rows))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    seg = TissueSlicer().run(ph.hu[k], (px, px), anat)
    ellipse = np.pi * anat.half_width_mm * anat.half_height_mm / 100.0
    assert seg.vertebral_body_cm2 is not None and 0.85 * ellipse <= seg.vertebral_body_cm2 <= 1.3 * ellipse, (
        seg.vertebral_body_cm2, ellipse)
    a, m = _values(**GOOD)
    for key in ("psoas_left", "psoas_right"):
        a[key] = Value(float(seg.masks[key].sum()) * px * px / 100.0, "cm2")
    _, _, failed = apply_gates("L3", a, m, replace(_fake_seg(), vertebral_body_cm2=seg.vertebral_body_cm2),
                               load_gates())
    assert not [f for f in failed if f["gate"] == "size against the vertebral body"], failed


def test_a_transverse_process_tip_parted_by_partial_volume_is_no_rib() -> None:
    """On a 5 mm slab an oblique L3 transverse process can fall apart into the process and a loose tip; lateral
    to 40 mm that tip looked like a rib at its angle, so the right erector was cut to a box (Dice 0.57 against
    0.93) by a half-millimetre shift of the slices.  Where the slice is L3 (``ribs_possible`` False, from the
    level finder or the reader's level) the tip is the vertebra's; without that knowledge nothing changes."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="average", rows=256, slice_mm=5.0, seed=3))
    k, at_l3 = ph.at_level("L3")
    px = ph.spec.pixel_mm
    truth = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION["erector_right"]])
    dice = {}
    for ribs in (None, False):
        anat = replace(at_l3, ribs_possible=ribs)
        dice[ribs] = _dice(TissueSlicer().run(ph.hu[k], (px, px), anat).masks["erector_right"], truth)
    assert dice[False] >= 0.9, dice
    assert dice[None] < 0.8, dice  # the fragment still bounds the compartment when ribs cannot be ruled out


# The quadratus lumborum lies posterolateral to the psoas in front of the transverse process and touches it with no fat
# plane on the anatomical phantoms (as in many patients), even without the "quadratus" contact.  The belly's opening
# cut its sheet off, but the grow-back into the muscle window and the outline's closing took its part next to the
# contact again, and the belly's discs filled the corner of the contact: psoas area +8.7 / +10.3 % (57 / 72 mm2 of
# quadratus in it) on the average phantom, +15.0 / +16.1 % (99 / 95 mm2) with the "quadratus" contact.  Measured with
# the sheet stop alone: +2.9 / +3.4 % (19 / 27 mm2) and +6.4 / +8.0 % (42 / 42 mm2); with the oval across the
# contact as well: +0.6 / -1.7 % (8 / 0 mm2) and +1.2 / +2.3 % (11 / 15 mm2).
QUADRATUS_BOUNDS = {(): (30.0, 4.0), ("quadratus",): (35.0, 5.0)}  # mm2 of quadratus taken, area error %


@pytest.mark.parametrize("contacts", list(QUADRATUS_BOUNDS))
def test_psoas_stops_at_the_quadratus_lumborum(contacts: tuple[str, ...]) -> None:
    """The psoas' grown and closed outline does not take the quadratus lumborum sheet its belly's discs cut off
    (``psoas_sheet_stop``) nor the corner of the contact (``psoas_contact_mm``); without them it does (the systematic
    over-segmentation they fix), and the stop alone leaves the corner."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="average", top="L2", bottom="L4", seed=3, psoas_contacts=contacts))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    lab = ph.labels[k]
    max_taken, max_err = QUADRATUS_BOUNDS[contacts]
    taken: dict[str, list[float]] = {}
    for name, params in (("both", TissueParams()), ("stop", TissueParams(psoas_contact_mm=0.0)),
                         ("off", TissueParams(psoas_sheet_stop=False))):
        seg = TissueSlicer(params).run(ph.hu[k], (px, px), anat)
        for side in ("left", "right"):
            mask = seg.masks[f"psoas_{side}"]
            taken.setdefault(name, []).append(float((lab[mask] == LABELS[f"quadratus_{side}"]).sum()) * px * px)
            truth = np.isin(lab, [LABELS[n] for n in COMPOSITION[f"psoas_{side}"]])
            err = 100.0 * (float(mask.sum()) / float(truth.sum()) - 1.0)
            if name == "both":
                assert abs(err) <= max_err, (side, err)
    assert max(taken["both"]) <= max_taken, taken
    assert min(taken["off"]) > max_taken + 20.0, taken  # measured 57 / 72 and 99 / 95 mm2
    assert sum(taken["both"]) < sum(taken["stop"]) < sum(taken["off"]), taken


def test_a_round_body_pressed_on_the_psoas_lateral_edge_is_parted_at_its_waist() -> None:
    """The kidney's lower pole (or the colon) pressed on the psoas' lateral edge at its density, with a neck wider
    than the belly's discs: parted at the waist between the two notches (it was taken whole before: +65 % and +99 %
    on the obese unenhanced phantom at 5 mm, +120 % on the thin one); one oval psoas with notches of intramuscular
    fat anywhere along it is not cut (its lobes lie closer together than two bodies pressed together)."""
    from pipelines.body_composition.tissues import _belly_found

    # 1 mm pixels; x lateral from the midline (the left side), y behind the vertebral body's centre; the body's
    # side at x = 20, its front at y = -17.6, the reference muscle at (30, 0)
    yy, xx = np.mgrid[-40:41, 0:101].astype(np.float64)

    def disc(cx: float, cy: float, rx: float, ry: float | None = None) -> NDArray[np.bool_]:
        return np.asarray(((xx - cx) / rx) ** 2 + ((yy - cy) / (ry or rx)) ** 2 <= 1.0)

    def belly_of(m: NDArray[np.bool_], lateral: float) -> NDArray[np.bool_]:
        return _belly_found(m, m, (xx[:1, :], yy[:, :1]), (40.0, 0.0), (1.0, 1.0), 0.7, 3.0, ref_at=(30.0, 0.0, 8.0),
                            front_y=-17.6, lateral_ratio=lateral)[0]

    psoas = disc(34.0, 0.0, 13.0)
    for apart in (18.0, 20.0):  # a neck of 20 and 18 mm, wider than the discs (0.7 x 13 mm radius)
        kidney = disc(34.0 + apart, -2.0, 14.0) & ~psoas
        assert (belly_of(psoas | kidney, 0.0) & kidney).sum() > 0.9 * kidney.sum()  # taken whole without the rule
        belly = belly_of(psoas | kidney, TissueParams().psoas_lateral_waist)
        assert (belly & kidney).sum() <= 2 and (psoas & ~belly).sum() <= 0.12 * psoas.sum(), apart
    oval = disc(36.0, 0.0, 17.0, 13.0)
    for at in (30.0, 36.0, 42.0, 46.0):
        m = oval & ~(disc(at, -14.0, 4.5) | disc(at, 14.0, 4.5))
        assert (m & ~belly_of(m, TissueParams().psoas_lateral_waist)).sum() <= 0.02 * m.sum(), at


def test_the_kidney_pressed_on_a_thin_psoas_is_not_taken_in() -> None:
    """On the thin anatomical phantom (1 mm pixels, seed 3) the unenhanced kidney's lower pole lies on the left
    psoas' lateral edge with a neck wider than the belly's discs: it was taken whole (+104 %, 512 mm2 of kidney),
    and is parted at the waist now (measured -3 %, 5 mm2)."""
    from pipelines.body_composition.anatomy_phantom import (
        COMPOSITION,
        CONTACT_LABELS,
        LABELS,
        AnatomySpec,
        make_anatomy,
    )
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="thin", contrast=False, top="L2", bottom="L4", seed=3, rows=512,
                                  psoas_contacts=("kidney",)))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    lab = ph.labels[k]
    truth = np.isin(lab, [LABELS[n] for n in COMPOSITION["psoas_left"]])

    def left_psoas(lateral: float) -> tuple[float, float]:
        """Area error (share) and mm2 of kidney in the left psoas with ``psoas_lateral_waist = lateral``."""
        mask = TissueSlicer(TissueParams(psoas_lateral_waist=lateral)).run(ph.hu[k], (px, px), anat).masks["psoas_left"]
        kidney = float(np.isin(lab[mask], [LABELS[n] for n in CONTACT_LABELS["kidney"]]).sum()) * px * px
        return float(mask.sum()) / float(truth.sum()) - 1.0, kidney

    err, kidney = left_psoas(0.0)
    assert err > 0.5 and kidney > 300.0, (err, kidney)  # the case the rule is for
    err, kidney = left_psoas(TissueParams().psoas_lateral_waist)
    assert abs(err) <= 0.10 and kidney <= 50.0, (err, kidney)


# (habitus, every psoas contact, contrast): the right psoas' area error at the true L3 middle (L1-L5, 5 mm slices, seed 7)
# without the second look, and the bound with it
STREAK_CASES = {
    # a fainter streak of the psoas' own fat across its back: -28 % without, +2 % with
    ("average", False, False): (-0.2, 0.08),
    # the seam between the psoas and the quadratus lumborum given back: the second look reached the quadratus'
    # medial lobe through it (+21 % before the sheet-stop guard; -1 % with and without the second look)
    ("thin", True, True): (None, 0.08),
}


@pytest.mark.parametrize("case", list(STREAK_CASES))
def test_a_fainter_streak_across_the_psoas_back_does_not_cost_the_muscle_behind_it(
        case: tuple[str, bool, bool]) -> None:
    """On the average unenhanced phantom (L1-L5, 5 mm slices, seed 7, no organ touching the psoas) the right psoas'
    back has a fainter streak of its own intramuscular fat (about 33 HU of local mean against 47).  The HU drop cut
    it; the gutter gave it back, but the belly had been found without it, and the streak left a neck between it and
    the vertebral body that the discs could not pass: the psoas' normal tissue behind it was lost (measured -28 %).
    With the belly found again with the given-back tissue never cut (``psoas_gutter_again``): +2 %.  On the thin
    phantom with every contact and contrast the second look must not take the quadratus lumborum's lobe behind and
    lateral to the psoas (the sheet-stop guard in ``_belly``)."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, PSOAS_CONTACTS

    habitus, every_contact, contrast = case
    ph = _anatomy(habitus=habitus, contrast=contrast, top="L1", bottom="L5", seed=7, rows=512, slice_mm=5.0,
                  psoas_contacts=PSOAS_CONTACTS if every_contact else ())
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    truth = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION["psoas_right"]])

    def error(again: bool) -> float:
        mask = TissueSlicer(TissueParams(psoas_gutter_again=again)).run(ph.hu[k], (px, px), anat).masks["psoas_right"]
        return float(mask.sum()) / float(truth.sum()) - 1.0

    before, bound = STREAK_CASES[case]
    if before is not None:
        assert error(False) < before  # the case the rule is for
    assert abs(error(True)) <= bound


def test_the_oval_across_a_contact_is_fitted_to_the_free_outline_only() -> None:
    """The psoas' oval is fitted to its outline away from the quadratus sheet: on a pixelated oval (1 mm pixels)
    with a wedge filling the corner toward a sheet, the wedge is cut and the oval kept; an irregular outline (two
    lobes) fits no oval within a pixel and nothing is cut."""
    from scipy import ndimage as ndi

    from pipelines.body_composition.tissues import _beyond_oval, _fit_ellipse

    t = np.linspace(0.0, 2.0 * np.pi, 60, endpoint=False)
    fit = _fit_ellipse(30.0 + 12.0 * np.cos(t), -5.0 + 16.0 * np.sin(t))
    assert fit is not None
    assert np.allclose(fit[:2], (30.0, -5.0), atol=1e-6) and np.allclose(fit[3:], (12.0, 16.0), atol=1e-6), fit
    yy, xx = np.mgrid[0:80, 0:80].astype(np.float64)
    oval = ((xx - 40.0) / 12.0) ** 2 + ((yy - 35.0) / 15.0) ** 2 <= 1.0
    sheet = (yy >= 46.0) & (yy <= 56.0) & (xx >= 48.0) & (xx <= 75.0) & ~oval
    # the corner between the oval and the sheet, filled (what the belly's discs took)
    wedge = (ndi.distance_transform_edt(~sheet) <= 2.5) & (ndi.distance_transform_edt(~oval) <= 3.5) & ~oval & ~sheet
    wedge &= (xx < 56.0) & (yy < 50.0)
    cut = _beyond_oval(oval | wedge, sheet, (xx, yy), (1.0, 1.0), 3.0)
    # (the wedge pixels within half a pixel of the oval are its outline's own and stay)
    assert (cut & wedge).sum() >= 0.6 * wedge.sum() and not (cut & oval).any(), ((cut & wedge).sum(), wedge.sum())
    lobes = oval | (((xx - 55.0) / 9.0) ** 2 + ((yy - 30.0) / 9.0) ** 2 <= 1.0)
    assert not _beyond_oval(lobes | wedge, sheet, (xx, yy), (1.0, 1.0), 3.0).any()


# Psoas at the true L3 middle of the average phantom with every psoas contact (AnatomySpec.psoas_contacts: IVC,
# ectatic aorta, duodenum, jejunal loop, kidney lower poles, quadratus lumborum, right crus, nodes, ureters and
# gonadal veins, all touching it with no fat plane): measured L/R Dice 0.954 / 0.762 unenhanced, 0.873 / 0.919
# portal venous; the most of one contact taken as psoas 134 mm2 (the quadratus lumborum unenhanced; the right
# kidney's lower pole 107 mm2, the IVC 84 mm2; psoas about 640 mm2).  Before the psoas stopped at the quadratus
# lumborum (psoas_sheet_stop, psoas_contact_mm): 0.892 / 0.747 and 0.831 / 0.864, quadratus 168 mm2.
# Before the fainter-tissue cut, the blobs in front and the bound at the transverse process tip: 0.408 / 0.331
# (kidney and duodenum joined whole: 1743 / 2403 mm2 of contacts taken) and 0.815 / 0.849.
# bench/psoas_contacts.py has every contact, habitus and phase.
CONTACT_FLOORS = {False: (0.86, 0.70), True: (0.80, 0.83)}


@pytest.mark.parametrize("contrast", [False, True])
def test_psoas_with_every_contact_at_true_l3(contrast: bool) -> None:
    """What touches psoas at L3 on real CT (vessels, duodenum and bowel, kidney, quadratus, crus, nodes, ureter)
    is not taken for it: psoas Dice above a floor, and no contact's own truth label counted as psoas beyond
    200 mm2 (a third of the psoas; they were taken whole before, up to 1200 mm2)."""
    from pipelines.body_composition.anatomy_phantom import (
        COMPOSITION,
        CONTACT_LABELS,
        LABELS,
        PSOAS_CONTACTS,
        AnatomySpec,
        make_anatomy,
    )
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="average", contrast=contrast, top="L2", bottom="L4", seed=3,
                                  psoas_contacts=PSOAS_CONTACTS))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    seg = TissueSlicer().run(ph.hu[k], (px, px), anat)
    lab = ph.labels[k]
    for key, floor in zip(("psoas_left", "psoas_right"), CONTACT_FLOORS[contrast], strict=True):
        truth = np.isin(lab, [LABELS[n] for n in COMPOSITION[key]])
        mask = seg.masks[key]
        assert _dice(mask, truth) >= floor, (key, _dice(mask, truth))
        for contact, names in CONTACT_LABELS.items():
            taken = float(np.isin(lab[mask], [LABELS[n] for n in names]).sum()) * px * px
            assert taken <= 200.0, (key, contact, taken)


def test_erector_on_every_lumbar_slice_reaches_the_intertransverse_plane(tmp_path: Path) -> None:
    """The 3D erector volume is measured on every L5-L1 slice, most of them between transverse processes: there,
    lateral to the lamina, the lumbar erector reaches forward to the intertransverse plane (the neighbours'
    processes), not to the lamina's level held sideways.  bench/body_composition_erector_slices.py."""
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    sys.path.insert(0, str(REPO / "bench"))
    from body_composition_erector_slices import measure

    res, title = measure("average", 5.0, base=tmp_path)
    assert res, title
    # measured: all slices 0.876 / 0.885 (0.828 / 0.837 with the lamina's level held and the iliac wing taken
    # for a rib), between processes 0.879 / 0.900 (0.798 / 0.811)
    for key in ("erector_left", "erector_right"):
        assert np.mean(res[(key, "all", "after")]) > 0.85, key
        assert np.mean(res[(key, "no process", "after")]) > np.mean(res[(key, "no process", "before")]) + 0.04, key
    # the 3D psoas too: between processes it stays in front of the processes' plane (it had grown back into the
    # intertransverse space, +40-76 % on L4 and disc slices), and where a process's tip bounds it behind the body's
    # centre (a big L4-L5 psoas reaches beyond the tip) it is trimmed, not dropped as "an organ cut by its box"
    # (the L4/L5 disc slice lost both psoas).  Measured: 0.779 / 0.650 -> 0.897 / 0.828 over L5-L1
    for key in ("psoas_left", "psoas_right"):
        after = res[(key, "all", "after")]
        # (on the 1 mm slab sampling: 0.889 against 0.843 before, left)
        assert np.mean(after) > 0.8 and np.mean(after) > np.mean(res[(key, "all", "before")]) + 0.04, key
        assert sum(d == 0.0 for d in after) <= 2, (key, after)  # missed only where it begins at L1 (3-25 px)
    # a "tip" that barely passes the body's side (an articular process, a process's root in the slab) no longer cuts
    # the psoas' back half: the right psoas 0.818 -> 0.836 over L5-L1 (left 0.889 -> 0.894), and its 3D volume
    # passes the continuity gate (6 -> 3 of 26 slices unstable; psoas_tip_beyond_body_mm)
    assert np.mean(res[("psoas_right", "all", "after")]) > 0.83


def test_anatomical_phantom_at_low_dose_noise() -> None:
    """Correlated noise of 30 HU SD (low-dose CT) on the average phantom: before the named muscles were found on a
    smoothed copy, the psoas was lost on both sides (Dice 0.00 / 0.91, erector 0.89 / 0.90)."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="average", top="L2", bottom="L4", seed=3, noise_sd=30.0))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    seg = TissueSlicer().run(ph.hu[k], (px, px), anat)
    assert any("image noise" in n for n in seg.notes)
    # measured 0.922 0.867 0.897 0.906
    for key, floor in zip(("psoas_left", "psoas_right", "erector_left", "erector_right"), (0.88, 0.83, 0.86, 0.87),
                          strict=True):
        truth = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION[key]])
        assert _dice(seg.masks[key], truth) >= floor, (key, _dice(seg.masks[key], truth))


def test_real_ct_mirrored_slice_swaps_sides(real_ct: Any) -> None:
    """No hidden side bias: the mirrored slice gives the mirrored masks with left and right swapped."""
    vol, ref = real_ct.vol, real_ct.ref
    k = 10
    anat = _anat(real_ct, k)
    n = vol.shape[2]
    canal = None if anat.canal_rc is None else (anat.canal_rc[0], n - 1 - anat.canal_rc[1])
    mirrored = SliceAnatomy((anat.centre_rc[0], n - 1 - anat.centre_rc[1]), anat.half_width_mm, anat.half_height_mm,
                            canal_rc=canal)
    a = TissueSlicer().run(vol.hu[k], vol.pixel_spacing, anat, "L3")
    b = TissueSlicer().run(np.ascontiguousarray(vol.hu[k][:, ::-1]), vol.pixel_spacing, mirrored, "L3")
    for left, right in (("erector_left", "erector_right"), ("psoas_left", "psoas_right")):
        if a.masks[left].any() or b.masks[right].any():
            assert _dice(a.masks[left], b.masks[right][:, ::-1]) > 0.95, left
    # and "left" is the patient's left: TotalSegmentator's autochthon_left lies in our erector_left
    assert _dice(a.masks["erector_left"], ref[k] == 86) > 0.6
    assert _dice(a.masks["erector_left"], ref[k] == 87) < 0.05


@pytest.mark.parametrize(("piece_lat_mm", "is_rib"), [(20.0, False), (60.0, True)])
def test_only_a_bone_piece_at_a_rib_angle_is_a_rib(piece_lat_mm: float, is_rib: bool) -> None:
    """A bone piece apart from the vertebra near the midline (an articular process split off by partial
    volume) is not a rib: it does not widen the cut under the fat nor bound the compartment laterally."""
    from pipelines.body_composition.tissues import _posterior_floor

    px = 1.0
    ymm = (np.arange(120.0) - 20.0)[:, None]  # mm behind the vertebral body centre
    lat = np.arange(100.0)[None, :]  # mm from the midline, one side
    bone = np.zeros((120, 100), bool)
    bone[0:40, 0:20] = True  # vertebral body and pedicle reaching the midline cut
    bone[40:46, 8:40] = True  # lamina and transverse process
    r0 = 65
    c0 = int(piece_lat_mm)
    bone[r0 - 3 : r0 + 3, c0 - 3 : c0 + 3] = True  # a separate piece of 36 mm2
    fl = _posterior_floor(bone, ymm, lat, 20.0, px * px, TissueParams())
    ok, rib, tip = fl.ok, fl.ribs, fl.tip
    assert rib is is_rib
    assert tip == pytest.approx(39.0)
    # a rib bounds the compartment at its angle (plus the iliocostalis margin); a medial piece does not
    assert bool(ok[90, 80]) is (not is_rib)


def test_a_slice_between_two_ribs_keeps_the_erector_behind_the_chest_wall_of_its_neighbours() -> None:
    """Between two ribs (T11-T12) nothing bony lies lateral to the transverse process, and the floor ran straight
    from the process tip to the next rib's angle, so the erector took the intercostal muscles, the diaphragm and
    the quadratus lumborum in front of it (the real CT's left erector 10.3 cm2 against TotalSegmentator's 7.8).
    The ribs of the slices within reach (``SideBone.wall_mm``) bound it there: the erector lies behind them."""
    from pipelines.body_composition.tissues import _wall
    from pipelines.body_composition.types import NeighbourBone

    # 1 mm pixels, the vertebral body centre at row 60, column 100 (columns grow to the patient's left)
    hu = np.full((200, 200), -1000.0, np.float32)
    rr, cc = np.mgrid[:200, :200]
    hu[((rr - 80) / 85.0) ** 2 + ((cc - 100) / 98.0) ** 2 <= 1.0] = -100.0  # subcutaneous fat
    hu[((rr - 80) / 75.0) ** 2 + ((cc - 100) / 88.0) ** 2 <= 1.0] = 40.0  # muscle inside it
    hu[40:80, 80:121] = 400.0  # vertebral body (half height and width 20 mm)
    hu[84:90, 72:129] = 400.0  # laminae and transverse processes, 28 mm either side
    for c in (15, 185):
        hu[118:126, c - 5 : c + 6] = 400.0  # a rib at its angle, 85 mm out
    anat = SliceAnatomy((60.0, 100.0), 20.0, 20.0)
    p = TissueParams()
    lat = np.abs(cc - 100.0)
    behind = rr - 60.0  # mm behind the vertebral body centre
    # the slice below shows a rib running out from the process, 60 mm behind the centre (grid: 0, 1, ... mm out)
    wall = tuple(60.0 if 32 <= g <= 55 else float("nan") for g in range(86))
    near = replace(anat, neighbours=(NeighbourBone(-4.0, SideBone(None, (), wall), SideBone(None, (), wall)),))
    got = _wall(near.neighbours, "left")
    assert got is not None and got[40] == 60.0 and np.isnan(got[20])
    for side in ("left", "right"):
        alone = lumbar_named(hu, (1.0, 1.0), anat, p)[f"erector_{side}"]
        kept = lumbar_named(hu, (1.0, 1.0), near, p)[f"erector_{side}"]
        front = (lat >= 35) & (lat <= 50) & (behind < 58)
        assert (alone & front).sum() > 100  # the floor from the process tip to the rib let it reach forward
        assert not (kept & front).any()  # behind the neighbours' rib
        assert kept.sum() > 0.6 * alone.sum()  # the muscle behind the wall is still the erector
        assert (kept & (lat > 40) & (behind > 65)).any()
    # with the rule off the neighbours' ribs are not used
    off = lumbar_named(hu, (1.0, 1.0), near, replace(p, rib_wall=False))["erector_left"]
    assert (off == lumbar_named(hu, (1.0, 1.0), anat, p)["erector_left"]).all()


@pytest.mark.parametrize("overlap", [2.0, 10.0])
def test_arm_against_the_trunk_is_cut_off(overlap: float) -> None:
    t = trunk_with_arm(overlap)
    anat = SliceAnatomy(t.centre_rc, t.half_width_mm, t.half_height_mm)
    seg = TissueSlicer().run(t.hu, (t.pixel_mm, t.pixel_mm), anat, "L3")
    assert seg.limbs is not None and any("limb" in n for n in seg.notes)
    assert float((seg.limbs & t.arm).sum()) > 0.97 * float(t.arm.sum())
    assert float(seg.body.sum()) == pytest.approx(float(t.trunk.sum()), rel=0.01)
    for key in ("skeletal_muscle", "sat", "vat", "imat"):
        assert float((seg.masks[key] & t.arm).sum()) < 0.01 * float(t.arm.sum()), key
    a, m, failed = apply_gates("L3", *_values(**GOOD), seg, load_gates())
    assert not any(f["gate"].startswith("trunk") for f in failed)


@pytest.mark.parametrize("overlap", [20.0, 30.0])
def test_arm_fused_with_the_trunk_makes_whole_slice_values_not_evaluable(overlap: float) -> None:
    """An arm that cannot be cut off: the trunk outline gates refuse SAT, VAT, IMAT and total muscle."""
    t = trunk_with_arm(overlap)
    anat = SliceAnatomy(t.centre_rc, t.half_width_mm, t.half_height_mm)
    seg = TissueSlicer().run(t.hu, (t.pixel_mm, t.pixel_mm), anat, "L3")
    a, m, failed = apply_gates("L3", *_values(**GOOD), seg, load_gates())
    for key in ("skeletal_muscle", "sat", "vat", "imat"):
        assert a[key].value is None and "arm" in a[key].reason, key
    for key in ("psoas_left", "erector_right"):  # the named muscles do not depend on the outline
        assert a[key].value is not None, key


# --- C3 -------------------------------------------------------------------------------------------


def _neck_seg(**kw: Any) -> tuple[Any, SliceSegmentation]:
    n = neck_slice(**kw)
    anat = SliceAnatomy(n.centre_rc, n.half_width_mm, n.half_height_mm)
    return n, TissueSlicer().run(n.hu, (1.0, 1.0), anat, "C3")


def test_c3_structures_are_swartz(tmp_path: Path) -> None:
    """At C3: paravertebral muscles and both sternocleidomastoids; no SAT, VAT, cavity or psoas."""
    n, seg = _neck_seg()
    assert tuple(seg.masks) == C3_KEYS
    assert not {"vat", "sat", "imat", "psoas_left", "erector_left"} & set(seg.masks)
    for key, truth in n.truth.items():
        got, want = float(seg.masks[key].sum()), float(truth.sum())
        assert got == pytest.approx(want, rel=0.05), key
        assert _dice(seg.masks[key], truth) > 0.95, key
    total = np.logical_or.reduce([n.truth[k] for k in n.truth])
    assert _dice(seg.masks["skeletal_muscle"], total) > 0.95
    from pipelines.body_composition.dicom_out import template_key

    assert all(template_key(k) for k in (*C3_KEYS, *L3_KEYS))  # every structure has a code-table row


def _measure(seg: SliceSegmentation, hu: np.ndarray, level: str, factors: PatientFactors) -> Any:  # type: ignore[type-arg]
    vol = SimpleNamespace(hu=hu[None], pixel_area_mm2=1.0, pixel_spacing=(1.0, 1.0),
                          voxel_volume_mm3=1.0)
    lr = LevelResult(level=level, slice_index=0, vertebrae=(), spine_centre_rc=(0.0, 0.0))
    s = Segmentation(level=lr, slice_seg=seg)
    return Measure(load_table()).run(MeasureInput(vol, s, factors))  # type: ignore[arg-type]


def test_c3_conversion_only_with_every_input() -> None:
    n, seg = _neck_seg()
    f = PatientFactors(height_m=1.7, weight_kg=70.0, sex="F", age_years=55.0)
    m = _measure(seg, n.hu, "C3", f)
    assert set(m.areas) == set(C3_KEYS) and m.volumes == {}
    c3 = m.areas["skeletal_muscle"].value
    assert c3 == pytest.approx(sum(m.areas[k].value for k in C3_KEYS[1:]))
    assert m.derived["l3_muscle_area_estimate"].value == pytest.approx(
        27.304 + 1.363 * c3 - 0.671 * 55 + 0.640 * 70 + 26.442 * 1)
    assert m.sarcopenia["prado-2008"]["via"] == "swartz-2016"
    assert m.sarcopenia["prado-2008"]["inputs"]["c3_muscle_area_cm2"] == pytest.approx(c3)
    assert {"age_years", "weight_kg", "sex", "height_m"} <= set(m.sarcopenia["prado-2008"]["inputs"])
    # a missing input of the formula is named; nothing is estimated
    m = _measure(seg, n.hu, "C3", replace(f, weight_kg=None))
    assert m.derived["l3_muscle_area_estimate"].value is None
    assert "PatientWeight" in m.derived["l3_muscle_area_estimate"].reason
    assert "not_evaluable" in m.sarcopenia["prado-2008"]
    # one sternocleidomastoid missing (e.g. after neck dissection): the C3 area is not Swartz's
    n2, seg2 = _neck_seg(without_scm="right")
    m = _measure(seg2, n2.hu, "C3", f)
    assert m.areas["paravertebral_left"].value is not None
    assert "one-sided" in m.areas["sternocleidomastoid_left"].reason  # a one-sided find is not trusted
    assert m.areas["skeletal_muscle"].value is None
    assert "sternocleidomastoid right" in m.areas["skeletal_muscle"].reason
    assert m.derived["l3_muscle_area_estimate"].value is None and m.derived["smi"].value is None


# --- gates ------------------------------------------------------------------------------------------


def _fake_seg(level: str = "L3", body_cm2: float = 700.0, vb_cm2: float = 15.0,
              widths: tuple[float, float] = (160.0, 165.0)) -> SliceSegmentation:
    empty = np.zeros((4, 4), bool)
    keys = L3_KEYS if level == "L3" else C3_KEYS
    return SliceSegmentation(masks={k: empty for k in keys}, body=empty, body_area_cm2=body_cm2,
                             vertebral_body_cm2=vb_cm2, trunk_half_widths_mm=widths)


def _values(**areas: float) -> tuple[dict[str, Value], dict[str, Value]]:
    hu = {"sat": -100.0, "vat": -95.0, "imat": -70.0}
    return ({k: Value(v, "cm2") for k, v in areas.items()},
            {k: Value(hu.get(k, 40.0), "HU") for k in areas})


GOOD = {"skeletal_muscle": 150.0, "psoas_left": 10.0, "psoas_right": 11.0, "erector_left": 22.0,
        "erector_right": 21.0, "sat": 200.0, "vat": 120.0, "imat": 8.0}


def test_gates_pass_a_plausible_l3() -> None:
    gates = load_gates()
    assert gates.version and all(b.source for b in (*gates.ranges, *gates.fractions))
    a, m = _values(**GOOD)
    a2, m2, failed = apply_gates("L3", a, m, _fake_seg(), gates)
    assert failed == [] and a2 == a and m2 == m


def test_every_area_and_mean_hu_has_a_published_range() -> None:
    """Issue item 4: each area and mean HU that can be filed is checked against a range with its source."""
    from pipelines.body_composition.types import LEVEL_KEYS

    gates = load_gates()
    have = {(b.key, b.level, b.quantity) for b in gates.ranges}
    missing = [(key, level, q) for level, keys in LEVEL_KEYS.items() for key in keys for q in ("area", "mean_hu")
               if (key, level, q) not in have]
    assert missing == []
    assert all(b.min < b.max and b.source.strip() for b in gates.ranges)


def test_metal_on_the_level_slice_makes_every_value_not_evaluable(real_ct: Any) -> None:
    """A pedicle screw (metal at the scanner's ceiling, 3071 HU) with its streaks on the level slice: nothing on
    that slice is filed and the reason points to a reader-confirmed slice clear of it; a small clip passes; and
    a screw anywhere in L5-L1 leaves the 3D volumes not evaluable."""
    from pipelines.body_composition.plausibility import metal_in_volume, metal_mm2

    vol = real_ct.vol
    k = 10
    anat = _anat(real_ct, k)
    r0, c0 = anat.centre_rc
    rr, cc = np.mgrid[: vol.hu.shape[1], : vol.hu.shape[2]]
    dist = np.hypot((rr - (r0 + 12.0)) * vol.pixel_spacing[0], (cc - (c0 + 14.0)) * vol.pixel_spacing[1])
    screw = vol.hu[k].copy()
    screw[dist <= 3.5] = 3071.0  # a 7 mm screw through the left pedicle
    angle = np.arctan2(rr - (r0 + 12.0), cc - (c0 + 14.0))
    screw = (screw + 150.0 * np.cos(8 * angle) * np.exp(-dist / 60.0)).astype(np.float32)  # streaks
    gates = load_gates()
    seg = TissueSlicer().run(screw, vol.pixel_spacing, anat, "L3")
    metal = metal_mm2(screw, seg.body, vol.pixel_area_mm2, gates)
    assert metal > 30.0
    a, m = _values(**GOOD)
    a2, m2, failed = apply_gates("L3", a, m, _fake_seg(), gates, metal)
    assert all(v.value is None and "metal" in v.reason and "reader" in v.reason for v in a2.values())
    assert all(v.value is None for v in m2.values()) and {f["gate"] for f in failed} == {"metal"}
    clip = vol.hu[k].copy()
    clip[dist <= 1.0] = 3071.0  # a surgical clip: a few mm2
    small = metal_mm2(clip, seg.body, vol.pixel_area_mm2, gates)
    assert 0.0 < small < 10.0
    a3, _, _ = apply_gates("L3", a, m, _fake_seg(), gates, small)
    assert a3 == a
    assert metal_mm2(vol.hu[k], seg.body, vol.pixel_area_mm2, gates) == 0.0  # bone is not metal
    stack = np.stack([vol.hu[k], screw, clip])
    reason = metal_in_volume(stack, 40, vol.pixel_area_mm2, gates)
    assert reason is not None and "1 slice(s)" in reason and "first 41" in reason
    assert metal_in_volume(stack[[0, 2]], 40, vol.pixel_area_mm2, gates) is None


def test_a_fat_filled_erector_or_psoas_is_not_filed() -> None:
    """A compartment that is mostly fat (a wrong mask) fails its mean-HU range; a fatty but real one passes."""
    a, m = _values(**GOOD)
    m["erector_left"] = Value(-20.0, "HU")  # severe fatty infiltration: still filed
    m["psoas_right"] = Value(-45.0, "HU")
    a2, m2, failed = apply_gates("L3", a, m, _fake_seg(), load_gates())
    assert a2["erector_left"].value == GOOD["erector_left"] and m2["erector_left"].value == -20.0
    assert a2["psoas_right"].value is None and "mean hu" in a2["psoas_right"].reason
    m["erector_left"] = Value(-80.0, "HU")
    a3, _, _ = apply_gates("L3", a, m, _fake_seg(), load_gates())
    assert a3["erector_left"].value is None and "mean hu" in a3["erector_left"].reason


@pytest.mark.parametrize(("change", "seg_kw", "bad", "gate"), [
    ({"skeletal_muscle": 496.0}, {}, ["skeletal_muscle"], "area range"),  # liver and spleen in "muscle"
    ({"skeletal_muscle": 300.0}, {"body_cm2": 450.0}, ["skeletal_muscle"], "share of the body"),
    ({"psoas_left": 31.0}, {}, ["psoas_left", "psoas_right"], "area range"),  # and then left/right
    ({"psoas_right": 3.0}, {"vb_cm2": 25.0}, ["psoas_right", "psoas_left"], "vertebral body"),
    ({"erector_left": 9.0}, {}, ["erector_left", "erector_right"], "left/right symmetry"),
    ({}, {"widths": (160.0, 240.0)}, ["skeletal_muscle", "sat", "vat", "imat"], "trunk symmetry"),
    ({"psoas_right": 1.0}, {}, ["psoas_right", "psoas_left"], "area range"),  # right refused, so left too
])
def test_gates_make_implausible_values_not_evaluable(change: dict[str, float], seg_kw: dict[str, Any],
                                                     bad: list[str], gate: str) -> None:
    a, m = _values(**{**GOOD, **change})
    a2, m2, failed = apply_gates("L3", a, m, _fake_seg(**seg_kw), load_gates())
    for key in bad:
        assert a2[key].value is None and m2[key].value is None, key
        assert a2[key].reason.startswith("implausible"), key
    assert any(gate in f["gate"] or gate in f["reason"] for f in failed), failed
    for key in set(GOOD) - set(bad):
        assert a2[key].value == a[key].value, key


def test_slice_consistency_gate_compares_the_level_slice_with_its_neighbours() -> None:
    """A muscle whose area on the level slice is far from that on the slices just above and below (or that is not
    found there) is "not evaluable": its outline is not stable there.  Values near their neighbours are filed."""
    a, m = _values(**GOOD)
    near = [dict(GOOD, psoas_left=10.5), dict(GOOD, psoas_left=9.8)]
    a2, _, failed = apply_gates("L3", a, m, _fake_seg(), load_gates(), 0.0, near, 1.0)
    assert failed == [] and a2 == a
    near = [dict(GOOD, psoas_left=15.0), dict(GOOD, psoas_left=16.0)]  # 10 against 15.5: 35 % apart
    a2, _, failed = apply_gates("L3", a, m, _fake_seg(), load_gates(), 0.0, near, 1.0)
    assert a2["psoas_left"].value is None and "slice consistency" in a2["psoas_left"].reason
    assert "35 %" in a2["psoas_left"].reason and "1.0 mm away" in a2["psoas_left"].reason
    assert a2["psoas_right"].value == GOOD["psoas_right"]  # the other side stands on its own neighbours
    near = [dict(GOOD, erector_right=0.0), dict(GOOD)]
    a2, _, failed = apply_gates("L3", a, m, _fake_seg(), load_gates(), 0.0, near, 5.0)
    assert a2["erector_right"].value is None and "not found on a slice next to" in a2["erector_right"].reason
    assert a2["psoas_left"].value == GOOD["psoas_left"]
    # C3 has no such rows: its values pass whatever the neighbours
    a3, _, failed = apply_gates("C3", a, m, _fake_seg(), load_gates(), 0.0, near, 5.0)
    assert not [f for f in failed if f["gate"] == "slice consistency"]


def test_continuity_gate_judges_a_3d_muscle_slice_by_slice() -> None:
    """A 3D muscle whose area jumps from slice to slice (an organ joined, part cut off, the muscle missed) on more
    than a fifth of the judged slices has a volume that is not the muscle's: not evaluable, with the count.  A smooth
    growth (psoas from L1 to L5) passes, and so does a single bad slice; the thin ends are not judged."""
    from pipelines.body_composition.plausibility import continuity_reason, unstable_slices

    gates = load_gates()
    (g,) = [c for c in gates.continuity if c.key == "psoas_left"]
    smooth = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 15.5, 16.0]
    assert unstable_slices(smooth, 5.0, g) == (0, 15)  # the first three (neighbours under a quarter of 8.5) are not judged
    assert continuity_reason("psoas_left", smooth, 5.0, gates) is None
    one = list(smooth)
    one[9] = 18.0  # one slice joined to an organ
    assert unstable_slices(one, 5.0, g)[0] == 1 and continuity_reason("psoas_left", one, 5.0, gates) is None
    bad = list(smooth)
    for k in (4, 8, 12):
        bad[k] = 0.0  # missed
    bad[6], bad[10] = 14.0, 20.0  # joined to the iliacus or bowel
    reason = continuity_reason("psoas_left", bad, 5.0, gates)
    assert reason is not None and "continuity" in reason and "4 of 13 slices" in reason, reason
    # at 1 mm slices the reach spans 10 slices each way
    thin = np.repeat(np.asarray(smooth), 5).tolist()
    assert continuity_reason("psoas_left", thin, 1.0, gates) is None
    assert continuity_reason("skeletal_muscle", bad, 5.0, gates) is None  # no row: no gate


def test_trend_gate_judges_the_level_slice_against_the_muscles_course() -> None:
    """An organ lying on the psoas at L3 (the third part of the duodenum, 2-3 cm tall) is joined on the level slice
    and on the slices next to it, so the neighbour consistency gate sees no jump; the line through the psoas' areas
    15-35 mm above and below does, and a value twice the line's is not evaluable with both numbers.  A psoas
    growing smoothly passes, and so does a right value under a line raised by organs on the far slices; a level too
    near the end of the range is not judged; each row names its level."""
    from pipelines.body_composition.plausibility import trend_expected, trend_reason

    gates = load_gates()
    (g,) = [t for t in gates.trend if t.key == "psoas_left"]
    assert g.level == "L3" and g.near_mm >= 15.0  # beyond the reach of an organ 2-3 cm tall centred on the level
    course = [2.0 + 0.2 * i for i in range(17)]  # 5 mm slices, L1 to L5: 2 to 5.2 cm2
    at = 8
    assert trend_expected(course, at, 5.0, g) == pytest.approx(course[at])
    assert trend_reason("psoas_left", course[at], course, at, 5.0, gates, "L3") is None
    # room for a line pulled down by far slices outlined short (a fatty psoas): half as large again still passes
    assert trend_reason("psoas_left", 1.5 * course[at], course, at, 5.0, gates, "L3") is None
    joined = list(course)
    for k in range(at - 2, at + 3):  # the organ on the level slice and 10 mm either side
        joined[k] *= 2.0
    reason = trend_reason("psoas_left", joined[at], joined, at, 5.0, gates, "L3")
    assert reason is not None and "trend" in reason and "7.2 cm2" in reason and "3.6 cm2" in reason, reason
    # one-sided: an organ joined on the far slices raises the line, and a right value below it is not held back (a
    # muscle cut short is left to the other gates)
    far = [2.0 * a if abs(i - at) >= 3 else a for i, a in enumerate(course)]
    assert trend_reason("psoas_left", far[at], far, at, 5.0, gates, "L3") is None
    # on 1 mm slices the same course
    fine = np.interp(np.arange(81) / 5.0, np.arange(17), course).tolist()
    assert trend_reason("psoas_left", fine[40], fine, 40, 1.0, gates, "L3") is None
    assert trend_reason("psoas_left", 2.0 * fine[40], fine, 40, 1.0, gates, "L3") is not None
    # the level 10 mm from the range's end: nothing beyond 15 mm on that side, not judged
    assert trend_expected(course, 2, 5.0, g) is None
    assert trend_reason("psoas_left", 10.0, course, 2, 5.0, gates, "L3") is None
    assert trend_reason("psoas_left", joined[at], joined, at, 5.0, gates, "C3") is None  # no C3 row
    assert trend_reason("erector_left", joined[at], joined, at, 5.0, gates, "L3") is None  # no row: no gate


def test_gate_refuses_a_one_sided_find_unless_the_edge_cut_the_other() -> None:
    a, m = _values(**GOOD)
    a["psoas_right"] = Value(None, "cm2", "structure not found on the level slice")
    m["psoas_right"] = Value(None, "HU", "structure not found on the level slice")
    a2, _, _ = apply_gates("L3", a, m, _fake_seg(), load_gates())
    assert a2["psoas_left"].value is None and "psoas right not evaluable" in a2["psoas_left"].reason
    a["psoas_right"] = Value(None, "cm2", "structure touches the edge of the field of view")
    a2, _, _ = apply_gates("L3", a, m, _fake_seg(), load_gates())
    assert a2["psoas_left"].value == GOOD["psoas_left"]


def test_gate_on_mean_hu_and_measure_carries_it() -> None:
    """An enhancing organ taken as muscle shows as a high mean HU: not evaluable, and so are SMI and sarcopenia."""
    a, m = _values(**GOOD)
    m["skeletal_muscle"] = Value(105.0, "HU")
    a2, _, failed = apply_gates("L3", a, m, _fake_seg(), load_gates())
    assert a2["skeletal_muscle"].value is None and "mean hu" in a2["skeletal_muscle"].reason
    # through Measure: an implausible muscle area leaves SMI and every cut-off "not evaluable" with the reason
    hu = np.full((40, 40), 45.0, np.float32)
    big = np.zeros((40, 40), bool)
    big[:, :] = True
    seg = SliceSegmentation(masks={k: (big if k == "skeletal_muscle" else np.zeros_like(big)) for k in L3_KEYS},
                            body=big, body_area_cm2=16.0, vertebral_body_cm2=None)
    meas = _measure(seg, hu, "L3", PatientFactors(1.75, 80.0, "M", 60.0))
    assert meas.areas["skeletal_muscle"].value is None
    assert "implausible" in meas.derived["smi"].reason
    assert all("not_evaluable" in v for v in meas.sarcopenia.values())
    assert meas.gates["version"] and meas.gates["failed"]


def test_morphology_on_the_mask_box_equals_the_whole_array() -> None:
    """erode/dilate work on the mask's bounding box (grown by the radius): the result is the whole array's,
    at the array's edges too, for the distance-transform and the small-disk paths; an empty mask dilates
    to nothing (the whole-array distance transform of an empty mask put pixels in its corner)."""
    from scipy import ndimage as ndi

    from pipelines.body_composition.morphology import dilate, disk, erode

    rng = np.random.default_rng(7)
    for t in range(300):
        h, w = (int(v) for v in rng.integers(4, 60, 2))
        m = ndi.gaussian_filter(rng.random((h, w)), float(rng.uniform(0.5, 3.0))) > rng.uniform(0.45, 0.6)
        if t % 5 == 0:
            m[:, -1] = True  # touching an edge
        r = float(rng.uniform(0.6, 8.0))
        if r <= 1.5:
            want_e, want_d = ndi.binary_erosion(m, disk(r)), ndi.binary_dilation(m, disk(r))
        else:
            want_e, want_d = ndi.distance_transform_edt(m) > r, ndi.distance_transform_edt(~m) <= r
        assert np.array_equal(erode(m, r), want_e), (t, r)
        if m.any():
            assert np.array_equal(dilate(m, r), want_d), (t, r)
    empty = np.zeros((20, 30), bool)
    assert not dilate(empty, 4.0).any() and not dilate(empty, 1.0).any() and not erode(empty, 4.0).any()


def test_intramuscular_fat_behind_the_psoas_centre_stays_psoas() -> None:
    """A 3 mm fat blob in the back of a thin phantom's psoas, in partial volume on the 5 mm slice above L3's middle,
    lowered the local HU there and the HU-drop rule (meant for a fainter organ lying on the psoas) cut 44 % of the
    muscle off.  No organ lies behind the vertebral body's centre and medial to the psoas: that part is given back
    where it is as thick as the belly, and the quadratus behind and lateral to it stays out."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus="thin", contrast=False, top="L2", bottom="L4", seed=3, rows=512,
                                  slice_mm=5.0))
    k, anat = ph.at_level("L3")
    k += 1  # the slice above the middle
    px = ph.spec.pixel_mm
    truth = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION["psoas_right"]])
    quadratus = ph.labels[k] == LABELS["quadratus_right"]
    for gutter, low, high in ((False, 0.0, 0.8), (True, 0.93, 1.0)):
        m = TissueSlicer(TissueParams(psoas_gutter=gutter)).named(ph.hu[k], (px, px), anat)["psoas_right"]
        d = 2.0 * float((m & truth).sum()) / float(m.sum() + truth.sum())
        assert low <= d <= high, (gutter, d)
        assert not (m & quadratus).any()


def _psoas_at_l3(habitus: str, rows: int, side: str, params: list[TissueParams]) -> list[float]:
    """Area error (share of the truth) of one psoas on the anatomical phantom's L3 middle slice, per params."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, AnatomySpec, make_anatomy
    from pipelines.body_composition.anatomy_spine import DATA

    if not DATA.is_dir():
        pytest.skip(f"VerSe masks not found at {DATA}")
    ph = make_anatomy(AnatomySpec(habitus=habitus, contrast=False, top="L2", bottom="L4", seed=3, rows=rows))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    truth = np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION[f"psoas_{side}"]])
    return [float(TissueSlicer(q).named(ph.hu[k], (px, px), anat)[f"psoas_{side}"].sum()) / float(truth.sum()) - 1.0
            for q in params]


def test_psoas_sliver_parted_by_a_fat_speck_stays_psoas() -> None:
    """A fat speck opening onto a thin phantom's psoas outline parted a 4-pixel medial sliver from the component the
    belly was found in; without it the outline's closing could not bridge the speck and the psoas lost 14 % of its
    area.  A piece lying wholly within ``psoas_fragment_mm`` of the belly is its own."""
    off, on = _psoas_at_l3("thin", 256, "left", [TissueParams(psoas_fragment_mm=0.0), TissueParams()])
    assert off < -0.10, off
    assert abs(on) < 0.08, on


def test_marbled_obese_psoas_is_not_opened_away() -> None:
    """An obese phantom's psoas marbled by fat (28 % of its section) is muscle strands of 2-3 mm between the specks;
    at 1 mm pixels the 2 mm opening that parts organs from the other muscles erased them and half the psoas was lost
    (-51 %).  The psoas is opened by one pixel (``psoas_bridge_mm`` = 1 mm, never less than a pixel): its own rules
    (discs, blobs, the HU drop) part it from what lies on it."""
    old, new = _psoas_at_l3("obese", 512, "right", [TissueParams(psoas_bridge_mm=2.0), TissueParams()])
    assert old < -0.30, old
    assert abs(new) < 0.15, new


def test_outline_gate_refuses_a_psoas_whose_edge_the_image_does_not_show() -> None:
    """The outline gate measures how much of a psoas outline runs through tissue of its own density, with no fat plane
    and no bone beside it.  A psoas in retroperitoneal fat, against the vertebral body, shows its whole edge; one with
    unenhanced organs and vessels of its density pressed on it all round (a thin patient's kidney, duodenum and vena
    cava on a non-contrast scan) shows little of it, and its area is the segmenter's guess: not evaluable, with the
    share in the reason.  An enhancing organ (60 HU and more above the muscle) shows the edge as fat does; noise and
    tissue a little denser than muscle do not."""
    from pipelines.body_composition.plausibility import unseen_outline

    gates = load_gates()
    (g,) = [o for o in gates.outline if o.key == "psoas_left"]
    assert g.level == "L3" and 0.0 < g.max_unseen < 1.0
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:160, :160].astype(np.float64)
    psoas = (yy - 80.0) ** 2 / 18.0 ** 2 + (xx - 80.0) ** 2 / 14.0 ** 2 <= 1.0  # 1 mm pixels: about 7.9 cm2
    body = (yy - 80.0) ** 2 / 16.0 ** 2 + (xx - 114.0) ** 2 / 20.0 ** 2 <= 1.0  # vertebral body, medial
    ring = (yy - 80.0) ** 2 / 30.0 ** 2 + (xx - 80.0) ** 2 / 26.0 ** 2 <= 1.0
    noise = rng.normal(0.0, 12.0, psoas.shape)

    def slice_with(around: float) -> np.ndarray:
        hu = np.full(psoas.shape, -100.0)
        hu[ring & ~psoas] = around  # what touches the psoas: fat (-100), an unenhanced organ (35), an enhancing one
        hu[psoas] = 45.0
        hu[body] = 250.0
        return (hu + noise).astype(np.float32)

    in_fat = unseen_outline(psoas, slice_with(-100.0), (1.0, 1.0), g)
    touched = unseen_outline(psoas, slice_with(35.0), (1.0, 1.0), g)
    enhancing = unseen_outline(psoas, slice_with(180.0), (1.0, 1.0), g)
    assert in_fat == 0.0 and enhancing == 0.0, (in_fat, enhancing)
    assert unseen_outline(psoas, slice_with(90.0), (1.0, 1.0), g) == pytest.approx(touched, abs=0.05)
    assert touched > g.max_unseen, touched  # only the side against the vertebral body is seen
    assert unseen_outline(np.zeros_like(psoas), slice_with(35.0), (1.0, 1.0), g) == 0.0
    # on 3 mm pixels the fat in the next pixel shows the edge (its centre lies 3 mm away, beyond reach_mm)
    coarse = np.s_[::3, ::3]
    assert unseen_outline(psoas[coarse], slice_with(-100.0)[coarse], (3.0, 3.0), g) == 0.0
    assert unseen_outline(psoas[coarse], slice_with(35.0)[coarse], (3.0, 3.0), g) > g.max_unseen
    a, m = _values(**GOOD)
    a2, m2, failed = apply_gates("L3", a, m, _fake_seg(), gates, unseen={"psoas_left": touched, "psoas_right": in_fat})
    assert a2["psoas_left"].value is None and m2["psoas_left"].value is None
    assert "outline" in a2["psoas_left"].reason and f"{100 * touched:.0f} %" in a2["psoas_left"].reason
    assert a2["psoas_right"].value == GOOD["psoas_right"]  # the other side stands (its symmetry is on the raw values)
    assert [f["key"] for f in failed if f["gate"] == "outline"] == ["psoas_left"]
    a3, _, _ = apply_gates("C3", *_values(**GOOD), _fake_seg(level="C3"), gates, unseen={"psoas_left": touched})
    assert a3["psoas_left"].value == GOOD["psoas_left"]  # each row names its level


def test_level_area_is_not_evaluable_where_the_3d_outline_swings_around_it() -> None:
    """The continuity gate's psoas rows also judge the slices within 15 mm of the L3 slice: where more than 40 % of
    them are unstable (an organ taken in on one slice and not the next, a fatty psoas cut short on some), the L3
    area is one draw of that and not evaluable, even when the slices next to it swing with it.  A smooth course, or
    one unstable slice far from the level, passes; the bound is per level and per row."""
    from pipelines.body_composition.plausibility import around_level_reason

    gates = load_gates()
    (g,) = [c for c in gates.continuity if c.key == "psoas_left"]
    assert g.around_level_mm == 15.0 and g.around_levels == ("L3",)
    smooth = [4.0 + 0.5 * i for i in range(17)]  # 5 mm slices, L1 to L5
    at = 8
    assert around_level_reason("psoas_left", smooth, at, 5.0, gates, "L3") is None
    far = list(smooth)
    far[1] = 20.0  # one slice outlined wrong, beyond 15 mm of the level
    assert around_level_reason("psoas_left", far, at, 5.0, gates, "L3") is None
    swings = list(smooth)
    for k in (at - 2, at, at + 1, at + 3):  # the level slice and its near neighbours alternately cut short
        swings[k] *= 0.55
    reason = around_level_reason("psoas_left", swings, at, 5.0, gates, "L3")
    assert reason is not None and "continuity at the level" in reason and "within 15 mm" in reason, reason
    assert around_level_reason("psoas_left", swings, at, 5.0, gates, "C3") is None  # L3 only
    assert around_level_reason("erector_left", swings, at, 5.0, gates, "L3") is None  # no bound on that row
    assert around_level_reason("psoas_left", swings, 40, 5.0, gates, "L3") is None  # the level outside the course
