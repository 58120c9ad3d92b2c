"""The SCP: real peers (dcmtk storescu/echoscu, a pynetdicom SCU for raw datasets), per-test ports."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.handlers import CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES
from node.storage import INCOMING
from tests.conftest import need
from tests.node_helpers import dataset_bytes, running_node, send_raw, write_config
from tests.peers import echoscu, storescu, wait_until, with_uids

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def totalseg_ct(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The shared real CT (JPEG 2000 lossless, 20 slices) given proper UIDs."""
    return with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", tmp_path_factory.mktemp("ct"))


def audit(folder: Path) -> list[dict[str, object]]:
    p = folder / "var" / "audit.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def stored_files(folder: Path) -> list[Path]:
    """Instance files (not the temporary files the node makes ahead of time in instances/.incoming)."""
    return sorted(p for p in (folder / "var" / "instances").rglob("*") if p.is_file() and INCOMING not in p.parts)


def test_real_ct_jpeg2000_stored_as_sent_and_completed_by_geometry(tmp_path: Path, totalseg_ct: list[Path]) -> None:
    need("storescu")
    cfg = write_config(tmp_path)
    with running_node(cfg) as node:
        storescu(node.port, totalseg_ct, extra=["-xv"])  # propose JPEG 2000 lossless: sent as it is
        series_uid = str(pydicom.dcmread(totalseg_ct[0], stop_before_pixels=True).SeriesInstanceUID)
        view = wait_until(lambda: (v := node.index.series(series_uid)) and v.state == "complete" and v, 10,
                          what="series complete")
        assert view.instances == 20 and view.completion_reason == "geometry"
        files = stored_files(tmp_path)
        assert len(files) == 20 and not [f for f in files if f.suffix != ".dcm"]
        sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in totalseg_ct}
        for f in files:
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
            assert ds.PixelData == pydicom.dcmread(sent[ds.SOPInstanceUID]).PixelData
    events = audit(tmp_path)
    stored = [e for e in events if e["event"] == "instance_stored"]
    assert len(stored) == 20 and all(e["calling_ae"] == "STORESCU" and e["peer"] for e in stored)
    assert {"association_accepted", "association_released", "series_complete"} <= {str(e["event"]) for e in events}


def test_gantry_tilted_uneven_head_ct_completes_by_quiet_time(tmp_path: Path, shared_data: Path) -> None:
    need("storescu")
    cfg = write_config(tmp_path, completion={"quiet_seconds": 1.0})
    folder = shared_data / "dcm_qa_ct_GE_tilt" / "dicom"
    with running_node(cfg) as node:
        storescu(node.port, folder)
        uid = str(pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True).SeriesInstanceUID)
        view = wait_until(lambda: (v := node.index.series(uid)) and v.state == "complete" and v, 10,
                          what="tilted series complete")
        assert view.instances == 28
        assert view.completion_reason == "quiet"  # uneven spacing: geometry cannot decide


def test_enhanced_ct_multiframe(tmp_path: Path, shared_data: Path) -> None:
    need("storescu")
    cfg = write_config(tmp_path)
    f = shared_data / "pydicom_testfiles" / "eCT_Supplemental.dcm"
    with running_node(cfg) as node:
        storescu(node.port, [f])
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)
        view = wait_until(lambda: (v := node.index.series(uid)) and v.state == "complete" and v, 10,
                          what="enhanced CT complete")
        assert view.completion_reason == "multiframe"
        assert node.index.series_files(uid)[0].read_bytes()[128:132] == b"DICM"


def test_empty_uid_series_refused_clearly(tmp_path: Path, shared_data: Path) -> None:
    cfg = write_config(tmp_path)
    f = sorted((shared_data / "totalseg_example_ct_dicom" / "dicom").iterdir())[0]
    sop_class, sop, ts, payload = dataset_bytes(f)  # as it is: empty Study, Series and SOP Instance UIDs
    with running_node(cfg) as node:
        status, comment = send_raw(node.port, sop_class, sop, ts, payload)
        assert node.index.instance_count() == 0
    assert status == DATASET_MISMATCH
    assert "empty StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID" in comment
    assert stored_files(tmp_path) == []
    refused = [e for e in audit(tmp_path) if e["event"] == "instance_refused"]
    assert refused and refused[0]["status"] == "0xA900" and "empty" in str(refused[0]["reason"])


def test_malformed_inputs_refused_and_nothing_left(tmp_path: Path, shared_data: Path) -> None:
    cfg = write_config(tmp_path)
    src = shared_data / "pydicom_testfiles" / "CT_small.dcm"
    sop_class, sop, ts, payload = dataset_bytes(src)
    ds = pydicom.dcmread(src)
    bad_uid = ds.copy()
    bad_uid.SOPInstanceUID = "not.a.uid.x"
    bad = dataset_bytes_of(bad_uid)
    with running_node(cfg) as node:
        cases = {
            "truncated": send_raw(node.port, sop_class, sop, ts, payload[: len(payload) // 3]),
            "garbage": send_raw(node.port, sop_class, sop, ts, os.urandom(4096)),
            "bad_uid": send_raw(node.port, sop_class, "1.2.3.4", ts, bad),
            "mismatch": send_raw(node.port, sop_class, "1.2.3.4.5", ts, payload),
            "ok": send_raw(node.port, sop_class, sop, ts, payload),
        }
        assert node.index.instance_count() == 1
    assert cases["truncated"][0] in (CANNOT_UNDERSTAND, DATASET_MISMATCH), cases
    assert cases["garbage"][0] in (CANNOT_UNDERSTAND, DATASET_MISMATCH), cases
    assert cases["bad_uid"][0] == DATASET_MISMATCH and "invalid SOPInstanceUID" in cases["bad_uid"][1]
    assert cases["mismatch"][0] == DATASET_MISMATCH and "Affected" in cases["mismatch"][1]
    assert cases["ok"][0] == 0
    assert all(comment for code, comment in cases.values() if code)
    assert len(stored_files(tmp_path)) == 1


def dataset_bytes_of(ds: pydicom.Dataset) -> bytes:
    from pynetdicom.dsutils import encode

    out = encode(ds, False, True)
    assert out is not None
    return out


def test_eight_parallel_associations(tmp_path: Path, shared_data: Path) -> None:
    need("storescu")
    cfg = write_config(tmp_path)
    src = sorted((shared_data / "pydicom_testfiles" / "CT2_series").rglob("*"))
    src = [p for p in src if p.is_file()]
    folders = []
    for i in range(8):  # eight different series, each on its own association
        d = tmp_path / f"series{i}"
        d.mkdir()
        series, study = generate_uid(), generate_uid()
        for j, f in enumerate(src):
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(d / f"{j}.dcm")
        folders.append(d)
    with running_node(cfg) as node:
        procs = [subprocess.Popen(["storescu", "-aet", f"SCU{i}", "-aec", "PROGNODE", "+sd", "127.0.0.1",
                                   str(node.port), str(d)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i, d in enumerate(folders)]
        codes = [p.wait(120) for p in procs]
        assert codes == [0] * 8
        assert node.index.instance_count() == 8 * len(src)
    accepted = {e["calling_ae"] for e in audit(tmp_path) if e["event"] == "association_accepted"}
    assert accepted == {f"SCU{i}" for i in range(8)}


def test_allow_lists_reject_associations(tmp_path: Path, shared_data: Path) -> None:
    need("storescu", "echoscu")
    f = shared_data / "pydicom_testfiles" / "CT_small.dcm"
    cfg = write_config(tmp_path, node={"allowed_calling_aets": ["SCANNER1"]})
    with running_node(cfg) as node:
        assert echoscu(node.port, calling="SCANNER1") == 0
        r = storescu(node.port, [f], calling="INTRUDER", check=False)
        assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
        assert node.index.instance_count() == 0
    cfg2 = write_config(tmp_path / "hosts", node={"allowed_hosts": ["10.0.0.0/8"]})
    with running_node(cfg2) as node:
        r = storescu(node.port, [f], calling="SCANNER1", check=False)
        assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
        assert node.index.instance_count() == 0
    rejected = [e for e in audit(tmp_path / "hosts") if e["event"] == "association_rejected"]
    assert rejected and rejected[0]["reason"] == "address not allowed" and rejected[0]["calling_ae"] == "SCANNER1"
    assert any(e["event"] == "association_rejected" for e in audit(tmp_path))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_disk_full_answers_out_of_resources(tmp_path: Path, totalseg_ct: list[Path]) -> None:
    need("storescu")
    small = Path(tempfile.mkdtemp(prefix="prognode-full-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {r.stderr.decode()[:200]}")
    try:
        cfg = write_config(tmp_path, node={"storage": str(small),
                                           "database": f"sqlite:///{tmp_path / 'index.db'}"})
        with running_node(cfg) as node:
            r2 = storescu(node.port, totalseg_ct, extra=["-xv"], check=False)
            count = node.index.instance_count()
            paths = [node.storage.absolute(p) for p in _indexed_paths(node)]
        assert r2.returncode != 0 or "0xa700" in (r2.stdout + r2.stderr).lower()
        assert 0 < count < 20
        for p in paths:  # every instance answered with success is complete on disk
            assert pydicom.dcmread(p).SOPInstanceUID
        leftovers = [p for p in small.rglob("*") if p.is_file() and p.suffix != ".dcm"]
        assert leftovers == []
        refused = [e for e in audit(tmp_path) if e["event"] == "instance_refused"]
        assert refused and all(e["status"] == f"0x{OUT_OF_RESOURCES:04X}" for e in refused)
        assert "disk" in str(refused[0]["reason"])
    finally:
        subprocess.run(["umount", str(small)], check=False)
        small.rmdir()


def _indexed_paths(node: object) -> list[str]:
    from sqlalchemy import select

    from node.db import Instance

    with node.db.session() as s:  # type: ignore[attr-defined]
        return list(s.scalars(select(Instance.path)).all())


def test_scp_stops_cleanly_with_association_in_flight(tmp_path: Path, totalseg_ct: list[Path]) -> None:
    need("storescu")
    cfg = write_config(tmp_path)
    with running_node(cfg) as node:
        proc = subprocess.Popen(["storescu", "-aec", "PROGNODE", "-xv", "127.0.0.1", str(node.port),
                                 *map(str, totalseg_ct)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: node.index.instance_count() > 0, 20, interval=0.01, what="first instance")
        stopper = threading.Thread(target=node.stop)
        stopper.start()
        assert proc.wait(60) == 0  # the in-flight association finished
        stopper.join(30)
        assert node.index.instance_count() == 20


def test_seg_labelmap_seg_rtstruct_and_sr_accepted(tmp_path: Path, shared_data: Path) -> None:
    need("storescu")
    files = [shared_data / "dcmqi_seg_sr_refs" / "segmentations" / "liver.dcm",
             shared_data / "pydicom_testfiles" / "rtstruct.dcm",
             shared_data / "highdicom_testfiles" / "sr_document.dcm"]
    labelmap = shared_data / "highdicom_testfiles" / "seg_image_sm_control_labelmap.dcm"
    cfg = write_config(tmp_path)
    with running_node(cfg) as node:
        r = storescu(node.port, files, extra=["-R"], check=False)  # -R: propose exactly these SOP classes
        assert r.returncode == 0, r.stderr
        # dcmtk 3.6.7 does not know Label Map Segmentation Storage: send it with pynetdicom
        sop_class, sop, ts, payload = dataset_bytes(labelmap)
        assert sop_class == "1.2.840.10008.5.1.4.1.1.66.7"
        assert send_raw(node.port, sop_class, sop, ts, payload) == (0, "")
        assert node.index.instance_count() == len(files) + 1
