"""Issue 14 item 7: notifications when a result is filed or a job is dead -- a webhook (JSON) and an
HL7 v2 ORU^R01 over MLLP to a RIS, fired by real jobs of the node; PHI only where the target asks."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import hl7
import pytest

from node.config import ConfigError, Hl7Notify, load
from node.db import Notification
from node.notify import key_values, oru_r01
from node.service import Node
from tests.conftest import need
from tests.node_helpers import _toml_value, pacs_destination, write_config
from tests.node_pipelines import FACTORIES
from tests.notify_peers import notify_peers, segments
from tests.peers import Orthanc, storescu, wait_until
from tests.synthetic_ct import write_study

TISSUE = {"tissue-hu": "tests.versioned_pipeline:create", "test-sr": FACTORIES["test-sr"]}


def add_notify(config: Path, targets: list[dict[str, Any]]) -> None:
    lines = []
    for t in targets:
        lines.append("[[notify]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in t.items()]
    config.write_text(config.read_text() + "\n".join(lines) + "\n")


# Units --------------------------------------------------------------------------------------------


def test_notify_config_is_a_union_by_kind(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[notify]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\nport = 2575\n'
                   '[[notify]]\nname = "hook"\nkind = "webhook"\nurl = "http://127.0.0.1:9/x"\n')
    c = load(cfg, environ={})
    assert [n.kind for n in c.notify] == ["hl7", "webhook"] and not c.notify[0].include_phi
    for bad, where in (('kind = "email"\nurl = "x"', "notify[0]"), ('kind = "webhook"\nurl = "ftp://x"', "url"),
                       ('kind = "hl7"\nhost = "h"', "port")):
        cfg.write_text(f'[[notify]]\nname = "x"\n{bad}\n')
        with pytest.raises(ConfigError, match=re.escape(where)):
            load(cfg, environ={})


def test_oru_r01_phi_only_when_asked() -> None:
    payload: dict[str, Any] = {
        "event": "filed", "job_id": 7, "pipeline": "body-composition", "pipeline_version": "2.0",
        "study_uid": "1.2.3", "series_uid": "1.2.3.4", "evaluable": True, "reason": "",
        "key_values": [{"name": "level", "value": "L3", "unit": ""},
                       {"name": "areas_cm2.skeletal_muscle", "value": 151.25, "unit": "cm2"},
                       {"name": "derived.smi", "value": None, "unit": "cm2/m2", "not_evaluable": "no height|weight"}]}
    target = Hl7Notify(name="ris", host="127.0.0.1", port=2575, receiving_application="RIS")
    msg = hl7.parse(oru_r01(target, payload, "C1"))
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(msg.segment("MSH")[10]) == "C1"
    assert segments(msg, "PID") == []  # no PHI: UIDs only
    obx = {str(s[3][0][0]): s for s in segments(msg, "OBX")}
    assert str(obx["110180"][5]) == "1.2.3" and str(obx["112002"][5]) == "1.2.3.4"
    muscle = obx["areas_cm2.skeletal_muscle"]
    assert str(muscle[2]) == "NM" and float(str(muscle[5])) == 151.25 and str(muscle[6][0][0]) == "cm2"
    assert msg.unescape(str(obx["derived.smi"][5])) == "not evaluable: no height|weight"  # | escaped as \F\
    with_phi = hl7.parse(oru_r01(target, {**payload, "patient": {"PatientName": "Doe^Jane", "PatientID": "P1",
                                                                 "PatientBirthDate": "19600101",
                                                                 "AccessionNumber": "A9"}}, "C2"))
    pid = with_phi.segment("PID")
    assert str(pid[3][0][0]) == "P1" and str(pid[5]) == "Doe^Jane" and str(pid[7]) == "19600101"
    assert str(with_phi.segment("OBR")[18]) == "A9"


def test_key_values_from_summaries() -> None:
    bc = {"level": "L3", "areas_cm2": {"skeletal_muscle": {"value": 150.0, "unit": "cm2"}},
          "derived": {"smi": {"value": None, "unit": "cm2/m2", "not_evaluable": "no height"}},
          "sarcopenia": {"cutoff": "Martin 2013"}}
    kv = key_values(bc)
    assert kv[0] == {"name": "level", "value": "L3", "unit": ""}
    assert {"name": "areas_cm2.skeletal_muscle", "value": 150.0, "unit": "cm2"} in kv
    assert any(v["name"] == "derived.smi" and v["not_evaluable"] == "no height" for v in kv)
    tissue = key_values({"segments": {"soft-tissue": {"volume_ml": 12.5, "mean_hu": 41.0, "voxels": 9}}})
    assert [v["name"] for v in tissue] == ["segments.soft-tissue.volume_ml", "segments.soft-tissue.mean_hu"]
    assert key_values({"key_values": [{"name": "x", "value": 1}]}) == [{"name": "x", "value": 1}]


# Through the node ---------------------------------------------------------------------------------


def _rows(node: Node) -> list[Notification]:
    with node.db.read() as s:
        return list(s.query(Notification).order_by(Notification.id).all())


@pytest.mark.slow
def test_filed_and_dead_jobs_notify_webhook_and_ris(tmp_path: Path, pacs: Orthanc) -> None:
    """A tissue-hu job filed in Orthanc and a job that dies: the webhook (no PHI, Bearer token) and
    the RIS (PHI, its first ACK is AE: retried) are told of both."""
    need("storescu")
    study = write_study(tmp_path / "ct", 3, dt.date(2026, 1, 5), slices=6, size=48)
    routes = [{"name": "ct", "when": {"Modality": "CT"}, "pipelines": ["tissue-hu"], "send_to": ["pacs"]},
              {"name": "ct-fails", "when": {"Modality": "CT"}, "pipelines": ["test-sr"]}]
    cfg = write_config(tmp_path / "node", destinations=[pacs_destination(pacs.dicom_port)], routes=routes,
                       pipelines={"test-sr": {"fail": True}}, web={"port": 8089})
    (tmp_path / "node" / "hook.token").write_text("s3cret\n")
    with notify_peers(statuses=[503], acks=["AE"]) as (hook, ris):
        add_notify(cfg, [{"name": "hook", "kind": "webhook", "url": hook.url, "token_file": "hook.token",
                          "timeout_seconds": 5, "retry_seconds": 0.2},
                         {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port, "include_phi": True,
                          "receiving_application": "RIS", "receiving_facility": "HOSP", "retry_seconds": 0.2,
                          "timeout_seconds": 5}])
        node = Node(load(cfg, environ={}), factories=TISSUE).start()
        try:
            storescu(node.port, list(study.files))
            wait_until(lambda: len(hook.bodies()) >= 3, 120, interval=0.2,
                       what="the webhook calls (one answered 503, sent again, and one more)")
            wait_until(lambda: len(ris.messages) >= 3, 60, interval=0.2,
                       what="the RIS messages (one answered AE, sent again, and one more)")
            wait_until(lambda: all(n.state == "sent" for n in _rows(node)) and len(_rows(node)) == 4, 30,
                       interval=0.2, what="every notification sent")
            rows = _rows(node)
        finally:
            node.stop(timeout=10)
    assert {(r.target, r.event) for r in rows} == {("hook", "filed"), ("hook", "dead"), ("ris", "filed"),
                                                      ("ris", "dead")}
    assert sorted(r.attempts for r in rows if r.target == "hook") == [1, 2]  # the 503: sent again
    assert sorted(r.attempts for r in rows if r.target == "ris") == [1, 2]  # the AE answer: sent again
    assert len(hook.received) == 3
    filed = hook.bodies("filed")[0]
    assert filed["study_uid"] == study.study_uid and filed["series_uid"] == study.series_uids[0]
    assert filed["pipeline"] == "tissue-hu" and filed["pipeline_version"] == "1.0.0"
    assert filed["evaluable"] is True and filed["destinations"] == ["pacs"]
    assert {r["modality"] for r in filed["results"]} == {"SEG", "SR"}
    assert any(v["name"] == "segments.soft-tissue.volume_ml" and v["value"] > 0 for v in filed["key_values"])
    assert filed["links"]["job"].endswith(f"/api/jobs/{filed['job_id']}")
    assert "patient" not in filed and "Sweep" not in json.dumps(hook.bodies())  # UIDs only
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in hook.received)
    dead = hook.bodies("dead")[0]
    assert dead["pipeline"] == "test-sr" and dead["evaluable"] is None and "asked to fail" in dead["reason"]
    # the RIS: every message parsed; the AE one was sent again with a new control ID
    assert len(ris.messages) == 3
    first, *rest = ris.messages
    again = next(m for m in rest if str(m.segment("OBR")[25]) == str(first.segment("OBR")[25]))
    assert str(again.segment("MSH")[10]) != str(first.segment("MSH")[10])  # a new control ID per attempt
    assert {str(m.segment("OBR")[25]) for m in rest} == {"F", "X"}
    oru = next(m for m in rest if str(m.segment("OBR")[25]) == "F")
    assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(oru.segment("MSH")[5]) == "RIS"
    pid = oru.segment("PID")
    assert str(pid[3][0][0]) == "SWEEP0003" and str(pid[5]) == "Sweep^Phantom003" and str(pid[7]) == "19600101"
    assert str(oru.segment("OBR")[18]) == "ACC00003"
    obx = {str(s[3][0][0]): s for s in segments(oru, "OBX")}
    assert str(obx["110180"][5]) == study.study_uid and str(obx["evaluable"][5]) == "Y"
    volume = obx["segments.soft-tissue.volume_ml"]
    assert str(volume[2]) == "NM" and float(str(volume[5])) == pytest.approx(
        next(v["value"] for v in filed["key_values"] if v["name"] == "segments.soft-tissue.volume_ml"), rel=1e-5)
    assert str(volume[6][0][0]) == "mL"
    dead_oru = next(m for m in rest if str(m.segment("OBR")[25]) == "X")
    assert str(dead_oru.segment("OBR")[4][0][0]) == "test-sr"
    audit = [json.loads(x) for x in Path(node.config.path(node.config.logging.audit_file)).read_text().splitlines()]
    assert any(e["event"] == "notification_failed" and "ACK AE" in e["error"] for e in audit)
    assert any(e["event"] == "notification_failed" and "503" in e["error"] for e in audit)
    assert sum(e["event"] == "notification_sent" for e in audit) == 4


def test_outbox_survives_a_restart_and_tells_each_event_once(tmp_path: Path) -> None:
    """The outbox is a table: a message to a RIS that is down waits (back-off), a new notifier (a
    restart) queues nothing twice and sends it once the RIS is up."""
    from node.audit import AuditLog
    from node.db import Database, Export, Job, Result, now
    from node.index import Index
    from node.notify import Notifier
    from tests.peers import free_port

    port = free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\nstorage = "var"\n[[notify]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\n'
                   f'port = {port}\nretry_seconds = 0.05\ntimeout_seconds = 2\n')
    config = load(cfg, environ={})
    config.storage_dir.mkdir(parents=True)
    db = Database(config.database_url)
    try:
        def notifier() -> Notifier:
            return Notifier(db, config, Index(db, config.storage_dir), AuditLog(None))

        first = notifier()
        first.scan()  # starts looking from now
        t = now()
        with db.session() as s:
            s.add(Job(id=1, series_uid="1.2.3.4", study_uid="1.2.3", route="r", pipeline="tissue-hu", inputs={},
                      input_key="k", state="done", attempts=1, finished_at=t,
                      summary={"evaluable": True, "pipeline_version": "1.0.0"}))
            s.flush()
            s.add(Result(sop_instance_uid="1.2.3.9", job_id=1, series_uid="1.2.3.8", source_series_uid="1.2.3.4",
                         study_uid="1.2.3", modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                         pipeline="tissue-hu"))
            s.add(Export(job_id=1, destination="pacs", path="/x", sop_instance_uid="1.2.3.9", state="sent",
                         attempts=1, sent_at=t))
        assert first.scan() == 1 and first.scan() == 0
        assert first.deliver() == 0  # nobody listens on the port: a failed attempt, pending again
        with db.read() as s:
            row = s.query(Notification).one()
            assert row.state == "pending" and row.attempts == 1 and "Connection" in row.last_error
        second = notifier()  # a restart
        assert second.scan() == 0
        with notify_peers() as (_hook, ris):
            second.targets = {"ris": second.targets["ris"].model_copy(update={"port": ris.port})}
            wait_until(lambda: second.deliver() == 1, 10, interval=0.1, what="the message sent after the restart")
            assert len(ris.messages) == 1 and str(ris.messages[0].segment("OBR")[25]) == "F"
        with db.read() as s:
            row = s.query(Notification).one()
            assert row.state == "sent" and row.attempts == 2
    finally:
        db.dispose()
