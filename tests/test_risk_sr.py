"""The survival-risk pipeline end to end: phantom CT + body-composition SR -> risk SR (dciodvfy, round trip).

The model is fitted on a synthetic cohort (no shared data needed); the body-composition SR that
carries the SMI is written with highdicom the way prognode's body-composition pipeline files it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_templates.risk_sr import OHIF_TRACKING_IDENTIFIER, read_risk
from pipelines import registry
from pipelines.base import Identity, PipelineContext, SeriesInput, StageError
from pipelines.survival.artifact import save_model
from pipelines.survival.data import cohort_from_frame
from pipelines.survival.fit import FitOptions, fit_model
from tests.conftest import need
from tests.peers import dciodvfy

SMI = "SMI"
IDENTITY = Identity(manufacturer="prognode", software_version="0.1.0", device_serial_number="test-node-1")
OPTIONS = {
    "model": "hn-risk",
    "features": {"Age": "header:age", "Sex": "header:sex", SMI: "sr:skeletal muscle index"},
    "values": {"Sex": {"M": "Male", "F": "Female"}},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    n = 300
    age = rng.normal(60, 10, n)
    male = rng.random(n) < 0.7
    smi = rng.normal(50, 8, n) - 6 * (~male)
    lp = 0.04 * (age - 60) - 0.05 * (smi - 50) + 0.2 * male
    t = rng.exponential(2000 * np.exp(-lp))
    c = rng.uniform(500, 4000, n)
    frame = pd.DataFrame({"Age": age.round(), "Sex": np.where(male, "Male", "Female"), SMI: smi,
                          "time": np.minimum(t, c), "event": (t <= c).astype(int)})
    cohort = cohort_from_frame(frame, "time", "event", source="synthetic")
    model = fit_model(cohort, FitOptions(kind="cox", features=("Age", "Sex", SMI), horizon_days=1826.0,
                                         name="hn-risk", version="2.1.0", n_boot=20, time_column="time",
                                         event_column="event"))
    out = tmp_path_factory.mktemp("models") / "hn-risk"
    save_model(model, out)
    return out


def phantom_ct(folder: Path, sex: str = "M", age: str = "063Y") -> list[Path]:
    """Three 64x64 axial slices: an elliptic body (soft tissue) in air, with patient age and sex."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_uid = generate_uid(), generate_uid(), generate_uid()
    y, x = np.mgrid[:64, :64]
    body = ((x - 32) / 26) ** 2 + ((y - 34) / 18) ** 2 <= 1
    paths = []
    for k in range(3):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Risk^Phantom", "RISK001", "19600101"
        ds.PatientSex, ds.PatientAge = sex, age
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study, "1", "R0001"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20230105"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101010"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "CT", series, 2, k + 1
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "phantom"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [-160.0, -160.0, 10.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [5.0, 5.0], 10.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        hu = np.where(body, 40, -1000).astype(np.int16)
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        p = folder / f"ct{k}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def bodycomp_sr(ct: Path, out: Path, smi: float) -> Path:
    """A TID 1500 SR with NUM 'Skeletal muscle index' on a polygon, as the body-composition pipeline files it."""
    image = pydicom.dcmread(ct)
    pts = np.array([[10, 20], [50, 20], [50, 50], [10, 50], [10, 20]], dtype=np.float32)
    num = hd.sr.Measurement(
        name=hd.sr.CodedConcept("SMI", "99PROGNODE", "Skeletal muscle index"), value=smi,
        unit=hd.sr.CodedConcept("cm2/m2", "UCUM", "square centimeter per square meter"),
        referenced_coordinates=[hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=pts,
            source_image=hd.sr.SourceImageForRegion.from_source_image(image))])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=OHIF_TRACKING_IDENTIFIER),
        finding_type=codes.SCT.SkeletalMuscle, measurements=[num])
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="bodycomp"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(evidence=[image], content=report[0], series_instance_uid=hd.UID(), series_number=9102,
                                 sop_instance_uid=hd.UID(), instance_number=1, manufacturer="prognode")
    sr.save_as(out)
    return out


def run(tmp_path: Path, model_dir: Path, extra: tuple[float, ...], options: dict | None = None,  # type: ignore[type-arg]
        sex: str = "M", files: list[Path] | None = None):  # type: ignore[no-untyped-def]
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = files or phantom_ct(tmp_path / "ct", sex=sex)
    extra_files = tuple(bodycomp_sr(files[0], tmp_path / "bc.dcm", smi) for smi in extra)
    ds = pydicom.dcmread(files[0])
    pipeline = registry.create("survival-risk", options or OPTIONS)
    ctx = PipelineContext(series=(SeriesInput(ds.SeriesInstanceUID, ds.StudyInstanceUID, tuple(files)),),
                          work_dir=tmp_path / "work", identity=IDENTITY, models={"hn-risk": model_dir},
                          extra_files=extra_files)
    return pipeline.run(ctx), files


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for it in items:
        yield it
        if "ContentSequence" in it:
            yield from _walk(it.ContentSequence)


def check_sr(path: Path) -> Dataset:
    need("dciodvfy")
    ok, report = dciodvfy(path)
    assert ok, report
    sr = pydicom.dcmread(path)
    hd.sr.Comprehensive3DSR.from_dataset(sr)  # highdicom reads it back
    assert sr.Modality == "SR" and sr.SeriesNumber == 9102 and sr.Manufacturer == "prognode"
    assert sr.DeviceSerialNumber == "test-node-1"
    return sr


def test_evaluable_risk_sr(tmp_path: Path, model_dir: Path) -> None:
    out, files = run(tmp_path, model_dir, (41.5,))
    assert out.evaluable and out.summary["features"] == {"Age": 63.0, "Sex": "Male", SMI: 41.5}
    assert out.summary["group"] in ("low", "high") and out.summary["anchor"] == "body"
    sr = check_sr(out.files[0])
    got = read_risk(sr)
    assert got["numbers"]["Risk score"] == pytest.approx(out.summary["score"])
    assert got["numbers"]["Probability of event by horizon"] == pytest.approx(out.summary["horizon_probability"])
    assert got["algorithm"] == ("hn-risk", "2.1.0")  # the model's name and version (TID 4019)
    assert got["codes"]["Risk group"] == f"{out.summary['group'].capitalize()} risk group"
    params = [str(x.TextValue) for x in _walk(sr.ContentSequence) if x.ValueType == "TEXT"
              and x.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert "kind=cox" in params and "horizon_days=1826" in params
    # OHIF-safe: the group tracks a PlanarFreehandROI on a closed polygon on a CT slice of the study
    pts = got["scoord"]
    assert (pts[0] == pts[-1]).all() and len(pts) >= 4
    assert got["tracking_identifier"] == OHIF_TRACKING_IDENTIFIER
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert len(groups) == 1 and groups[0].tracking_identifier == OHIF_TRACKING_IDENTIFIER
    assert groups[0].get_measurements()[0].value == pytest.approx(out.summary["score"])
    refs = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert ev[0].ReferencedSOPInstanceUID in refs
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PROGNODE"


def test_higher_risk_for_lower_smi(tmp_path: Path, model_dir: Path) -> None:
    low, _ = run(tmp_path / "a", model_dir, (60.0,))
    high, _ = run(tmp_path / "b", model_dir, (30.0,))
    assert high.summary["score"] > low.summary["score"]
    assert high.summary["horizon_probability"] > low.summary["horizon_probability"]


def test_missing_input_gives_not_evaluable_sr(tmp_path: Path, model_dir: Path) -> None:
    out, _ = run(tmp_path, model_dir, ())  # no body-composition SR: no SMI
    assert not out.evaluable
    assert out.reason == "SMI: missing (from sr:skeletal muscle index)"
    sr = check_sr(out.files[0])
    got = read_risk(sr)
    assert got["numbers"] == {"Number of unusable model inputs": 1.0}  # no score, no probability
    assert got["codes"]["Evaluability"] == "Not evaluable"
    assert got["texts"]["Reason not evaluable"] == out.reason
    assert got["scoord"] is not None  # still a SCOORD group, so OHIF keeps the SR


def test_unknown_level_and_bad_options(tmp_path: Path, model_dir: Path) -> None:
    out, _ = run(tmp_path, model_dir, (45.0,), sex="O")
    assert not out.evaluable and "Sex: level 'O' not seen in training" in out.reason
    const = {**OPTIONS, "features": {**OPTIONS["features"], "Sex": "const:Female"}}  # type: ignore[dict-item]
    out, _ = run(tmp_path / "c", model_dir, (45.0,), options=const, sex="O")
    assert out.evaluable and out.summary["features"]["Sex"] == "Female"
    with pytest.raises(ValueError, match="features.Age"):
        registry.create("survival-risk", {**OPTIONS, "features": {"Age": "pacs:age"}})
    with pytest.raises(ValueError, match="unknown options"):
        registry.create("survival-risk", {**OPTIONS, "modle": "x"})
    with pytest.raises(StageError, match="load-model"):
        run(tmp_path / "d", model_dir, (45.0,), options={**OPTIONS, "model": "nope"})


def test_registry_import_is_cheap() -> None:
    import subprocess
    import sys

    from tests.peers import REPO

    code = ("import sys, pipelines.registry, pipelines.survival.pipeline; "
            "bad = [m for m in ('torch', 'monai', 'lifelines', 'sksurv') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env={"PYTHONPATH": str(REPO)})


def test_header_age_from_birth_date() -> None:
    from pipelines.survival.features import HeaderSource

    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate, ds.PatientSex = "19600615", "20230614", "F"
    ds.PatientSize, ds.PatientWeight = 1.6, 64.0
    got = HeaderSource().collect(ds, [])
    assert got["age"] == 62.0 and got["sex"] == "F" and got["bmi"] == pytest.approx(25.0)
    assert dt.date(2023, 6, 14)  # keeps the import honest


@pytest.mark.slow
@pytest.mark.browser
def test_ohif_displays_risk_srs(tmp_path: Path, model_dir: Path) -> None:
    """OHIF 3.13 (ohif-check, headless Chromium) lists both the evaluable and the not-evaluable SR."""
    import json
    import subprocess

    from tests.peers import SHARED

    tool = SHARED / "tools" / "ohif-check" / "run.sh"
    if not tool.exists():
        pytest.skip(f"ohif-check not found at {tool}")
    need("chromium", "node", "Orthanc")
    files = phantom_ct(tmp_path / "ct")
    ok, _ = run(tmp_path / "ok", model_dir, (41.5,), files=files)
    missing, _ = run(tmp_path / "missing", model_dir, (), files=files)
    r = subprocess.run([str(tool), "--out", str(tmp_path / "ohif"), str(tmp_path / "ct"), str(ok.files[0]),
                        str(missing.files[0])], capture_output=True, text=True, timeout=500)
    if r.returncode == 2:
        pytest.skip(f"ohif-check could not run: {r.stderr[-500:]}")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and all(x["displayed"] for x in lines), r.stdout


@pytest.mark.parametrize(("group", "coded"), [("intermediate", True), ("Q3", False)])
def test_risk_group_labels(tmp_path: Path, group: str, coded: bool) -> None:
    from dicom_templates.risk_sr import RiskContent, build_risk_sr

    image = pydicom.dcmread(phantom_ct(tmp_path / "ct")[1])
    content = RiskContent("m", "1.0.0", "lasso-cox", 0.3, group, None, None)
    sr = build_risk_sr(content, image, [[10, 10], [50, 10], [50, 50], [10, 50]], IDENTITY)
    sr.save_as(tmp_path / "sr.dcm")
    got = read_risk(check_sr(tmp_path / "sr.dcm"))
    assert list(got["numbers"]) == ["Risk score"]  # no horizon: no probability
    if coded:
        assert got["codes"]["Risk group"] == "Intermediate risk group"
    else:
        assert got["texts"]["Risk group"] == "Q3"
    with pytest.raises(ValueError, match="finite score"):
        build_risk_sr(RiskContent("m", "1", "cox", float("nan"), "low", None, None), image,
                      [[10, 10], [50, 10], [50, 50]], IDENTITY)
