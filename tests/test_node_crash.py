"""kill -9 of the node (``python -m node serve`` as a subprocess) during ingest and during a job."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import need
from tests.node_helpers import cli, node_process, pacs_destination, write_config
from tests.peers import Orthanc, dciodvfy, storescu, wait_port, wait_until, with_uids

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def kill9(proc: object) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    proc.wait(10)  # type: ignore[attr-defined]


def db_rows(folder: Path, sql: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(folder / "var" / "prognode.db", timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def ct(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", tmp_path_factory.mktemp("ct"), seed="crash")


def test_kill9_during_ingest_keeps_every_acknowledged_instance(tmp_path: Path, ct: list[Path]) -> None:
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    cfg = write_config(tmp_path)
    port = int(cfg.read_text().split("port = ")[1].split("\n")[0])
    proc = node_process(cfg, log=tmp_path / "node.log")
    try:
        wait_port(port, 60)
        datasets = [pydicom.dcmread(f) for f in ct]
        acknowledged: list[str] = []
        killed = threading.Event()

        def killer() -> None:
            wait_until(lambda: len(acknowledged) >= 25, 60, interval=0.005, what="25 acknowledged")
            kill9(proc)
            killed.set()

        t = threading.Thread(target=killer)
        t.start()
        ae = AE(ae_title="SCANNER")
        ae.requested_contexts = [build_context(datasets[0].SOPClassUID, [datasets[0].file_meta.TransferSyntaxUID])]
        assoc = ae.associate("127.0.0.1", port, ae_title="PROGNODE")
        assert assoc.is_established
        for i in range(200):
            ds = datasets[i % len(datasets)]
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            if not assoc.is_established:
                break
            rsp = assoc.send_c_store(ds)
            if rsp is not None and rsp.get("Status") == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
            elif killed.is_set():
                break
        t.join(60)
        assert killed.is_set() and len(acknowledged) >= 25
        assoc.abort()
    finally:
        if proc.poll() is None:
            kill9(proc)
    # restart: every instance that got a success status is indexed and readable, nothing partial is left
    proc = node_process(cfg, log=tmp_path / "node.log")
    try:
        wait_port(port, 60)
        rows = dict(db_rows(tmp_path, "select sop_instance_uid, path from instances"))
        for uid in acknowledged:
            assert uid in rows, f"acknowledged {uid} lost"
            assert pydicom.dcmread(tmp_path / "var" / str(rows[uid])).SOPInstanceUID == uid
        assert len(rows) - len(acknowledged) in (0, 1)  # at most the one in flight, stored but not acknowledged
        assert not [p for p in (tmp_path / "var" / "instances").rglob("*.tmp")]
        proc.send_signal(signal.SIGTERM)  # a clean stop
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)


def test_kill9_during_job_resumes_and_finishes_once(tmp_path: Path, ct: list[Path]) -> None:
    need("storescu", "Orthanc", "dciodvfy")
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        route = {"name": "ct", "when": {"Modality": "CT"}, "pipelines": ["tissue-hu"], "send_to": ["pacs"]}
        cfg = write_config(tmp_path, destinations=[pacs_destination(pacs.dicom_port)], routes=[route])
        port = int(cfg.read_text().split("port = ")[1].split("\n")[0])
        study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
        proc = node_process(cfg, log=tmp_path / "node.log")
        try:
            wait_port(port, 60)
            storescu(port, ct, extra=["-xv"])
            wait_until(lambda: db_rows(tmp_path, "select id from jobs where state = 'running'"), 60,
                       interval=0.02, what="job running")
            kill9(proc)
        finally:
            if proc.poll() is None:
                kill9(proc)
        assert db_rows(tmp_path, "select state from jobs") == [("running",)]
        proc = node_process(cfg, log=tmp_path / "node.log")
        try:
            wait_port(port, 60)
            wait_until(lambda: db_rows(tmp_path, "select id from jobs where state = 'done'"), 120, what="job done")
            wait_until(lambda: sorted(pacs.modalities_in_study(study)) == ["SEG", "SR"], 60, what="SEG and SR in PACS")
            time.sleep(1.0)  # nothing else arrives
            assert sorted(pacs.modalities_in_study(study)) == ["SEG", "SR"]
            assert len(pacs.instances_of_study(study)) == 2
            jobs = db_rows(tmp_path, "select id, state, attempts from jobs")
            assert len(jobs) == 1 and jobs[0][1] == "done" and jobs[0][2] == 2
            assert len(db_rows(tmp_path, "select sop_instance_uid from results")) == 2
            (result_dir,) = db_rows(tmp_path, "select result_dir from jobs")[0]
            for f in sorted(Path(str(result_dir)).glob("*.dcm")):  # what went to the PACS: valid, readable
                ok, report = dciodvfy(f)
                assert ok, report
                ds = pydicom.dcmread(f)
                back = (hd.seg.Segmentation if ds.Modality == "SEG" else hd.sr.Comprehensive3DSR).from_dataset(ds)
                assert back.StudyInstanceUID == study
            events = [json.loads(x) for x in (tmp_path / "var" / "audit.jsonl").read_text().splitlines()]
            assert any(e["event"] == "job_pending" and e.get("reason") == "interrupted by a restart" for e in events)
            assert [e["event"] for e in events].count("job_done") == 1

            status = cli("status", "--json", "--config", str(cfg))
            assert status.returncode == 0, status.stderr
            doc = json.loads(status.stdout)
            assert set(doc) >= {"series", "jobs"}
            s0, j0 = doc["series"][0], doc["jobs"][0]
            assert {"series_uid", "study_uid", "instances", "state"} <= set(s0) and s0["instances"] == 20
            assert {"id", "series_uid", "pipeline", "state", "attempts", "error"} <= set(j0)
            assert j0["state"] == "done" and j0["pipeline"] == "tissue-hu"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    finally:
        pacs.stop()
