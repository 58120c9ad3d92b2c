"""SEG and TID 1500 SR builders on real shared CT: dciodvfy, highdicom round trip, geometry."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from dicom_templates import codes
from dicom_templates.common import Algorithm
from dicom_templates.seg import build_seg
from dicom_templates.sr import (
    OHIF_TRACKING_IDENTIFIER,
    LevelProvenance,
    Measurement,
    Outline,
    PlanarGroup,
    Qualitative,
    Text,
    TrackingKey,
    VolumeGroup,
    build_measurement_report,
    close_polygon,
    read_groups,
    tracking_uid,
)
from pipelines.base import Identity, Predecessor
from tests.conftest import need
from tests.peers import dciodvfy

IDENTITY = Identity(manufacturer="prognode", software_version="0.1.0", device_serial_number="test-serial-7")
ALGORITHM = Algorithm("builder-test", "2.1", "family-histogram", {"threshold": "-500"})


def write_read(obj: Dataset, path: Path) -> Dataset:
    obj.save_as(path)
    ok, report = dciodvfy(path)
    assert ok, report
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def ct2(shared_data: Path) -> list[Dataset]:
    files = sorted((shared_data / "pydicom_testfiles" / "CT2_series").iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def _masks(n: int, rows: int, cols: int) -> dict[str, np.ndarray]:
    a = np.zeros((n, rows, cols), dtype=bool)
    b = np.zeros((n, rows, cols), dtype=bool)
    a[1, 2:9, 3:12] = True
    a[3, 5:7, 5:7] = True
    b[1:3, 10:14, 1:5] = True
    b[1, 3:5, 4:6] = True  # overlaps a: stacked-segments path
    return {"iliopsoas-left": a, "sat": b}


def test_seg_on_ct2_round_trip_and_geometry(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    masks = _masks(len(ct2), int(ct2[0].Rows), int(ct2[0].Columns))
    seg = build_seg(ct2, masks, ALGORITHM, IDENTITY, "builder test SEG")
    back = hd.seg.segread(write_read(seg, tmp_path / "seg.dcm").filename)  # type: ignore[arg-type]

    assert back.SegmentationType == "BINARY"
    assert back.FrameOfReferenceUID == ct2[0].FrameOfReferenceUID
    assert back.StudyInstanceUID == ct2[0].StudyInstanceUID
    assert back.SeriesNumber == IDENTITY.seg_series_number
    (eq,) = [e for e in back.ContributingEquipmentSequence if e.Manufacturer == "prognode"]
    assert (eq.Manufacturer, eq.DeviceSerialNumber, eq.SoftwareVersions) == ("prognode", "test-serial-7", "0.1.0")
    labels = [s.SegmentLabel for s in back.SegmentSequence]
    assert labels == ["Iliopsoas left", "Subcutaneous adipose tissue"]
    s1 = back.get_segment_description(1)
    assert s1.segmented_property_type == codes.segment("iliopsoas-left").type
    assert s1.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert s1.algorithm_identification[0].AlgorithmName == "builder-test"

    # every stored frame sits exactly on the source image it was derived from (omitted empty
    # frames shift nothing), and the pixels come back where they were
    by_uid = {d.SOPInstanceUID: d for d in ct2}
    index = {d.SOPInstanceUID: k for k, d in enumerate(ct2)}
    assert back.NumberOfFrames < 2 * len(ct2)  # empty frames were omitted
    for f, item in enumerate(back.PerFrameFunctionalGroupsSequence):
        src_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in by_uid[src_uid].ImagePositionPatient])
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        key = list(masks)[number - 1]
        assert np.array_equal(back.pixel_array[f].astype(bool), masks[key][index[src_uid]])
    arr = back.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in ct2], segment_numbers=[1, 2], combine_segments=False, skip_overlap_checks=True
    )
    for i, key in enumerate(masks):
        assert np.array_equal(arr[..., i].astype(bool), masks[key])


def test_seg_on_enhanced_ct_multiframe(shared_data: Path, tmp_path: Path) -> None:
    need("dciodvfy")
    ect = pydicom.dcmread(shared_data / "pydicom_testfiles" / "eCT_Supplemental.dcm")
    mask = np.zeros((2, 512, 512), dtype=bool)
    mask[1, 100:200, 150:300] = True  # frame 2 only: frame 1 is omitted
    seg = build_seg([ect], {"liver": mask}, ALGORITHM, IDENTITY, "enhanced CT SEG")
    back = hd.seg.segread(write_read(seg, tmp_path / "seg-ect.dcm").filename)  # type: ignore[arg-type]
    assert back.NumberOfFrames == 1
    item = back.PerFrameFunctionalGroupsSequence[0]
    src = item.DerivationImageSequence[0].SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == ect.SOPInstanceUID
    assert int(src.ReferencedFrameNumber) == 2
    expected = ect.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient
    assert np.allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient], [float(v) for v in expected])
    assert np.array_equal(back.pixel_array.astype(bool), mask[1])


def test_seg_refuses_bad_input(ct2: list[Dataset]) -> None:
    n, r, c = len(ct2), int(ct2[0].Rows), int(ct2[0].Columns)
    with pytest.raises(KeyError, match="spleen-of-doom"):
        build_seg(ct2, {"spleen-of-doom": np.zeros((n, r, c), bool)}, ALGORITHM, IDENTITY, "x")
    with pytest.raises(ValueError, match="shape"):
        build_seg(ct2, {"liver": np.zeros((n - 1, r, c), bool)}, ALGORITHM, IDENTITY, "x")
    with pytest.raises(ValueError, match="device_serial_number"):
        build_seg(ct2, {"liver": np.ones((n, r, c), bool)}, ALGORITHM,
                  Identity("prognode", "0.1.0", ""), "x")


def _planar(image: Dataset) -> PlanarGroup:
    return PlanarGroup(
        tracking_id="muscle-l3",
        finding="skeletal-muscle",
        finding_site="l3-vertebra",
        image=image,
        polygon=np.array([[2.0, 2.0], [12.0, 2.5], [13.0, 12.0], [3.0, 13.0]]),
        measurements=[
            Measurement("area", 1234.5, "mm2"),
            Measurement("attenuation", 38.25, "[hnsf'U]", derivation="mean"),
            Measurement("smi", 52.1, "cm2/m2"),
        ],
        qualitative=[Qualitative("sarcopenia", "absent")],
        text=[Text("cutoff-used", "Prado 2008 (men < 52.4 cm2/m2)")],
    )


def test_planar_report_round_trip(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    old = Predecessor(sop_instance_uid=hd.UID(), series_uid=hd.UID(), study_uid=str(ct2[0].StudyInstanceUID),
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34")
    sr = build_measurement_report([ct2[1]], [_planar(ct2[1])], ALGORITHM, IDENTITY, "planar SR", predecessors=[old])
    path = tmp_path / "sr.dcm"
    back = hd.sr.srread(write_read(sr, path).filename)  # type: ignore[arg-type]
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert back.StudyInstanceUID == ct2[0].StudyInstanceUID
    assert back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]\
        .ReferencedSOPInstanceUID == old.sop_instance_uid
    assert [i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence] == ["99PROGNODE"]
    # observer context names the device (TID 1004)
    ds = pydicom.dcmread(path)
    texts = {it.ConceptNameCodeSequence[0].CodeMeaning: it.get("TextValue") for it in ds.ContentSequence
             if it.ValueType == "TEXT"}
    assert texts.get("Device Observer Serial Number") == "test-serial-7"
    (g,) = read_groups(ds)
    assert g.tracking_identifier == OHIF_TRACKING_IDENTIFIER and g.tracking_uid
    assert g.finding == ("SCT", "127954009") and g.finding_site == ("SCT", "36470004")
    assert g.measurements == {"Area": (1234.5, "mm2"), "Attenuation Coefficient": (38.25, "[hnsf'U]"),
                              "Skeletal muscle index": (52.1, "cm2/m2")}
    assert g.qualitative["Sarcopenia"] == "Absent"
    assert g.texts["Cut-off used"].startswith("Prado 2008")
    assert g.algorithm == ("builder-test", "2.1")
    assert len(g.scoords) == 3  # each NUM INFERRED FROM the polygon
    assert np.array_equal(g.scoords[0][0], g.scoords[0][-1]) and len(g.scoords[0]) == 5
    # highdicom reads the TID 1501 group back too
    groups = back.content.get_image_measurement_groups()
    assert len(groups) == 1 and groups[0].finding_type == codes.finding("skeletal-muscle")
    # stable tracking UID for the same ROI in the same study
    again = build_measurement_report([ct2[1]], [_planar(ct2[1])], ALGORITHM, IDENTITY, "planar SR")
    again.save_as(tmp_path / "sr2.dcm")
    assert read_groups(pydicom.dcmread(tmp_path / "sr2.dcm"))[0].tracking_uid == g.tracking_uid


def test_volume_groups_need_their_own_sr(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    masks = _masks(len(ct2), int(ct2[0].Rows), int(ct2[0].Columns))
    seg = build_seg(ct2, masks, ALGORITHM, IDENTITY, "SEG")
    vg = VolumeGroup("sat-volume", "sat", seg, 2, [Measurement("volume", 0.25, "ml")], finding_site="abdomen")
    with pytest.raises(ValueError, match="no SCOORD"):
        build_measurement_report([*ct2, seg], [_planar(ct2[1]), vg], ALGORITHM, IDENTITY, "mixed")
    with pytest.raises(ValueError, match="segment 3"):
        build_measurement_report([*ct2, seg], [VolumeGroup("x", "sat", seg, 3)], ALGORITHM, IDENTITY, "x",
                                 allow_scoordless=True)
    sr = build_measurement_report([*ct2, seg], [vg], ALGORITHM, IDENTITY, "volumes", allow_scoordless=True)
    (g,) = read_groups(write_read(sr, tmp_path / "sr-vol.dcm"))
    assert g.referenced_segment == 2 and g.tracking_identifier == "sat-volume"
    assert g.measurements == {"Volume": (0.25, "ml")} and not g.scoords


def test_outlined_volume_group_sits_beside_planar_groups(ct2: list[Dataset], tmp_path: Path) -> None:
    """A volume group with its segment's outline on one image (TID 1501: every NUM INFERRED FROM the SEG segment,
    the first also from the outline): no SCOORD-less group, so it needs no separate SR; valid (dciodvfy), read back."""
    need("dciodvfy")
    masks = _masks(len(ct2), int(ct2[0].Rows), int(ct2[0].Columns))
    seg = build_seg(ct2, masks, ALGORITHM, IDENTITY, "SEG")
    square = np.array([[2.0, 2.0], [10.0, 2.0], [10.0, 10.0], [2.0, 10.0]])
    vg = VolumeGroup("sat-volume", "sat", seg, 2, [Measurement("volume", 0.25, "ml"),
                                                   Measurement("attenuation", -90.5, "[hnsf'U]", derivation="mean")],
                     finding_site="abdomen", outline=Outline(ct2[1], square))
    sr = build_measurement_report([ct2[1], seg], [_planar(ct2[1]), vg], ALGORITHM, IDENTITY, "volumes")
    path = tmp_path / "sr-outlined.dcm"
    ds = write_read(sr, path)
    ok, text = dciodvfy(path)
    assert ok, text
    g = read_groups(ds)[1]
    assert g.tracking_identifier == OHIF_TRACKING_IDENTIFIER and g.referenced_segment == 2
    assert g.measurements == {"Volume": (0.25, "ml"), "Attenuation Coefficient": (-90.5, "[hnsf'U]")}
    assert len(g.scoords) == 1 and len(g.scoords[0]) == 5 and np.allclose(g.scoords[0][0], g.scoords[0][-1])
    imaging = next(it for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "126010")
    nums = [it for it in imaging.ContentSequence[-1].ContentSequence if it.ValueType == "NUM"]
    for num in nums:  # each value INFERRED FROM the SEG segment
        (src,) = [it for it in num.ContentSequence if it.ValueType == "IMAGE"]
        assert src.RelationshipType == "INFERRED FROM" and src.ConceptNameCodeSequence[0].CodeValue == "121112"
        assert src.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(src.ReferencedSOPSequence[0].ReferencedSegmentNumber) == 2
    scoord = next(it for it in nums[0].ContentSequence if it.ValueType == "SCOORD")
    assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ct2[1].SOPInstanceUID
    assert not [it for it in nums[1].ContentSequence if it.ValueType == "SCOORD"]
    with pytest.raises(ValueError, match="leaves"):
        build_measurement_report([ct2[0], seg], [replace(vg, outline=Outline(ct2[0], square + 1e4))],
                                 ALGORITHM, IDENTITY, "x")


def _numeric_values(ds: Dataset) -> list[str]:
    return [str(e.value) for e in ds.iterall() if e.keyword in ("NumericValue", "FloatingPointValue")]


def test_not_evaluable_report(ct2: list[Dataset], tmp_path: Path) -> None:
    """Default form: a TID 1410 group outlining the examined image, no NUM and so no number at all."""
    need("dciodvfy")
    sr = build_measurement_report(ct2, [], ALGORITHM, IDENTITY, "not evaluable",
                                  not_evaluable_reason="gantry tilt 18.5 degrees")
    ds = write_read(sr, tmp_path / "sr-ne.dcm")
    assert _numeric_values(ds) == []  # no made-up measurement
    (g,) = read_groups(ds)
    assert g.scoords, "an OHIF-safe group needs a SCOORD"
    assert g.measurements == {} and g.qualifiers == {}
    assert g.qualitative == {"Evaluability": "Not evaluable"}
    assert g.texts["Reason not evaluable"] == "gantry tilt 18.5 degrees"
    report_level = [it for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert len(report_level) == 1
    values = {it.ConceptNameCodeSequence[0].CodeMeaning: it.get("TextValue") or it.ConceptCodeSequence[0].CodeMeaning
              for it in report_level[0].ContentSequence}
    assert values == {"Evaluability": "Not evaluable", "Reason not evaluable": "gantry tilt 18.5 degrees"}
    back = hd.sr.srread(tmp_path / "sr-ne.dcm")  # highdicom reads it back
    assert len(back.content.get_planar_roi_measurement_groups()) == 1
    with pytest.raises(ValueError, match="not_evaluable_reason"):
        build_measurement_report(ct2, [], ALGORITHM, IDENTITY, "nothing")
    with pytest.raises(ValueError, match="say why"):
        build_measurement_report(ct2, [], ALGORITHM, IDENTITY, "x", not_evaluable_reason=" ")


def test_not_evaluable_num_has_a_qualifier_and_no_number(ct2: list[Dataset], tmp_path: Path) -> None:
    """The NUM form: empty Measured Value Sequence, Numeric Value Qualifier (CID 42) and the reason."""
    need("dciodvfy")
    sr = build_measurement_report(ct2, [], ALGORITHM, IDENTITY, "not evaluable",
                                  not_evaluable_reason="no vertebra in view", not_evaluable_form="num-qualifier")
    ds = write_read(sr, tmp_path / "sr-ne-num.dcm")
    assert _numeric_values(ds) == []
    (g,) = read_groups(ds)
    assert g.measurements == {} and g.qualifiers == {"Area": "Value unknown"}
    assert g.texts["Reason not evaluable"] == "Area: no vertebra in view" and g.scoords
    # highdicom 0.28 cannot parse a NUM without a value (PS3.3 C.18.1 allows it): pinned here so
    # that a highdicom that can is noticed (then the NUM form may become the default)
    with pytest.raises(IndexError):
        hd.sr.srread(tmp_path / "sr-ne-num.dcm")
    with pytest.raises(ValueError, match="say why"):
        Measurement("area", None, "mm2")


def test_missing_value_in_an_evaluable_group(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    g = PlanarGroup("muscle", "skeletal-muscle", ct2[1], np.array([[2.0, 2.0], [12.0, 2.5], [13.0, 12.0]]),
                    [Measurement("area", 12.5, "cm2"),
                     Measurement("smi", None, "cm2/m2", reason="PatientSize (height) missing")],
                    finding_site="l3-vertebra")
    ds = write_read(build_measurement_report([ct2[1]], [g], ALGORITHM, IDENTITY, "x"), tmp_path / "sr-miss.dcm")
    (r,) = read_groups(ds)
    assert r.measurements == {"Area": (12.5, "cm2")}
    assert r.qualifiers == {"Skeletal muscle index": "Value unknown"}
    assert r.texts["Reason not evaluable"] == "Skeletal muscle index: PatientSize (height) missing"
    assert _numeric_values(ds) == ["12.5", "12.5"]  # the area only (DS and FD)


def _study(image: Dataset, study: str, patient: str = "77654033") -> Dataset:
    """``image`` as if from another study of (by default) the same patient."""
    out = copy.deepcopy(image)
    out.StudyInstanceUID, out.SeriesInstanceUID, out.SOPInstanceUID = hd.UID(), hd.UID(), hd.UID()
    out.PatientID, out.StudyID = patient, study
    return out


def _group(image: Dataset, finding: str, side: str, level: str = "L3") -> PlanarGroup:
    return PlanarGroup(f"bc-{finding}", finding, image, np.array([[2.0, 2.0], [12.0, 2.5], [13.0, 12.0]]),
                       [Measurement("area", 10.0, "cm2")], finding_site="l3-vertebra",
                       tracking_key=TrackingKey("iliopsoas", side, level))


def test_tracking_uid_follows_patient_structure_side_and_level(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    first, later = _study(ct2[1], "1"), _study(ct2[1], "2")
    assert first.StudyInstanceUID != later.StudyInstanceUID

    def uids(image: Dataset, name: str, *groups: PlanarGroup) -> list[str]:
        sr = build_measurement_report([image], list(groups), ALGORITHM, IDENTITY, "x")
        return [g.tracking_uid for g in read_groups(write_read(sr, tmp_path / name))]

    a = uids(first, "a.dcm", _group(first, "iliopsoas-left", "left"), _group(first, "iliopsoas-right", "right"))
    b = uids(later, "b.dcm", _group(later, "iliopsoas-left", "left"), _group(later, "iliopsoas-right", "right"))
    assert a == b, "same patient, structure, side and level in a later study: same Tracking UID"
    assert a[0] != a[1], "another side: another Tracking UID"
    other = _study(ct2[1], "1", patient="someone-else")
    assert uids(other, "c.dcm", _group(other, "iliopsoas-left", "left"))[0] != a[0]
    assert uids(first, "d.dcm", _group(first, "iliopsoas-left", "left", level="C3"))[0] != a[0]
    assert a[0] == tracking_uid("", "77654033", TrackingKey("iliopsoas", "left", "L3"))
    assert all(u.startswith("2.25.") and len(u) <= 64 and u[5:].isdigit() for u in a)
    assert tracking_uid("HOSP-A", "1", TrackingKey("x")) != tracking_uid("HOSP-B", "1", TrackingKey("x"))
    with pytest.raises(ValueError, match="side"):
        TrackingKey("iliopsoas", "up")


def test_groups_carry_laterality_on_their_finding_site(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    sr = build_measurement_report([ct2[1]], [_group(ct2[1], "iliopsoas-left", "left"),
                                             _group(ct2[1], "iliopsoas-right", "right"),
                                             _planar(ct2[1])], ALGORITHM, IDENTITY, "sides")
    left, right, muscle = read_groups(write_read(sr, tmp_path / "sides.dcm"))
    assert left.finding == right.finding == ("SCT", "68455001")
    assert left.laterality == ("SCT", "7771000") and right.laterality == ("SCT", "24028007")
    assert left.finding_sites == [("SCT", "68455001"), ("SCT", "36470004")]
    assert muscle.laterality is None and muscle.finding_sites == [("SCT", "36470004")]
    back = hd.sr.srread(tmp_path / "sides.dcm")
    (g0, *_) = back.content.get_image_measurement_groups()
    assert [s.laterality for s in g0.finding_sites][0] == dcm_codes.SCT.Left


def test_reader_confirmed_level(ct2: list[Dataset], tmp_path: Path) -> None:
    need("dciodvfy")
    level = LevelProvenance("L3", reader_confirmed=True, anchors=["sacrum: L3 at slice 12", "lowest rib: L2"],
                            confidence="low: anchors disagree", reader="Curie^Marie",
                            confirmed_at="2026-12-05T21:00:00Z")
    sr = build_measurement_report([ct2[1]], [_planar(ct2[1])], ALGORITHM, IDENTITY, "confirmed", level=level)
    ds = write_read(sr, tmp_path / "confirmed.dcm")
    top = {it.ConceptNameCodeSequence[0].CodeMeaning: it for it in ds.ContentSequence}
    assert str(top["Person Observer Name"].PersonName) == "Curie^Marie"
    assert top["Person Observer's Role in this Procedure"].ConceptCodeSequence[0].CodeValue == "C28747"
    assert top["Device Observer Serial Number"].TextValue == "test-serial-7"  # the device is still named
    (qe,) = [it for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    items = [(it.ConceptNameCodeSequence[0].CodeMeaning,
              it.get("TextValue") or it.ConceptCodeSequence[0].CodeMeaning) for it in qe.ContentSequence]
    assert ("Level source", "Level confirmed by reader") in items
    assert ("Level anchor vote", "sacrum: L3 at slice 12") in items and ("Level anchor vote", "lowest rib: L2") in items
    assert ("Level confidence", "low: anchors disagree") in items
    assert ("Level confirmation time", "2026-12-05T21:00:00Z") in items
    assert hd.sr.srread(tmp_path / "confirmed.dcm").SOPInstanceUID == ds.SOPInstanceUID
    # a viewer marker may not name its reader: still reader-confirmed, with no made-up person observer
    anon = build_measurement_report([ct2[1]], [_planar(ct2[1])], ALGORITHM, IDENTITY, "confirmed",
                                    level=LevelProvenance("L3", reader_confirmed=True))
    ds = write_read(anon, tmp_path / "anon.dcm")
    assert not any(it.ValueType == "PNAME" for it in ds.ContentSequence)


def test_polygons_are_closed_and_checked(ct2: list[Dataset]) -> None:
    square = close_polygon([[0, 0], [4, 0], [4, 4], [0, 4]])
    assert len(square) == 5 and np.array_equal(square[0], square[-1])
    assert len(close_polygon(square)) == 5  # already closed: not closed twice
    with pytest.raises(ValueError, match="3 distinct"):
        close_polygon([[0, 0], [1, 1], [0, 0]])
    bad = PlanarGroup("x", "liver", ct2[0], np.array([[0, 0], [40, 0], [40, 40]]), [Measurement("area", 1, "mm2")])
    with pytest.raises(ValueError, match="leaves"):
        build_measurement_report([ct2[0]], [bad], ALGORITHM, IDENTITY, "x")
    nan = PlanarGroup("x", "liver", ct2[0], np.array([[0, 0], [4, 0], [4, 4]]), [Measurement("area", float("nan"), "mm2")])
    with pytest.raises(ValueError, match="not finite"):
        build_measurement_report([ct2[0]], [nan], ALGORITHM, IDENTITY, "x")


def test_identity_is_written_without_placeholders(ct2: list[Dataset]) -> None:
    ident = Identity("prognode", "0.2.0", "serial-42", institution_name="Test Hospital", seg_series_number=77,
                     sr_series_number=78)
    masks = {"liver": np.ones((len(ct2), int(ct2[0].Rows), int(ct2[0].Columns)), bool)}
    seg = build_seg(ct2, masks, ALGORITHM, ident, "SEG")
    sr = build_measurement_report([ct2[1]], [_planar(ct2[1])], ALGORITHM, ident, "SR")
    for obj, number in ((seg, 77), (sr, 78)):
        assert obj.SeriesNumber == number
        assert (obj.Manufacturer, obj.SoftwareVersions, obj.DeviceSerialNumber) == ("prognode", "0.2.0", "serial-42")
        assert obj.InstitutionName == "Test Hospital"
    with pytest.raises(ValueError, match="manufacturer"):
        build_measurement_report([ct2[1]], [_planar(ct2[1])], ALGORITHM, Identity(" ", "1", "s"), "SR")


def test_sources_missing_type2_attributes(shared_data: Path, tmp_path: Path) -> None:
    """Real data lacks Type 2 patient/study attributes at times: the objects get them empty."""
    need("dciodvfy")
    files = sorted((shared_data / "pydicom_testfiles" / "CT2_series").iterdir())
    sources = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    for d in sources:
        for kw in ("PatientBirthDate", "StudyID", "AccessionNumber"):
            if kw in d:
                delattr(d, kw)
    masks = {"liver": np.ones((len(sources), int(sources[0].Rows), int(sources[0].Columns)), bool)}
    seg = build_seg(sources, masks, ALGORITHM, IDENTITY, "SEG")
    assert seg.PatientBirthDate == "" and "PatientBirthDate" not in sources[0]
    write_read(seg, tmp_path / "seg.dcm")
    sr = build_measurement_report(sources[1:2], [_planar(sources[1])], ALGORITHM, IDENTITY, "SR")
    write_read(sr, tmp_path / "sr.dcm")
