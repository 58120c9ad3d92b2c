"""Transports as plug-ins (issue 14, item 1): ``[[destinations]] kind = "dimse" | "dicomweb"``, one sender per
kind behind node.transports, the one retry / dead-letter / probe state machine of node.export for both.

Real peers: Orthanc with its DICOMweb plug-in (STOW-RS in, QIDO-RS for the probe and ``prognode echo``);
a scripted STOW-RS server in the test where a response must be one Orthanc does not give (202 with a
FailedSOPSequence, 503, 400) or a header must be seen (Bearer, Basic).  Where the schedule matters the
clock is fake (``node.export.now``), as in tests/test_export_backoff.py."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import random
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from node import cli as node_cli
from node import export as export_mod
from node.audit import AuditLog
from node.config import (
    Config,
    ConfigError,
    DestinationConfig,
    DicomwebDestinationConfig,
    DicomwebSourceConfig,
    NodeConfig,
    load,
)
from node.db import Database, Export, ExportState, Job, JobState
from node.export import REFUSED, Exporter
from node.sweep.dicomweb import client as source_client
from node.sweep.dicomweb import search_studies
from node.transports.dicomweb import DicomwebSender
from tests.conftest import need
from tests.node_helpers import ROUTE, running_node, write_config
from tests.peers import Orthanc, free_port, storescu, wait_until
from tests.synthetic_ct import write_study
from tests.test_tls import Pki, pki  # noqa: F401 - the module's test PKI (CA, server, client, rogue CA)

pytestmark = pytest.mark.peers

SECRET = "s3cret-token-never-logged"


# A scripted STOW-RS / QIDO-RS server ------------------------------------------------------------------


@dataclass
class Stub:
    """Answers each POST with the next scripted (status, DICOM JSON body); GET (QIDO-RS) with ``[]``."""

    replies: list[tuple[int, dict[str, Any] | None]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0


@contextmanager
def stow_stub(context: ssl.SSLContext | None = None) -> Iterator[Stub]:
    """The scripted server on a free loopback port; over TLS with ``context``."""
    stub = Stub()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            stub.seen.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
            self._answer(200, [])

        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            if self.headers.get("Transfer-Encoding") == "chunked":
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
            stub.seen.append({"method": "POST", "path": self.path, "auth": self.headers.get("Authorization"),
                              "type": self.headers.get("Content-Type"), "bytes": len(body)})
            status, reply = stub.replies.pop(0) if stub.replies else (200, None)
            self._answer(status, reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    stub.port = int(server.server_address[1])
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def sop_item(uid: str, reason: int | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                            "00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def store_response(stored: list[str], failed: list[tuple[str, int]]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [sop_item(u) for u in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [sop_item(u, r) for u, r in failed]}
    return body


# Exports queued directly (no node) --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def queue_exports(tmp_path: Path, dest: DicomwebDestinationConfig | DestinationConfig,
                  results: int) -> tuple[Database, Config, list[str]]:
    study = write_study(tmp_path / "src", 3, dt.date(2025, 5, 6), slices=results)
    config = Config(node=NodeConfig(storage=tmp_path / "var"), destinations=(dest,), base_dir=tmp_path)
    db = Database(f"sqlite:///{tmp_path / 'prognode.db'}")
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study.files]
    with db.session() as s:
        job = Job(series_uid=study.series_uids[0], study_uid=study.study_uid, route="ct", pipeline="test-sr",
                  inputs={}, input_key="k", state=JobState.DONE.value)
        s.add(job)
        s.flush()
        for f, uid in zip(study.files, uids, strict=True):
            s.add(Export(job_id=job.id, destination=dest.name, path=str(f), sop_instance_uid=uid))
    return db, config, uids


def rows(db: Database) -> dict[str, Export]:
    with db.read() as s:
        return {r.sop_instance_uid: r for r in s.scalars(select(Export).order_by(Export.id))}


def web_dest(url: str, **kw: Any) -> DicomwebDestinationConfig:
    return DicomwebDestinationConfig.model_validate({"name": "vna", "kind": "dicomweb", "url": url, **kw})


# Config --------------------------------------------------------------------------------------------------


def test_destination_kinds_in_config(tmp_path: Path) -> None:
    """``kind`` picks the model; absent, it is ``dimse`` (every existing config keeps working); the issue's
    example loads (``ca_certificates`` as in the issue, or ``ca_bundle``); errors name the key."""

    def parse(text: str) -> Config:
        (tmp_path / "c.toml").write_text(text)
        return load(tmp_path / "c.toml", environ={})

    def error(text: str) -> str:
        with pytest.raises(ConfigError) as e:
            parse(text)
        return str(e.value)

    dimse = parse('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\nport = 104\n')
    assert isinstance(dimse.destinations[0], DestinationConfig) and dimse.destinations[0].kind == "dimse"
    vna_text = ('[[destinations]]\nname = "vna"\nkind = "dicomweb"\nurl = "https://vna.example.org/dicom-web"\n'
                'token_file = "secrets/vna.token"\n[destinations.tls]\nca_bundle = "tls/vna-ca.pem"\n'
                '[[routes]]\nname = "r"\npipelines = ["x"]\nsend_to = ["vna"]\n')
    vna = parse(vna_text)
    (d,) = vna.destinations
    assert isinstance(d, DicomwebDestinationConfig) and d.uses_tls and d.token_file == Path("secrets/vna.token")
    assert d.retry_seconds == 30.0 and d.dead_letter_after_seconds == 86400.0  # the common retry settings
    web = '[[destinations]]\nname = "vna"\nkind = "dicomweb"\n'
    assert "destinations[0].kind: 'dimse' (the default) or 'dicomweb'" in error(web.replace("dicomweb", "web") +
                                                                               'url = "http://x"\n')
    assert "destinations[0].url:" in error(web + 'url = "ftp://x/dicom-web"\n')
    assert "destinations[0].url:" in error(web + 'url = "http://user:pw@x/dicom-web"\n')  # no secrets in URLs
    assert "destinations[0].url: Field required" in error(web)
    assert "destinations[0].ae_title" in error(web + 'url = "http://x"\nae_title = "X"\n')  # a DIMSE key
    assert "destinations[0].tls: ca_bundle is required for an https url" in error(web + 'url = "https://x"\n')
    assert "destinations[0].tls: enabled with an http:// url" in error(
        web + 'url = "http://x"\n[destinations.tls]\nenabled = true\nca_bundle = "ca.pem"\n')
    assert "destinations[0].username: goes together with password_file" in error(web + 'url = "http://x"\n'
                                                                               'username = "u"\n')
    assert "destinations[0].token_file: either" in error(
        web + 'url = "http://x"\ntoken_file = "t"\nusername = "u"\npassword_file = "p"\n')
    # the issue's own example: "ca_certificates" is the peer TLS table's other name for ca_bundle
    exact = parse(vna_text.replace("ca_bundle", "ca_certificates")).destinations[0]
    assert isinstance(exact, DicomwebDestinationConfig) and exact.tls.ca_bundle is not None
    assert exact.tls.ca_bundle.name == "vna-ca.pem"


# STOW-RS outcomes -> the one state machine -------------------------------------------------------------------


def test_stow_outcomes_map_to_retry_or_dead_letter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """One STOW-RS request per batch with the Bearer token; per instance: ReferencedSOPSequence is sent,
    FailedSOPSequence with A700 (out of resources) is retried with back-off, C000 is a dead letter at once
    (and not requeued by a probe); then HTTP 503 is retried and HTTP 400 is a dead letter.  The token is in
    no log line and no audit record."""
    caplog.set_level(logging.DEBUG)
    (tmp_path / "vna.token").write_text(SECRET + "\n")
    clock = Clock()
    monkeypatch.setattr(export_mod, "now", clock)
    with stow_stub() as stub:
        d = web_dest(f"http://127.0.0.1:{stub.port}/dicom-web", token_file="vna.token", retry_seconds=10,
                     retry_jitter=0.0, probe_seconds=5)
        db, config, (ok, busy, bad) = queue_exports(tmp_path, d, results=3)
        audit = AuditLog(tmp_path / "audit.jsonl")
        exporter = Exporter(db, config, audit, rng=random.Random(1))
        stub.replies.append((202, store_response([ok], [(busy, 0xA700), (bad, 0xC000)])))
        assert exporter.tick() == 1
        (post,) = stub.seen
        assert post["path"] == "/dicom-web/studies" and post["auth"] == f"Bearer {SECRET}"
        assert post["type"].startswith("multipart/related") and 'type="application/dicom"' in post["type"]
        r = rows(db)
        assert r[ok].state == ExportState.SENT and r[ok].attempts == 1
        assert r[busy].state == ExportState.PENDING and "0xA700" in r[busy].last_error
        assert r[busy].next_attempt_at == pytest.approx(clock.t + 10)
        assert r[bad].state == ExportState.DEAD and r[bad].last_error.startswith(REFUSED)
        assert "FailureReason 0xC000" in r[bad].last_error
        clock.t += 10
        stub.replies.append((503, None))
        assert exporter.tick() == 0
        assert rows(db)[busy].state == ExportState.PENDING and rows(db)[busy].attempts == 2
        assert "HTTP 503" in rows(db)[busy].last_error
        clock.t += 20
        stub.replies.append((400, None))
        assert exporter.tick() == 0
        r = rows(db)
        assert r[busy].state == ExportState.DEAD and r[busy].last_error.startswith(REFUSED + "STOW-RS HTTP 400")
        # a restarted exporter probes because of the dead letters; refusals are not requeued
        fresh = Exporter(db, config, audit)
        assert fresh._undelivered("vna", include_pending=True) == 0
        assert len([s for s in stub.seen if s["method"] == "POST"]) == 3
    logged = caplog.text + (tmp_path / "audit.jsonl").read_text()
    assert SECRET not in logged and "export_dead" in logged
    db.dispose()


def test_dicomweb_destination_down_is_retried_dead_lettered_then_delivered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens at the URL: each attempt fails (retryable), backs off, then is a dead letter; the
    QIDO-RS probe then finds Orthanc there and the dead letters go by STOW-RS, attempts reset."""
    need("Orthanc")
    port = free_port()
    d = web_dest(f"http://127.0.0.1:{port}/dicom-web", retry_seconds=10, retry_max_seconds=40, retry_jitter=0.0,
                 dead_letter_after_seconds=60, probe_seconds=30, timeout_seconds=5)
    db, config, uids = queue_exports(tmp_path, d, results=2)
    clock = Clock()
    monkeypatch.setattr(export_mod, "now", clock)
    audit = AuditLog(tmp_path / "audit.jsonl")
    exporter = Exporter(db, config, audit, rng=random.Random(3))
    for attempt in range(1, 5):  # delays 10, 20, 40: 70 s >= 60 s after the fourth failure
        assert exporter.tick() == 0
        r = list(rows(db).values())
        assert all(x.attempts == attempt and "unreachable" in x.last_error for x in r), r[0].last_error
        if attempt < 4:
            assert all(x.state == ExportState.PENDING for x in r)
            clock.t = r[0].next_attempt_at
        else:
            assert all(x.state == ExportState.DEAD for x in r)
    assert exporter._reach["vna"].down is True
    pacs = Orthanc(tmp_path / "orthanc", http_port=port).start()
    try:
        clock.t += 31  # the probe is due: QIDO-RS answers
        assert exporter.tick() == 2
        r = list(rows(db).values())
        assert all(x.state == ExportState.SENT and x.attempts == 1 for x in r)
        stored = pacs.instances_of_study(str(pydicom.dcmread(r[0].path, stop_before_pixels=True).StudyInstanceUID))
        assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored) == sorted(uids)
        assert {_origin(pacs, i["ID"]) for i in stored} == {"Plugins"}  # by its DICOMweb plug-in (STOW-RS), not C-STORE
    finally:
        pacs.stop()
    events = [e["event"] for e in audit.read()]
    assert events.count("export_failed") == 6 and events.count("export_dead") == 2
    assert "export_destination_up" in events and events[-1] == "export_sent"
    db.dispose()


def _origin(pacs: Orthanc, instance_id: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{pacs.url}/instances/{instance_id}/metadata/Origin", timeout=10) as r:
        return str(r.read().decode())


# End to end: a routed series to Orthanc by STOW-RS --------------------------------------------------------------


def test_series_routed_to_a_dicomweb_destination_arrives_in_orthanc_by_stow(tmp_path: Path, pacs: Orthanc) -> None:
    need("storescu")
    study = write_study(tmp_path / "ct", 4, dt.date(2025, 6, 7), slices=4)
    dest = {"name": "pacs", "kind": "dicomweb", "url": f"{pacs.url}/dicom-web", "retry_seconds": 0.3,
            "max_attempts": 50}
    cfg = write_config(tmp_path, destinations=[dest], routes=[ROUTE])
    with running_node(cfg) as node:
        storescu(node.port, list(study.files), extra=["-xv"])
        wait_until(lambda: "SR" in pacs.modalities_in_study(study.study_uid), 60, what="SR in Orthanc by STOW-RS")
        sr = [i for i in pacs.instances_of_study(study.study_uid) if i["MainDicomTags"].get("SOPInstanceUID")
              and _origin(pacs, i["ID"]) == "Plugins"]  # stored by the DICOMweb plug-in
        assert len(sr) == 1
        wait_until(lambda: any(e["event"] == "export_sent" for e in node.audit.read()), 10, what="export_sent")
        sent = [e for e in node.audit.read() if e["event"] == "export_sent"]
        assert sent[0]["destination"] == "pacs" and sent[0]["status"] == "200"


# prognode echo, either kind ---------------------------------------------------------------------------------------


def test_echo_either_kind(tmp_path: Path, pacs: Orthanc, capsys: pytest.CaptureFixture[str]) -> None:
    """C-ECHO to a DIMSE destination, a QIDO-RS request to a DICOMweb one (with Basic credentials from a
    file, never printed); a DICOMweb destination that is down, or whose token file is missing, fails with
    a reason.  A DICOMweb source gets the same echo (the same session: node.transports.dicomweb)."""
    (tmp_path / "pw").write_text(SECRET)
    with stow_stub() as stub:
        cfg = write_config(tmp_path, destinations=[
            {"name": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs.dicom_port},
            {"name": "web", "kind": "dicomweb", "url": f"{pacs.url}/dicom-web"},
            {"name": "basic", "kind": "dicomweb", "url": f"http://127.0.0.1:{stub.port}/dicom-web",
             "username": "node", "password_file": "pw"},
            {"name": "down", "kind": "dicomweb", "url": f"http://127.0.0.1:{free_port()}/dicom-web"},
            {"name": "notoken", "kind": "dicomweb", "url": f"{pacs.url}/dicom-web", "token_file": "missing.token"},
        ])
        with cfg.open("a") as f:
            f.write(f'[[sources]]\nname = "websrc"\nkind = "dicomweb"\nurl = "{pacs.url}/dicom-web"\n'
                    f'[[sources]]\nname = "srcnotoken"\nkind = "dicomweb"\nurl = "{pacs.url}/dicom-web"\n'
                    'token_file = "missing.token"\n')

        def echo(name: str) -> tuple[int, str]:
            rc = node_cli.main(["echo", name, "--timeout", "5", "--config", str(cfg)])
            out = capsys.readouterr()
            return rc, out.out + out.err

        rc, text = echo("dimse")
        assert rc == 0 and "ORTHANC@127.0.0.1" in text and "ok (C-ECHO status 0x0000)" in text, text
        rc, text = echo("web")
        assert rc == 0 and "ok (QIDO-RS HTTP 200)" in text, text
        rc, text = echo("basic")
        assert rc == 0, text
        (get,) = stub.seen
        assert get["method"] == "GET" and get["path"].startswith("/dicom-web/studies")
        assert get["auth"] == "Basic " + base64.b64encode(f"node:{SECRET}".encode()).decode()
        rc, text = echo("down")
        assert rc == 1 and "unreachable" in text, text
        rc, text = echo("notoken")
        assert rc == 1 and "destinations 'notoken'.token_file: cannot read" in text, text
        assert SECRET not in text
        rc, text = echo("websrc")
        assert rc == 0 and f"echo websrc ({pacs.url}/dicom-web): ok (QIDO-RS HTTP 200)" in text, text
        rc, text = echo("srcnotoken")
        assert rc == 1 and "sources 'srcnotoken'.token_file: cannot read" in text, text
    rc = node_cli.main(["config", "check", str(cfg)])
    out = capsys.readouterr()
    assert rc == 2 and "token_file: cannot read" in out.err and SECRET not in out.err + out.out
    assert "sources 'srcnotoken'.token_file: cannot read" in out.err  # a DICOMweb source's files are checked too


# HTTPS: the peer TLS table -------------------------------------------------------------------------------------


def test_https_destination_uses_the_peer_tls_table(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    """An https URL is verified with the destination's ``tls``: its CA bundle (a rogue CA fails), the name in
    the server's certificate (``server_hostname`` when the URL's host is not in it), and our client
    certificate where the server requires one (mutual TLS); STOW-RS goes over the same session, and so does
    a DICOMweb source's QIDO-RS (the issue's ``ca_certificates`` without ``enabled``: https implies TLS)."""

    def server_context(cert: Path, key: Path, mutual: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        if mutual:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(pki.ca))
        return ctx

    def echo(port: int, **tls: Any) -> tuple[bool, str]:
        d = web_dest(f"https://127.0.0.1:{port}/dicom-web", tls=tls, timeout_seconds=5)
        return DicomwebSender(d, tmp_path).echo()

    ca = {"ca_bundle": str(pki.ca)}
    client = {"client_certificate": str(pki.client_cert), "client_private_key": str(pki.client_key)}
    with stow_stub(server_context(pki.server_cert, pki.server_key)) as plain, \
            stow_stub(server_context(pki.elsewhere_cert, pki.elsewhere_key)) as elsewhere, \
            stow_stub(server_context(pki.server_cert, pki.server_key, mutual=True)) as mutual:
        assert echo(plain.port, **ca) == (True, "QIDO-RS HTTP 200")
        ok, why = echo(plain.port, ca_bundle=str(pki.rogue_ca))
        assert not ok and "TLS" in why and "CERTIFICATE_VERIFY_FAILED" in why, why
        ok, why = echo(elsewhere.port, **ca)
        assert not ok and "TLS" in why and "127.0.0.1" in why, why
        assert echo(elsewhere.port, **ca, server_hostname="pacs.elsewhere.test")[0]
        ok, why = echo(mutual.port, **ca)
        assert not ok, why
        assert echo(mutual.port, **ca, **client)[0]
        sender = DicomwebSender(web_dest(f"https://127.0.0.1:{mutual.port}/dicom-web", tls={**ca, **client}),
                                tmp_path)
        ds = pydicom.dcmread(write_study(tmp_path / "s", 9, dt.date(2025, 1, 2), slices=1).files[0])
        assert sender.open([ds]) == ""
        try:
            assert [o.ok for o in sender.send_all([ds])] == [True]
        finally:
            sender.close()
        assert [s["method"] for s in mutual.seen][-1] == "POST"
        src = DicomwebSourceConfig.model_validate({
            "name": "vna", "kind": "dicomweb", "url": f"https://127.0.0.1:{mutual.port}/dicom-web",
            "tls": {"ca_certificates": str(pki.ca), **client}, "timeout_seconds": 5})
        assert search_studies(source_client(src, tmp_path), src, {}) == []
        assert mutual.seen[-1]["method"] == "GET" and mutual.seen[-1]["path"].startswith("/dicom-web/studies")
