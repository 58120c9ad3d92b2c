"""Issue 14 item 4: Secondary Capture key images and per-destination ``formats``.

- the SC and Encapsulated PDF builders and the key-images stage on the body-composition phantom:
  write-then-read round trip, dciodvfy, the same patient and study as the SEG/SR in a new series, text burned in;
- the reading of summaries into a verdict and key values (shared with the dashboard);
- end to end: a destination with ``formats = ["sc"]`` gets only the SC in Orthanc (which renders
  it), while a destination with ``["seg", "sr", "pdf"]`` is queued the SEG, the SR and the PDF report.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from sqlalchemy import select

from dicom_templates.identity import Identity
from node.config import ConfigError, load
from node.db import Export
from node.dicom_facts import ResultFormat, result_format
from pipelines.body_composition.phantom import PhantomSpec, write_phantom
from pipelines.body_composition.pipeline import run_folder
from pipelines.common.key_images import KeyImages, KeyImagesInput, key_slices
from pipelines.common.key_values import key_values
from tests.conftest import need
from tests.node_helpers import pacs_destination, running_node, write_config
from tests.peers import Orthanc, dciodvfy, free_port, storescu, wait_until

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
IDENTITY = Identity("prognode-test", "0.0.test", "serial-test-1")


@pytest.fixture(scope="module")
def phantom_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keyimages")
    write_phantom(PhantomSpec(size=128, pixel_mm=3.0, slice_mm=5.0, noise_sd=5.0), root / "ct")
    run_folder(root / "ct", root / "out", {"volumes_3d": False})
    return root / "ct", root / "out"


def test_key_image_round_trip_dciodvfy_and_identity(phantom_result: tuple[Path, Path]) -> None:
    ct, out = phantom_result
    summary = {**json.loads((out / "summary.json").read_text()), "pipeline": "body-composition",
               "pipeline_version": "9.9.9"}
    files = KeyImages(IDENTITY).run(KeyImagesInput((out / "seg.dcm", out / "sr.dcm"),
                                                   tuple(sorted(ct.iterdir())), summary, out))
    assert len(files) == 1  # the level slice
    ds = pydicom.dcmread(files[0])
    seg = pydicom.dcmread(out / "seg.dcm")
    assert ds.SOPClassUID == SC_CLASS and result_format(ds.SOPClassUID) is ResultFormat.SC
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert ds.get(kw) == seg.get(kw), kw
    assert ds.SeriesInstanceUID not in (seg.SeriesInstanceUID, pydicom.dcmread(out / "sr.dcm").SeriesInstanceUID)
    assert ds.SeriesNumber == IDENTITY.sc_series_number and ds.BurnedInAnnotation == "YES"
    assert "PixelSpacing" not in ds  # a rendering: nobody measures on it
    px = ds.pixel_array
    assert px.shape == (720, 1280, 3) and px.dtype == np.uint8
    red = (px[..., 0] > 200) & (px[..., 1] < 90) & (px[..., 2] < 90)
    assert red[:60].sum() > 200  # "NOT FOR DIAGNOSIS" across the top, in red
    im = hd.imread(files[0])  # highdicom reads it back as an image
    assert im.SOPInstanceUID == ds.SOPInstanceUID and np.array_equal(im.get_frame(1), px)
    need("dciodvfy")
    ok, text = dciodvfy(files[0])
    assert ok, text


def test_pdf_report_round_trip_and_dciodvfy(phantom_result: tuple[Path, Path], tmp_path: Path) -> None:
    ct, out = phantom_result
    summary = {**json.loads((out / "summary.json").read_text()), "pipeline": "body-composition",
               "pipeline_version": "9.9.9"}
    (path,) = KeyImages(IDENTITY, sc=False, pdf=True).run(
        KeyImagesInput((out / "seg.dcm",), tuple(sorted(ct.iterdir())), summary, tmp_path))
    ds = pydicom.dcmread(path)
    seg = pydicom.dcmread(out / "seg.dcm")
    assert result_format(ds.SOPClassUID) is ResultFormat.PDF and ds.Modality == "DOC"
    assert ds.StudyInstanceUID == seg.StudyInstanceUID and ds.PatientID == seg.PatientID
    assert ds.SeriesNumber == IDENTITY.pdf_series_number and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    pdf = bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength]
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    need("dciodvfy")
    ok, text = dciodvfy(path)
    assert ok, text


def test_not_evaluable_key_image_says_why(phantom_result: tuple[Path, Path], tmp_path: Path) -> None:
    ct, out = phantom_result
    summary = {"pipeline": "body-composition", "pipeline_version": "9.9.9", "evaluable": False,
               "reason": "L3 not in the field of view"}
    files = KeyImages(IDENTITY).run(KeyImagesInput((out / "sr.dcm",), tuple(sorted(ct.iterdir())), summary,
                                                   tmp_path))
    assert len(files) == 1
    ds = pydicom.dcmread(files[0])
    assert ds.SeriesDescription == "body-composition not evaluable" and ds.PatientID == pydicom.dcmread(
        out / "sr.dcm").PatientID
    px = ds.pixel_array
    orange = (px[..., 0] > 230) & (px[..., 1] > 140) & (px[..., 1] < 190) & (px[..., 2] < 40)
    assert orange.sum() > 100  # the verdict, in orange
    need("dciodvfy")
    ok, text = dciodvfy(files[0])
    assert ok, text


def test_key_slices_level_slices_or_the_largest() -> None:
    def masks(*areas: int) -> dict[str, NDArray[np.bool_]]:
        out: dict[str, NDArray[np.bool_]] = {}
        for i, a in enumerate(areas):
            m: NDArray[np.bool_] = np.zeros((8, 8, 2), dtype=bool)
            m.reshape(-1)[:a] = True
            out[f"1.2.{i}"] = m
        return out

    assert key_slices(masks(5)) == ["1.2.0"]  # the level slice
    assert key_slices(masks(5, 9)) == ["1.2.1", "1.2.0"]  # two level slices: both
    assert key_slices(masks(3, 40, 12, 0)) == ["1.2.1"]  # a tumour ROI over slices: its largest


def test_key_values_body_composition_and_not_evaluable(phantom_result: tuple[Path, Path]) -> None:
    _, out = phantom_result
    s = {**json.loads((out / "summary.json").read_text()), "pipeline": "body-composition", "pipeline_version": "1.2"}
    kv = key_values(s)
    labels = dict(kv.values)
    assert kv.verdict == "evaluable" and labels["Level"].startswith("L3")
    assert labels["SMI"].endswith("cm²/m²")
    assert labels["Sarcopenia (prado-2008)"].startswith(("present", "absent"))
    assert kv.model.startswith("body-composition 1.2") and "backend classical" in kv.model
    # summaries written before node.jobs.json_default hold numpy bools as text: read as what they say
    old = {**s, "sarcopenia": {"prado-2008": {**s["sarcopenia"]["prado-2008"], "sarcopenic": "False"}}}
    assert dict(key_values(old).values)["Sarcopenia (prado-2008)"].startswith("absent")
    assert dict(key_values({**s, "evaluable": "False"}).values) == {}
    assert not key_values({**s, "evaluable": "maybe"}).evaluable
    bad = key_values({"evaluable": False, "reason": "L3 not in the field of view", "pipeline": "body-composition"})
    assert bad.verdict == "not evaluable: L3 not in the field of view" and bad.values == ()


def test_formats_config(tmp_path: Path) -> None:
    d = {"ae_title": "P", "host": "127.0.0.1", "port": 104}
    cfg = load(write_config(tmp_path / "a", destinations=[{"name": "p", **d}, {"name": "q", "formats": ["sc"], **d}]),
               environ={})
    assert cfg.destinations[0].formats == (ResultFormat.SEG, ResultFormat.SR)
    assert cfg.destinations[1].formats == (ResultFormat.SC,)
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.formats"):
        load(write_config(tmp_path / "b", destinations=[{"name": "p", "formats": ["png"], **d}]), environ={})


@pytest.mark.slow
def test_sc_only_destination_gets_only_the_sc(tmp_path: Path, pacs: Orthanc) -> None:
    need("storescu", "dciodvfy")
    truth = write_phantom(PhantomSpec(size=128, pixel_mm=3.0, slice_mm=5.0, noise_sd=5.0), tmp_path / "ct")
    closed = free_port()  # a second destination that never answers: its queued exports show the filter
    route = {"name": "bc", "when": {"Modality": "CT"}, "pipelines": ["body-composition"],
             "send_to": ["pacs", "archive"]}
    cfg = write_config(tmp_path / "node", routes=[route], pipelines={"body-composition": {"volumes_3d": False}},
                       destinations=[pacs_destination(pacs.dicom_port, formats=["sc"]),
                                     {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": closed,
                                      "retry_seconds": 60, "formats": ["seg", "sr", "pdf"]}])
    with running_node(cfg) as node:
        storescu(node.port, truth.files)
        found = wait_until(lambda: pacs.instances_of_study(truth.study_uid), 240, interval=0.5,
                           what="the SC in Orthanc")
        with node.db.read() as s:
            rows = [(e.destination, e.path) for e in s.scalars(select(Export))]
    by_dest: dict[str, set[str]] = {}
    for dest, path in rows:
        by_dest.setdefault(dest, set()).add(str(pydicom.dcmread(path, stop_before_pixels=True).Modality))
    assert by_dest == {"pacs": {"OT"}, "archive": {"SEG", "SR", "DOC"}}
    assert len(found) == 1
    oid = found[0]["ID"]
    assert pacs.get(f"/instances/{oid}/simplified-tags")["SOPClassUID"] == SC_CLASS
    with urllib.request.urlopen(f"{pacs.url}/instances/{oid}/file", timeout=30) as r:
        (tmp_path / "sc.dcm").write_bytes(r.read())
    ok, text = dciodvfy(tmp_path / "sc.dcm")
    assert ok, text
    with urllib.request.urlopen(f"{pacs.url}/instances/{oid}/preview", timeout=30) as r:  # Orthanc renders it
        png = r.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.slow
def test_ohif_opens_the_sc_series(phantom_result: tuple[Path, Path], pacs: Orthanc, tmp_path: Path) -> None:
    """OHIF 3.13.2 (ohif-check's build, over Orthanc's DICOMweb) draws the key image in its viewport."""
    from tests import ohif_view

    why = ohif_view.available()
    if why:
        pytest.skip(why)
    ct, out = phantom_result
    summary = {**json.loads((out / "summary.json").read_text()), "pipeline": "body-composition",
               "pipeline_version": "9.9.9"}
    (sc,) = KeyImages(IDENTITY).run(KeyImagesInput((out / "seg.dcm",), tuple(sorted(ct.iterdir())), summary,
                                                   tmp_path))
    pacs.upload([*sorted(ct.iterdir()), sc])
    ds = pydicom.dcmread(sc, stop_before_pixels=True)
    viewer = ohif_view.start_viewer(pacs.url)
    try:
        shot = ohif_view.series_screenshot(viewer.url, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                           tmp_path / "ohif-sc.png", timeout=90)
    finally:
        viewer.stop()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
