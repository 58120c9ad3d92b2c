"""Anatomical phantom: geometry round trip, anatomy-true truth, DICOM read-back.

The phantom is built from the real VerSe spines in ../shared/data/verse_vertebra_masks; the
tests skip with a reason when that folder is missing.  One 256 x 256 T10-S1 phantom (module
fixture) serves the geometry tests; the anatomy variants use 128 x 128 images to stay fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from pipelines.body_composition.anatomy_phantom import (
    LABELS,
    Anatomy,
    AnatomySpec,
    Geometry,
    SeriesTruth,
    make_anatomy,
    write_anatomy,
    write_series,
)
from pipelines.body_composition.anatomy_spine import DATA, NUMBERS
from pipelines.common.volume import SeriesToVolume, Volume
from tests.conftest import need
from tests.peers import dciodvfy

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"VerSe masks not found at {DATA}")

GEOMETRIES = (Geometry("HFS"), Geometry("HFS", mirror_rows=True), Geometry("HFP"), Geometry("FFS"),
              Geometry("FFP", mirror_rows=True))


@pytest.fixture(scope="module")
def phantom() -> Anatomy:
    return make_anatomy(AnatomySpec(seed=2))


@pytest.fixture(scope="module")
def written(phantom: Anatomy, tmp_path_factory: pytest.TempPathFactory) -> dict[Geometry, SeriesTruth]:
    base = tmp_path_factory.mktemp("anat")
    return {g: write_series(phantom, base / f"{g.position}{int(g.mirror_rows)}", g) for g in GEOMETRIES}


def _volume_order(truth: SeriesTruth) -> tuple[Volume, list[int]]:
    vol = SeriesToVolume().run(truth.files)
    order = [truth.sop_uids.index(str(s.dataset.SOPInstanceUID)) for s in vol.slices]
    return vol, order


def test_default_phantom_is_small_and_covers_t10_to_s1(phantom: Anatomy) -> None:
    assert phantom.labels.shape[1:] == (256, 256)
    assert 40 <= phantom.labels.shape[0] <= 80
    seen = phantom.anchors["levels_in_view"]
    assert isinstance(seen, list)
    for lv in ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"):
        assert lv in seen


def test_geometry_round_trip_keeps_anatomy_at_the_same_lps_points(written: dict[Geometry, SeriesTruth]) -> None:
    ref = written[Geometry("HFS")]
    for g, truth in written.items():
        ds = pydicom.dcmread(truth.files[0])
        assert [float(v) for v in ds.ImageOrientationPatient] == [*truth.row_direction, *truth.column_direction]
        assert ds.PatientPosition == g.position
        vol, order = _volume_order(truth)
        # what SeriesToVolume reads is what was written (integers as stored)
        assert np.array_equal(vol.hu, truth.hu[order])
        for name in ("psoas_left", "erector_right", "liver", "spleen", "kidney_left", "aorta"):
            lab = truth.mask(name)[order]
            kk, rr, cc = np.nonzero(lab)
            sel = slice(None, None, max(1, len(kk) // 400))
            pts = np.array([vol.index_to_world(k, r, c) for k, r, c in zip(kk[sel], rr[sel], cc[sel], strict=True)])
            assert np.allclose(pts.mean(axis=0), ref.centroid_lps(name), atol=3.0), (g, name)
            assert np.allclose(truth.centroid_lps(name), ref.centroid_lps(name), atol=1e-6), (g, name)
        # the level truth names the same plane whatever the slice order
        for lv, i in truth.level_slices.items():
            assert truth.positions[i][2] == pytest.approx(ref.positions[ref.level_slices[lv]][2]), (g, lv)
    hf, ff = written[Geometry("HFS")], written[Geometry("FFS")]
    assert hf.positions[0][2] > hf.positions[-1][2]  # head first: first image most superior
    assert ff.positions[0][2] < ff.positions[-1][2]


def test_laterality_is_patient_side_in_every_geometry(written: dict[Geometry, SeriesTruth]) -> None:
    for g, truth in written.items():
        for name, sign in (("psoas_left", 1), ("psoas_right", -1), ("erector_left", 1), ("erector_right", -1),
                           ("quadratus_left", 1), ("spleen", 1), ("liver", -1), ("kidney_right", -1)):
            assert np.sign(truth.centroid_lps(name)[0]) == sign, (g, name)
    # mirrored rows: the same patient-left structure lies in the opposite image half
    a, b = written[Geometry("HFS")], written[Geometry("HFS", mirror_rows=True)]
    k = a.level_slices["L3"]
    ca = np.nonzero(a.mask("psoas_left")[k])[1].mean()
    cb = np.nonzero(b.mask("psoas_left")[b.level_slices["L3"]])[1].mean()
    assert ca > a.labels.shape[2] / 2 > cb


def test_dicom_header_carries_what_smi_needs(written: dict[Geometry, SeriesTruth]) -> None:
    truth = written[Geometry("HFS")]
    need("dciodvfy")
    for g in (Geometry("HFS"), Geometry("FFP", mirror_rows=True)):
        ok, text = dciodvfy(written[g].files[0])
        assert ok, text
    ds = pydicom.dcmread(truth.files[len(truth.files) // 2])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert pydicom.uid.UID(str(ds[kw].value)).is_valid
    assert float(ds.PatientSize) > 1.0 and float(ds.PatientWeight) > 30.0
    assert ds.PatientSex in ("M", "F") and ds.PatientAge.endswith("Y")
    assert float(ds.SliceThickness) == pytest.approx(5.0)
    assert len({str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in truth.files}) == 1


def test_ribs_belong_to_thoracic_vertebrae_and_articulate_with_them(phantom: Anatomy) -> None:
    owners = {int(v) for v in np.unique(phantom.ribs) if v}
    assert owners and owners <= {NUMBERS[f"T{i}"] for i in range(1, 13)}
    assert phantom.anchors["lowest_rib_bearing"] == "T12"
    # each T10-T12 rib touches its own vertebra (head at the costal facet, tubercle at the transverse process)
    st = ndimage.generate_binary_structure(3, 2)
    for lv in ("T10", "T11", "T12"):
        v = NUMBERS[lv]
        rib = phantom.ribs == v
        assert rib.any(), lv
        near = ndimage.binary_dilation(rib, structure=st, iterations=2)
        assert (near & (phantom.vertebrae == v)).any(), f"{lv} rib does not reach its vertebra"
        x = phantom.x[np.nonzero(rib)[2]]
        assert (x > 0).any() and (x < 0).any(), f"{lv} ribs on both sides"
    # no rib below T12's body
    lowest_rib_z = phantom.z[np.nonzero((phantom.labels == LABELS["rib"]).any(axis=(1, 2)))[0].min()]
    assert lowest_rib_z > phantom.level_z["L1"]


def test_iliac_crest_at_l4_l5_and_sacrum_below_l5(phantom: Anatomy) -> None:
    ilium = (phantom.labels == LABELS["ilium"]).any(axis=(1, 2))
    top = phantom.z[np.nonzero(ilium)[0].max()]
    assert phantom.level_z["L5"] < top < phantom.level_z["L4"]
    sac = (phantom.vertebrae == 26).any(axis=(1, 2))
    assert phantom.z[np.nonzero(sac)[0].max()] < phantom.level_z["L5"]
    # discs between the bodies from T10 down to S1
    disc_z = phantom.z[np.nonzero((phantom.labels == LABELS["disc"]).any(axis=(1, 2)))[0]]
    names = ["T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1"]
    for up, lo in zip(names[:-1], names[1:], strict=True):
        between = (disc_z < phantom.level_z[up]) & (disc_z > phantom.level_z[lo])
        assert between.any(), f"no disc between {up} and {lo}"


def test_muscles_touch_bone_and_organs(phantom: Anatomy) -> None:
    k = int(np.argmin(np.abs(phantom.z - phantom.level_z["L3"])))
    lab = phantom.labels[k]

    def touch(a: str, *b: str) -> bool:
        m = ndimage.binary_dilation(lab == LABELS[a])
        return bool((m & np.isin(lab, [LABELS[n] for n in b])).any())

    for side in ("left", "right"):
        assert touch(f"psoas_{side}", "vertebra"), side
        assert touch(f"erector_{side}", "vertebra"), side
    assert phantom.x[np.nonzero(lab == LABELS["psoas_left"])[1]].mean() > 0
    # kidneys against psoas or quadratus lumborum somewhere, liver against the right wall, arms against the trunk
    lab3 = phantom.labels
    kid = ndimage.binary_dilation(np.isin(lab3, [LABELS["kidney_left"], LABELS["kidney_right"]]))
    assert (kid & np.isin(lab3, [LABELS[n] for n in ("psoas_left", "psoas_right", "quadratus_left",
                                                     "quadratus_right")])).any()
    liver = ndimage.binary_dilation(lab3 == LABELS["liver"])
    assert (liver & (lab3 == LABELS["wall_right"])).any()
    arm = ndimage.binary_dilation(lab3 == LABELS["arm_skin"])
    assert (arm & (lab3 == LABELS["skin"])).any()
    bowel = ndimage.binary_dilation(np.isin(lab3, [LABELS["small_bowel"], LABELS["colon"], LABELS["bowel_gas"]]))
    assert (bowel & np.isin(lab3, [LABELS["rectus_left"], LABELS["rectus_right"]])).any()


def test_psoas_contacts_touch_psoas_at_l3_with_their_own_labels() -> None:
    """Each psoas contact lies against the psoas at the L3 middle (no fat pixel between) under its own truth label;
    the arterial phase opacifies the aorta and leaves the IVC unopacified; an unknown contact is refused."""
    from pipelines.body_composition.anatomy_phantom import CONTACT_LABELS, PSOAS_CONTACTS

    psoas = [LABELS[n] for n in ("psoas_left", "psoas_right", "psoas_fat_left", "psoas_fat_right")]
    for contact in PSOAS_CONTACTS:
        ph = make_anatomy(AnatomySpec(habitus="thin", top="L3", bottom="L3", seed=3, psoas_contacts=(contact,)))
        k = int(np.argmin(np.abs(ph.z - ph.level_z["L3"])))
        lab = ph.labels[k]
        own = np.isin(lab, [LABELS[n] for n in CONTACT_LABELS[contact]])
        assert own.any(), contact
        assert (ndimage.binary_dilation(np.isin(lab, psoas)) & own).any(), contact
    art = make_anatomy(AnatomySpec(top="L3", bottom="L3", psoas_contacts=("ivc",), contrast_phase="arterial"))
    k = int(np.argmin(np.abs(art.z - art.level_z["L3"])))
    assert art.hu[k][art.labels[k] == LABELS["aorta"]].mean() > 200
    assert art.hu[k][art.labels[k] == LABELS["ivc"]].mean() < 80
    with pytest.raises(ValueError, match="psoas contacts"):
        make_anatomy(AnatomySpec(psoas_contacts=("spleen",)))


def test_habitus_contrast_rib_count_and_transitional_options(tmp_path: Path) -> None:
    small = dict(rows=128, slice_mm=5.0, top="T11", bottom="L5")
    thin = make_anatomy(AnatomySpec(habitus="thin", contrast=False, rib_pairs=11, **small))  # type: ignore[arg-type]
    obese = make_anatomy(AnatomySpec(habitus="obese", rib_pairs=13, **small))  # type: ignore[arg-type]
    sat = [float((a.labels == LABELS["sat"]).sum()) for a in (thin, obese)]
    assert sat[1] > 3 * sat[0]
    assert thin.anchors["lowest_rib_bearing"] == "T11"
    assert NUMBERS["T12"] not in set(np.unique(thin.ribs))
    assert obese.anchors["lowest_rib_bearing"] == "L1" and NUMBERS["L1"] in set(np.unique(obese.ribs))
    liver_nc = float(np.median(thin.hu[thin.labels == LABELS["liver"]]))
    liver_c = float(np.median(obese.hu[obese.labels == LABELS["liver"]]))
    assert 45 < liver_nc < 75 and 95 < liver_c < 135
    lstv = write_anatomy(AnatomySpec(sacralised_l5=True, rows=128, top="L4", bottom="S1"), tmp_path / "lstv",
                         Geometry("FFS"))
    assert lstv.anchors["transitional"] == "sacralised L5"
    # feet first: the first image is the lowest, so S1 comes before L5 in the written order
    assert lstv.level_slices["S1"] < lstv.level_slices["L5"] < lstv.level_slices["L4"]


def test_thin_slices_and_neck_phantom(tmp_path: Path) -> None:
    thin = make_anatomy(AnatomySpec(rows=128, slice_mm=1.0, top="L3", bottom="L3"))
    assert np.allclose(np.diff(thin.z), 1.0)
    neck = make_anatomy(AnatomySpec(region="neck", rows=128, slice_mm=3.0))
    names = {n for n, v in LABELS.items() if (neck.labels == v).any()}
    assert {"scm_left", "scm_right", "paravertebral_left", "paravertebral_right", "airway"} <= names
    assert not names & {"psoas_left", "psoas_right", "vat", "liver"}
    truth = write_series(neck, tmp_path / "neck", Geometry("HFS", mirror_rows=True))
    assert "C3" in truth.level_slices
    assert truth.centroid_lps("scm_left")[0] > 0 > truth.centroid_lps("scm_right")[0]
    ds = pydicom.dcmread(truth.files[0])
    assert ds.BodyPartExamined == "NECK"


def test_overlapping_reconstruction_is_thick_slices_at_a_finer_spacing(tmp_path: Path) -> None:
    """``spacing_mm`` under ``slice_mm`` writes an overlapping reconstruction (3 mm slices every 2 mm, as the shared
    real CT): slice centres at the spacing, each slice the average over its thickness (an endplate 2 mm thick is
    dimmer in a 3 mm slice than in a 2 mm one), SliceThickness and SpacingBetweenSlices as written, and the level
    finder names L3 on it within one slice of the truth."""
    from pipelines.body_composition.levels import SpineLevelFinder

    spec = dict(rows=160, fov_mm=360.0, habitus="thin", arms=False, top="L1", bottom="S1")
    over = make_anatomy(AnatomySpec(slice_mm=3.0, spacing_mm=2.0, **spec))  # type: ignore[arg-type]
    contiguous = make_anatomy(AnatomySpec(slice_mm=2.0, **spec))  # type: ignore[arg-type]
    assert np.allclose(np.diff(over.z), 2.0) and np.allclose(over.z, contiguous.z)
    bone = over.labels == LABELS["vertebra"]
    assert bone.any() and float(over.hu.max()) < float(contiguous.hu.max())
    truth = write_series(over, tmp_path / "ct", Geometry("HFS"))
    ds = pydicom.dcmread(truth.files[0], stop_before_pixels=True)
    assert float(ds.SliceThickness) == 3.0 and float(ds.SpacingBetweenSlices) == 2.0 and truth.slice_mm == 2.0
    vol, _ = SeriesToVolume().run(truth.files).canonical_axial()
    assert vol.slice_spacing == pytest.approx(2.0) and vol.slice_thickness == pytest.approx(3.0)
    res = SpineLevelFinder().run(vol, ("L3",))
    assert res.level == "L3" and res.slice_index is not None, res.notes
    z = float(vol.index_to_world(res.slice_index, 0.0, 0.0)[2])
    assert abs(z - over.level_z["L3"]) <= 2.0
    with pytest.raises(ValueError, match="spacing_mm"):
        make_anatomy(AnatomySpec(slice_mm=2.0, spacing_mm=3.0, **spec))  # type: ignore[arg-type]
