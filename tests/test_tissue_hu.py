"""tissue-hu: options, stages on a phantom with known truth, real shared CT end to end, OHIF."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_templates import codes
from dicom_templates.common import Algorithm
from dicom_templates.sr import build_measurement_report, read_groups
from pipelines import registry
from pipelines.base import Identity, PipelineContext, PipelineOutput, Predecessor, SeriesInput
from pipelines.common.volume import Slice, Volume
from pipelines.tissue_hu import BodyMask, TissueHuOptions, TissueMasks, TissueMeasurements, create
from tests.conftest import need
from tests.peers import SHARED, dciodvfy

IDENTITY = Identity(manufacturer="prognode", software_version="0.1.0", device_serial_number="tissue-hu-test")


# ------------------------------------------------------------------------------------------
# options


def test_options_defaults_and_overrides() -> None:
    assert create({}).options == TissueHuOptions()
    p = registry.create("tissue-hu", {"adipose_min_hu": -200, "soft_max_hu": 100.5, "volume_sr": True})
    assert p.name == "tissue-hu" and p.options.adipose_min_hu == -200.0 and p.options.volume_sr is True  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"adipose_min": -190}, "pipelines.tissue-hu.adipose_min"),
        ({"soft_max_hu": "150"}, "pipelines.tissue-hu.soft_max_hu"),
        ({"volume_sr": 1}, "pipelines.tissue-hu.volume_sr"),
        ({"adipose_min_hu": -20}, "pipelines.tissue-hu.adipose_min_hu"),
        ({"soft_min_hu": -100}, "pipelines.tissue-hu.soft_min_hu"),
        ({"table_erosion_mm": -1}, "pipelines.tissue-hu.table_erosion_mm"),
        ({"body_threshold_hu": float("nan")}, "pipelines.tissue-hu.body_threshold_hu"),
    ],
)
def test_bad_options_name_the_key(options: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        create(options)


# ------------------------------------------------------------------------------------------
# phantom with known truth (stages only, no DICOM)

PIXEL = 1.0  # mm
SLICE = 2.5  # mm


def _phantom_volume(hu: np.ndarray) -> Volume:
    ds = pydicom.Dataset()
    z = hu.shape[0]
    slices = tuple(
        Slice(ds, None, np.array([0.0, 0.0, k * SLICE]), np.array([1.0, 0, 0, 0, 1, 0]), (PIXEL, PIXEL), 1.0, 0.0, SLICE)
        for k in range(z)
    )
    return Volume(
        series_uid="phantom", study_uid="phantom", hu=hu.astype(np.float32), slices=slices,
        row_direction=np.array([1.0, 0, 0]), column_direction=np.array([0, 1.0, 0]), normal=np.array([0, 0, 1.0]),
        pixel_spacing=(PIXEL, PIXEL), positions=np.arange(z) * SLICE, slice_spacing=SLICE, spacing_uniform=True,
        max_spacing_deviation=0.0, tilt_degrees=0.0, slice_thickness=SLICE,
    )


@dataclass
class Phantom:
    volume: Volume
    body: np.ndarray
    fat: np.ndarray
    soft: np.ndarray


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """An elliptic trunk (soft tissue 40 HU) in a 15 px fat ring (-100 HU) with a gas hole (-950 HU)
    and a fat-valued island inside the gas, a table below it joined by a 1 px bridge, noise-free."""
    z, rows, cols = 4, 160, 200
    yy, xx = np.mgrid[:rows, :cols]
    outer = ((xx - 100) / 80.0) ** 2 + ((yy - 70) / 55.0) ** 2 <= 1
    inner = ((xx - 100) / 65.0) ** 2 + ((yy - 70) / 40.0) ** 2 <= 1
    gas = ((xx - 110) / 12.0) ** 2 + ((yy - 60) / 8.0) ** 2 <= 1
    island = ((xx - 110) / 3.0) ** 2 + ((yy - 60) / 2.0) ** 2 <= 1
    hu = np.full((z, rows, cols), -1000.0)
    hu[:, outer] = -100.0
    hu[:, inner] = 40.0
    hu[:, gas] = -950.0
    hu[:, island] = -100.0
    table = (yy >= 140) & (yy <= 146) & (xx >= 10) & (xx <= 190)
    hu[:, table] = 300.0
    hu[:, 126:140, 100] = 60.0  # 1 px bridge from the body's lowest point down to the table
    body = np.broadcast_to(outer, (z, rows, cols)).copy()
    fat = body & (hu == -100.0)
    soft = body & (hu == 40.0)
    return Phantom(_phantom_volume(hu), body, fat, soft)


def test_body_mask_cuts_the_table_and_fills_holes(phantom: Phantom) -> None:
    o = TissueHuOptions()
    body = BodyMask(o.body_threshold_hu, o.table_erosion_mm, o.min_body_area_mm2).run(phantom.volume).body
    assert not body[:, 140:147, :].any(), "the table is not body"
    assert body[:, 60, 110].all(), "gas inside the body is filled"
    # the body is the phantom's ellipse plus at most a stub of the 1 px bridge below the skin
    # (the region grows back by up to two 4 mm blocks)
    extra = body & ~phantom.body
    assert not (phantom.body & ~body).any()
    assert extra.sum() <= 4 * 12 and not extra[:, :, :100].any() and not extra[:, :, 101:].any()


def test_tissue_masks_and_measurements_are_exact(phantom: Phantom) -> None:
    o = TissueHuOptions()
    masks = TissueMasks((o.adipose_min_hu, o.adipose_max_hu), (o.soft_min_hu, o.soft_max_hu)).run(
        phantom.volume, phantom.body
    ).masks
    assert np.array_equal(masks["adipose-tissue"], phantom.fat)
    assert np.array_equal(masks["soft-tissue"], phantom.soft)
    stats = TissueMeasurements().run(phantom.volume, masks)
    voxel_ml = PIXEL * PIXEL * SLICE / 1000.0
    assert stats["adipose-tissue"].volume_ml == pytest.approx(phantom.fat.sum() * voxel_ml, rel=1e-9)
    assert stats["soft-tissue"].volume_ml == pytest.approx(phantom.soft.sum() * voxel_ml, rel=1e-9)
    assert stats["adipose-tissue"].mean_hu == pytest.approx(-100.0)
    assert stats["soft-tissue"].mean_hu == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------
# real shared CT


@pytest.fixture(scope="session")
def totalseg_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TotalSegmentator CT (JPEG 2000) given proper UIDs, SOP Class and patient in a temp copy."""
    src = sorted((shared_data / "totalseg_example_ct_dicom" / "dicom").iterdir())
    out = tmp_path_factory.mktemp("totalseg")
    study, series = generate_uid(), generate_uid()
    for i, f in enumerate(src):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "PROGNODE-TS-1", "TotalSegmentator^Example"
        ds.save_as(out / f"{i:03d}.dcm")
    return out


def run_pipeline(
    files: list[Path], work: Path, options: dict[str, object] | None = None, predecessors: tuple[Predecessor, ...] = ()
) -> PipelineOutput:
    ctx = PipelineContext(series=(SeriesInput("", "", tuple(files)),), work_dir=work, identity=IDENTITY,
                          predecessors=predecessors)
    return registry.create("tissue-hu", options or {}).run(ctx)


@pytest.fixture(scope="session")
def totalseg_result(totalseg_series: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineOutput:
    return run_pipeline(sorted(totalseg_series.iterdir()), tmp_path_factory.mktemp("tissue-hu-ts"))


def check_outputs(out: PipelineOutput, sources: list[pydicom.Dataset]) -> None:
    """dciodvfy, highdicom round trip, codes, values and frame geometry of a tissue-hu result."""
    need("dciodvfy")
    assert out.evaluable, out.reason
    seg_path, sr_path = out.files[:2]
    for path in out.files:
        ok, report = dciodvfy(path)
        assert ok, f"{path.name}:\n{report}"
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Adipose tissue", "Soft tissue"]
    for number, key in ((1, "adipose-tissue"), (2, "soft-tissue")):
        desc = seg.get_segment_description(number)
        assert desc.segmented_property_type == codes.segment(key).type
        assert desc.segmented_property_category == codes.segment(key).category
        assert desc.algorithm_identification[0].AlgorithmName == "tissue-hu"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    by_uid = {d.SOPInstanceUID: d for d in sources}
    for item in seg.PerFrameFunctionalGroupsSequence:
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        src = by_uid[ref.ReferencedSOPInstanceUID]
        if "ReferencedFrameNumber" in ref:
            expected = src.PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]\
                .PlanePositionSequence[0].ImagePositionPatient
        else:
            expected = src.ImagePositionPatient
        got = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(v) for v in got], [float(v) for v in expected])

    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    groups = {g.finding: g for g in read_groups(pydicom.dcmread(sr_path))}
    for key, stats in out.summary["segments"].items():
        if not stats["voxels"]:
            continue
        g = groups[(codes.segment(key).type.scheme_designator, codes.segment(key).type.value)]
        assert g.algorithm == ("tissue-hu", "1.0.0")
        assert g.measurements["Volume"] == (pytest.approx(stats["volume_ml"], abs=1e-3), "ml")
        assert g.measurements["Attenuation Coefficient"] == (pytest.approx(stats["mean_hu"], abs=0.01), "[hnsf'U]")
        assert g.scoords and all(np.array_equal(s[0], s[-1]) for s in g.scoords)


def test_totalseg_ct_end_to_end(totalseg_series: Path, totalseg_result: PipelineOutput) -> None:
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(totalseg_series.iterdir())]
    check_outputs(totalseg_result, sources)
    seg_stats = totalseg_result.summary["segments"]
    assert -190 <= seg_stats["adipose-tissue"]["mean_hu"] <= -30
    assert -29 <= seg_stats["soft-tissue"]["mean_hu"] <= 150
    # 20 slices of an adult upper abdomen, 2 mm apart: litres, not millilitres
    assert 300 < seg_stats["adipose-tissue"]["volume_ml"] < 3000
    assert 1000 < seg_stats["soft-tissue"]["volume_ml"] < 6000
    json.dumps(totalseg_result.summary)  # JSON-serialisable


def test_highdicom_ct_image(shared_data: Path, tmp_path: Path) -> None:
    """A single slice; the re-run names the SR it supersedes (Predecessor Documents Sequence)."""
    path = shared_data / "highdicom_testfiles" / "ct_image.dcm"
    first = run_pipeline([path], tmp_path / "first")
    check_outputs(first, [pydicom.dcmread(path, stop_before_pixels=True)])
    old = pydicom.dcmread(first.files[1])
    pred = Predecessor(old.SOPInstanceUID, old.SeriesInstanceUID, old.StudyInstanceUID, old.SOPClassUID)
    again = run_pipeline([path], tmp_path / "again", predecessors=(pred,))
    new = pydicom.dcmread(again.files[1])
    ref = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old.SOPInstanceUID != new.SOPInstanceUID


def test_ct2_series_small_crop(shared_data: Path, tmp_path: Path) -> None:
    """CT2 is a 16x16 crop (8 mm of bone): with the default minimum body area it is not evaluable;
    with a small one it gives soft tissue only (an empty adipose segment stays in the SEG)."""
    files = sorted((shared_data / "pydicom_testfiles" / "CT2_series").iterdir())
    refused = run_pipeline(files, tmp_path / "default")
    assert not refused.evaluable and "no body" in refused.reason
    (sr_path,) = refused.files
    ok, report = dciodvfy(sr_path)
    assert ok, report
    (g,) = read_groups(pydicom.dcmread(sr_path))
    assert g.texts["Reason not evaluable"] == refused.reason and g.scoords

    out = run_pipeline(files, tmp_path / "small", {"min_body_area_mm2": 10})
    assert out.summary["segments"]["adipose-tissue"]["voxels"] == 0
    assert out.summary["segments"]["adipose-tissue"]["mean_hu"] is None
    check_outputs(out, [pydicom.dcmread(f, stop_before_pixels=True) for f in files])


def test_enhanced_ct_multiframe_source(shared_data: Path, tmp_path: Path) -> None:
    path = shared_data / "pydicom_testfiles" / "eCT_Supplemental.dcm"
    out = run_pipeline([path], tmp_path, {"volume_sr": True})
    check_outputs(out, [pydicom.dcmread(path, stop_before_pixels=True)])
    assert len(out.files) == 3
    (vg, *_) = read_groups(pydicom.dcmread(out.files[2]))
    assert vg.referenced_segment in (1, 2) and not vg.scoords


# ------------------------------------------------------------------------------------------
# OHIF (one run.sh call for every object: about 15 s each plus start-up)

OHIF_CHECK = SHARED / "tools" / "ohif-check" / "run.sh"


@pytest.fixture(scope="session")
def ohif_run(totalseg_series: Path, totalseg_result: PipelineOutput, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[dict[str, object]], Path]]:
    if not OHIF_CHECK.exists():
        pytest.skip(f"ohif-check not found at {OHIF_CHECK}: display check skipped")
    need("Orthanc", "chromium", "node")
    work = tmp_path_factory.mktemp("ohif")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(totalseg_series.iterdir())]
    not_evaluable = build_measurement_report(
        sources, [], Algorithm("tissue-hu", "1.0.0"), IDENTITY, "Tissue HU not evaluable",
        not_evaluable_reason="test: slice thickness above the limit",
    )
    ne_path = work / "sr-not-evaluable.dcm"
    not_evaluable.save_as(ne_path)
    out_dir = work / "out"
    cmd = [str(OHIF_CHECK), "--out", str(out_dir), str(totalseg_series), *map(str, totalseg_result.files[:2]), str(ne_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    yield r.returncode, records, out_dir


@pytest.mark.slow
@pytest.mark.browser
def test_ohif_displays_seg_and_sr(ohif_run: tuple[int, list[dict[str, object]], Path]) -> None:
    rc, records, out_dir = ohif_run
    shown = {(r["modality"], r["description"]): r["displayed"] for r in records}
    assert shown == {
        ("SEG", "Tissue HU segmentation"): True,
        ("SR", "Tissue HU measurements"): True,
        ("SR", "Tissue HU not evaluable"): False,
    }, json.dumps(records, indent=1)
    # the not-evaluable SR holds no number (dicom_templates.sr.not_evaluable_group): OHIF 3.13 loads it
    # without error and draws its outline, but lists a planar group only through a valued NUM
    (ne,) = [r for r in records if r["description"] == "Tissue HU not evaluable"]
    checks = ne["checks"]
    assert isinstance(checks, dict) and checks["no_error_notification"] and checks["canvas_not_blank"], ne
    assert rc == 1  # ohif-check's exit code for "an object not listed"
    seg = next(r for r in records if r["modality"] == "SEG")
    assert set(seg["panel_items"]) >= {"Adipose tissue", "Soft tissue"}  # type: ignore[arg-type]
    assert all(Path(str(r["screenshot"])).exists() or (out_dir / Path(str(r["screenshot"])).name).exists()
               for r in records)
