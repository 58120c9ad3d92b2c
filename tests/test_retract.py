"""Issue 14 item 8: retraction by an IOCM rejection note (KOS "Rejected for Quality Reasons") sent to
every destination that received the results, and a re-run after a pipeline upgrade whose SR
supersedes the old one (Predecessor Documents)."""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient

from dicom_templates.codes import concept
from node import cli as node_cli
from node.config import load
from node.db import Export, Job, Result, Retraction
from node.metrics import Metrics
from node.service import Node
from node.web import create_app
from pipelines import tissue_hu
from tests.conftest import need
from tests.node_helpers import pacs_destination, write_config
from tests.notify_peers import notify_peers
from tests.peers import Orthanc, dciodvfy, storescu, wait_until
from tests.synthetic_ct import write_study
from tests.test_notify import TISSUE, add_notify

TOKEN = "retract-token"


def _objects(pacs: Orthanc, study_uid: str, folder: Path) -> list[pydicom.Dataset]:
    """The SEG, SR and KO instances of the study in Orthanc, as files."""
    folder.mkdir(parents=True, exist_ok=True)
    out: list[pydicom.Dataset] = []
    for inst in pacs.instances_of_study(study_uid):
        with urllib.request.urlopen(f"{pacs.url}/instances/{inst['ID']}/file", timeout=30) as r:
            path = folder / f"{inst['ID']}.dcm"
            path.write_bytes(r.read())
        ds = pydicom.dcmread(path)
        if ds.Modality in ("SEG", "SR", "KO"):
            ds.filename = str(path)
            out.append(ds)
    return out


def _done(node: Node) -> list[Job]:
    with node.db.read() as s:
        return list(s.query(Job).filter(Job.state == "done").order_by(Job.id).all())


@pytest.mark.slow
def test_retract_then_rerun_after_upgrade(tmp_path: Path, pacs: Orthanc, monkeypatch: pytest.MonkeyPatch) -> None:
    need("storescu", "dciodvfy")
    monkeypatch.setattr(tissue_hu, "VERSION", tissue_hu.VERSION)  # the CLI's version look-up sets it in this process
    study = write_study(tmp_path / "ct", 4, dt.date(2026, 1, 6), slices=6, size=48)
    series = study.series_uids[0]
    route = {"name": "ct", "when": {"Modality": "CT"}, "pipelines": ["tissue-hu"], "send_to": ["pacs"]}

    def config(version: str) -> Path:
        path = write_config(tmp_path / "node", destinations=[pacs_destination(pacs.dicom_port)], routes=[route],
                            pipelines={"tissue-hu": {"test_version": version}}, web={"token": TOKEN})
        add_notify(path, [{"name": "hook", "kind": "webhook", "url": hook.url, "events": ["filed", "retracted"]}])
        return path

    with notify_peers() as (hook, _ris):
        cfg = config("1.0.0")
        node = Node(load(cfg, environ={}), factories=TISSUE).start()
        try:
            storescu(node.port, list(study.files))
            first = wait_until(lambda: _done(node), 120, interval=0.2, what="the first job")[0]
            wait_until(lambda: hook.bodies("filed"), 60, interval=0.2, what="the result filed in Orthanc")
            client = TestClient(create_app(node.config, node.db, Metrics(node.db), node.audit))
            auth = {"Authorization": f"Bearer {TOKEN}"}
            url = f"/api/jobs/{first.id}/retract"
            assert client.post(url, json={"reason": "x"}).status_code == 401
            assert client.post("/api/jobs/999/retract", json={"reason": "x"}, headers=auth).status_code == 404
            assert client.post(url, json={"reason": "  "}, headers=auth).status_code == 422
            r = client.post(url, json={"reason": "wrong series: a scout"}, headers=auth)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["destinations"] == ["pacs"] and len(out["retracted"]) == 2
            assert client.post(url, json={"reason": "again"}, headers=auth).status_code == 409
            shown = client.get(f"/api/jobs/{first.id}", headers=auth).json()
            assert shown["retraction"]["reason"] == "wrong series: a scout" and shown["pipeline_version"] == "1.0.0"
            assert '<span class="retracted"' in client.get("/", headers=auth).text
            listed = {r["sop_instance_uid"]: r["retracted"] for r in client.get("/api/results", headers=auth).json()}
            assert listed == {uid: True for uid in out["retracted"]}
            assert node_cli.main(["retract", str(first.id), "--reason", "x", "--config", str(cfg)]) == 1  # again
            assert node_cli.main(["retract", "999", "--reason", "x", "--config", str(cfg)]) == 2
            assert node_cli.main(["resend", str(first.id), "--config", str(cfg)]) == 1  # never sent again

            def kos_sent() -> bool:
                with node.db.read() as s:
                    e = s.query(Export).filter(Export.sop_instance_uid == out["kos_sop_instance_uid"]).one()
                    return e.state == "sent"

            wait_until(kos_sent, 60, interval=0.2, what="the rejection note sent to Orthanc")
            wait_until(lambda: hook.bodies("retracted"), 30, interval=0.2, what="the retraction notified")
        finally:
            node.stop(timeout=10)
        objects = _objects(pacs, study.study_uid, tmp_path / "pacs1")
        kos = next(o for o in objects if o.Modality == "KO")
        rejected = {o.SOPInstanceUID for o in objects if o.Modality in ("SEG", "SR")}
        assert kos.SOPInstanceUID == out["kos_sop_instance_uid"] and rejected == set(out["retracted"])
        title = concept("rejected-for-quality-reasons")
        assert (kos.ConceptNameCodeSequence[0].CodeValue, kos.ConceptNameCodeSequence[0].CodingSchemeDesignator) == \
            (title.value, title.scheme_designator) == ("113001", "DCM")
        evidence = {i.ReferencedSOPInstanceUID for st in kos.CurrentRequestedProcedureEvidenceSequence
                    for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
        assert evidence == rejected and kos.StudyInstanceUID == study.study_uid
        ok, report = dciodvfy(Path(kos.filename))
        assert ok, report
        back = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)  # round trip
        assert {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in back.ContentSequence
                if i.ValueType in ("IMAGE", "COMPOSITE")} == rejected
        assert hook.bodies("retracted")[0]["retraction"]["kos_sop_instance_uid"] == kos.SOPInstanceUID

        # the pipeline is upgraded: rerun on the same series makes a new job whose SR supersedes the old
        cfg = config("2.0.0")
        node = Node(load(cfg, environ={}), factories=TISSUE).start()
        try:
            assert node_cli.main(["rerun", series, "--pipeline", "tissue-hu", "--config", str(cfg)],
                                 factories=TISSUE) == 0
            assert node_cli.main(["rerun", series, "--pipeline", "tissue-hu", "--config", str(cfg)],
                                 factories=TISSUE) == 1  # queued already: a job is pending or running
            second = wait_until(lambda: (d := _done(node)) and len(d) >= 2 and d[1], 120, interval=0.2,
                                what="the re-run")
            assert second.input_key != first.input_key and second.inputs["pipeline_version"] == "2.0.0"
            assert second.inputs["rerun"]["previous_job"] == first.id
            assert second.summary["pipeline_version"] == "2.0.0" and first.summary["pipeline_version"] == "1.0.0"
            # the same version again is refused (the latest result is already that version's)
            assert node_cli.main(["rerun", series, "--pipeline", "tissue-hu", "--config", str(cfg)],
                                 factories=TISSUE) == 1
            wait_until(lambda: len([o for o in _objects(pacs, study.study_uid, tmp_path / "pacs-wait")
                                    if o.Modality == "SR"]) >= 2, 60, interval=0.5, what="the new SR in Orthanc")
            with node.db.read() as s:
                new_rows = s.query(Result).filter(Result.job_id == second.id).all()
                old_rows = {r.sop_instance_uid for r in s.query(Result).filter(Result.job_id == first.id).all()}
                assert new_rows and all(r.supersedes in old_rows for r in new_rows)
                assert s.get(Retraction, second.id) is None
        finally:
            node.stop(timeout=10)
    srs = [o for o in _objects(pacs, study.study_uid, tmp_path / "pacs2") if o.Modality == "SR"]
    old = next(o for o in srs if "PredecessorDocumentsSequence" not in o)
    new = next(o for o in srs if "PredecessorDocumentsSequence" in o)
    ref = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old.SOPInstanceUID
    versions = {o.SOPInstanceUID: json.dumps([str(x) for x in o.iterall()]) for o in (old, new)}
    assert "2.0.0" in versions[new.SOPInstanceUID] and "1.0.0" in versions[old.SOPInstanceUID]
    ok, report = dciodvfy(Path(new.filename))
    assert ok, report


def test_rejection_note_refuses_what_iocm_cannot_say() -> None:
    from pydicom.dataset import Dataset

    from dicom_templates.identity import Identity
    from dicom_templates.kos import build_rejection_kos

    identity = Identity(manufacturer="prognode", software_version="0.1.0", device_serial_number="kos-test")

    def obj(study: str) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, study + ".1", study + ".1.1"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        return ds

    with pytest.raises(ValueError, match="at least one"):
        build_rejection_kos([], identity, 9199, "why")
    with pytest.raises(ValueError, match="2 studies"):
        build_rejection_kos([obj("1.2.3"), obj("1.2.4")], identity, 9199, "why")
    with pytest.raises(ValueError, match="reason"):
        build_rejection_kos([obj("1.2.3")], identity, 9199, " ")
    with pytest.raises(ValueError, match="device_serial_number"):
        build_rejection_kos([obj("1.2.3")], Identity("prognode", "0.1.0", ""), 9199, "why")
