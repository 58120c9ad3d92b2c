"""Sweeps against a real Orthanc: C-MOVE (into the running node), C-GET and WADO-RS (its DICOMweb plug-in), skip by
ledger, dry run, kill -9 and resume, hours, the node's caps on what comes back."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from node import config as config_mod
from node import service
from node.audit import AuditLog
from node.db import Database, Instance, Sweep, SweepItem
from node.metrics import Metrics
from node.sweep import (
    SCHEDULER_JOB_ID,
    Sweeper,
    SweepError,
    default_store_handler,
    open_database,
    run_sweep,
    start_scheduler,
)
from tests.conftest import need
from tests.peers import REPO, Orthanc, orthanc, sweep_node_config, wait_until
from tests.synthetic_ct import write_studies

FIRST = dt.date(2026, 3, 2)
N_STUDIES = 6
SLICES = 4


@pytest.fixture(scope="module")
def source_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    need("Orthanc")
    root = tmp_path_factory.mktemp("sweep-pacs")
    studies = write_studies(root / "dcm", N_STUDIES, FIRST, slices=SLICES)
    with orthanc(root / "orthanc") as o:
        o.upload([f for s in studies for f in s.files])
        # one study outside the date range, which no sweep of the range may touch
        late = write_studies(root / "late", 1, FIRST + dt.timedelta(days=60), slices=2, seed="late")
        o.upload(list(late[0].files))
        yield o


def write_config(tmp: Path, pacs: Orthanc, retrieve: str = "move", extra: str = "", database: str = "") -> Path:
    """The node's config for a sweep of ``pacs``; ``extra``: lines of ``[sweep]``; ``database``: its URL."""
    node_extra = "fsync = false" + (f'\ndatabase = "{database}"' if database else "")
    return sweep_node_config(tmp, pacs, retrieve, max_concurrent=2, node_extra=node_extra, sweep_extra=extra)


def _run(cfg_path: Path, dry_run: bool = False, hour: int | None = None) -> tuple[Any, ...]:
    cfg = config_mod.load(cfg_path)
    db = open_database(cfg)
    audit = AuditLog(cfg.path(cfg.logging.audit_file))
    metrics = Metrics(db)
    lines: list[str] = []
    sweeper = Sweeper(cfg, db, default_store_handler(cfg, db, metrics, audit), metrics, audit, lines.append,
                      **({"hour": lambda: hour} if hour is not None else {}))
    out = sweeper.run(FIRST, FIRST + dt.timedelta(days=10), dry_run=dry_run)
    return cfg, db, out, lines, metrics


def _instances(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


@contextmanager
def serving(cfg_path: Path, method: str) -> Iterator[service.Node | None]:
    """For C-MOVE the node's own SCP must run (it receives the sub-operations); yields the node or None."""
    if method != "move":
        yield None
        return
    node = service.Node(config_mod.load(cfg_path)).start()
    try:
        yield node
    finally:
        node.stop()


def _counter(scrape: str, name: str) -> float:
    for line in scrape.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(("method", "database_url"),
                         [("move", "sqlite"), ("get", "sqlite"), ("wado", "sqlite"), ("get", "postgresql")],
                         indirect=["database_url"])
def test_sweep_retrieves_then_second_sweep_retrieves_nothing(tmp_path: Path, source_pacs: Orthanc,
                                                             method: str, database_url: str) -> None:
    """The sweep ledger on SQLite and on PostgreSQL, for every retrieval."""
    cfg_path = write_config(tmp_path, source_pacs, method, database=database_url)
    with serving(cfg_path, method) as node:
        cfg, db, out, lines, metrics = _run(cfg_path)
    assert out.state == "done", lines
    assert (out.studies, out.series, out.retrieved, out.failed) == (N_STUDIES, N_STUDIES, N_STUDIES, 0)
    assert out.instances_retrieved == N_STUDIES * SLICES
    assert _instances(db) == N_STUDIES * SLICES
    files = list((cfg.storage_dir / "instances").rglob("*.dcm"))
    assert len(files) == N_STUDIES * SLICES
    report = json.loads((cfg.storage_dir / "sweeps" / f"sweep-{out.sweep_id}.json").read_text())
    assert report["retrieved"] == N_STUDIES and report["item_states"] == {"retrieved": N_STUDIES}
    label = {"move": "C-MOVE", "get": "C-GET", "wado": "WADO-RS"}[method]
    assert any(f"instances by {label}" in ln for ln in lines)
    scrape = metrics.exposition().decode()
    assert f'prognode_sweep_series_retrieved_total{{method="{method}"}} {float(N_STUDIES)}' in scrape
    # DIMSE: one association per C-FIND (studies, then the series of each study), one per retrieval
    out_assocs = 0 if method == "wado" else 2 * N_STUDIES + 1
    assert _counter(scrape, 'prognode_associations_total{direction="out",outcome="accepted"}') == out_assocs
    if method == "move":  # the sub-operations came in to the running node's own SCP, no receiver of the sweep
        assert node is not None
        node_scrape = node.ops.metrics.exposition().decode()
        assert _counter(node_scrape, 'prognode_associations_total{direction="in",outcome="accepted"}') == N_STUDIES
        assert _counter(scrape, 'prognode_associations_total{direction="in",outcome="accepted"}') == 0
    else:  # C-GET and WADO-RS store through this process's store path
        assert f"prognode_instances_received_total {float(N_STUDIES * SLICES)}" in scrape
    records = AuditLog(cfg.path(cfg.logging.audit_file)).read()
    events = [r["event"] for r in records if r["event"] not in ("node_started", "node_stopped")]
    assert events.count("retrieve") == N_STUDIES and "query" in events and events[-1] == "sweep"
    assert events.count("instance_stored") == N_STUDIES * SLICES  # the node's store handler, every instance

    # same range again: the ledger has every series with its content, nothing is retrieved
    _cfg2, db2, out2, _lines2, _m = _run(cfg_path)
    assert out2.sweep_id != out.sweep_id
    assert (out2.retrieved, out2.skipped, out2.state) == (0, N_STUDIES, "done")
    assert all(item["reason"] == "present" for item in out2.items)
    assert _instances(db2) == N_STUDIES * SLICES


@pytest.mark.parametrize("method", ["get", "wado"])
def test_retrieved_instances_meet_the_nodes_caps(tmp_path: Path, source_pacs: Orthanc, method: str) -> None:
    """What C-GET and WADO-RS bring back passes the SCP's door: over [node].max_dataset_bytes is refused
    (Out of Resources, named), so the series fail and nothing is stored."""
    cfg_path = write_config(tmp_path, source_pacs, method)
    cfg_path.write_text(cfg_path.read_text().replace("fsync = false", "fsync = false\nmax_dataset_bytes = 1024"))
    cfg, db, out, lines, _m = _run(cfg_path)
    assert (out.retrieved, out.failed) == (0, N_STUDIES), lines
    assert _instances(db) == 0
    refused = [r for r in AuditLog(cfg.path(cfg.logging.audit_file)).read() if r["event"] == "instance_refused"]
    assert refused and all(r["status"] == "0xA700" and "max_dataset_bytes" in r["reason"] for r in refused)


def test_move_without_the_node_running_says_so(tmp_path: Path, source_pacs: Orthanc) -> None:
    """No temporary receiver: a C-MOVE sweep with nothing at the node's address stops with the reason
    (resumable once the node runs)."""
    cfg_path = write_config(tmp_path, source_pacs, "move")
    with pytest.raises(SweepError, match="nothing listens there: start `prognode serve`"):
        _run(cfg_path)
    cfg = config_mod.load(cfg_path)
    db = open_database(cfg)
    with db.session() as s:
        (sweep,) = s.scalars(select(Sweep)).all()
        assert sweep.state == "failed"
    with serving(cfg_path, "move"):
        out = run_sweep(cfg, db, FIRST, FIRST + dt.timedelta(days=10))
    assert (out.sweep_id, out.resumed, out.retrieved, out.state) == (sweep.id, True, N_STUDIES, "done")


def test_dry_run_cli_retrieves_nothing(tmp_path: Path, source_pacs: Orthanc) -> None:
    cfg_path = write_config(tmp_path, source_pacs)
    r = subprocess.run([sys.executable, "-m", "node", "sweep", "--config", str(cfg_path),
                        "--from", FIRST.isoformat(), "--to", (FIRST + dt.timedelta(days=10)).isoformat(),
                        "--dry-run", "--json"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert (summary["planned"], summary["retrieved"], summary["dry_run"]) == (N_STUDIES, 0, True)
    assert "found 6 studies, 6 series" in r.stdout
    db = open_database(config_mod.load(cfg_path))
    assert _instances(db) == 0


@pytest.mark.slow
def test_killed_sweep_resumes(tmp_path: Path, source_pacs: Orthanc) -> None:
    cfg_path = write_config(tmp_path, source_pacs, extra="pause_seconds = 0.6\n")
    cfg_path.write_text(cfg_path.read_text().replace("max_concurrent = 2", "max_concurrent = 1"))
    cfg = config_mod.load(cfg_path)
    args = [sys.executable, "-m", "node", "sweep", "--config", str(cfg_path), "--from", FIRST.isoformat(),
            "--to", (FIRST + dt.timedelta(days=10)).isoformat(), "--json"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    node = service.Node(cfg).start()  # C-MOVE delivers to the node's SCP
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    dbfile = cfg.storage_dir / "prognode.db"

    def retrieved() -> int:
        if not dbfile.exists():
            return 0
        try:
            with sqlite3.connect(dbfile, timeout=5) as c:
                return int(c.execute("select count(*) from sweep_items where state='retrieved'").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    try:
        wait_until(lambda: retrieved() >= 2, timeout=60, what="two series retrieved")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    done_before = retrieved()
    assert done_before < N_STUDIES
    try:
        r = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    finally:
        node.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert summary["resumed"] is True and summary["sweep_id"] == 1
    assert summary["already_done"] == done_before
    assert summary["already_done"] + summary["retrieved"] + summary["skipped"] == N_STUDIES, r.stdout
    assert "resuming" in r.stdout
    db = Database(cfg.database_url)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Sweep)) == 1
        states = {i.state for i in s.scalars(select(SweepItem))}
    assert states <= {"retrieved", "skipped"}
    assert _instances(db) == N_STUDIES * SLICES


@pytest.mark.parametrize("method", ["get", "wado"])
def test_allowed_hours_stop_then_resume(tmp_path: Path, source_pacs: Orthanc, method: str) -> None:
    cfg_path = write_config(tmp_path, source_pacs, method, extra="allowed_hours = [20, 6]\n")
    _cfg, db, out, _lines, _m = _run(cfg_path, hour=12)
    assert out.state == "interrupted" and "allowed hours" in out.stopped_reason
    assert out.retrieved == 0 and _instances(db) == 0
    _cfg, db, out2, _lines, _m = _run(cfg_path, hour=23)  # inside the night window: resumes the same sweep
    assert out2.sweep_id == out.sweep_id and out2.resumed and out2.state == "done"
    assert out2.retrieved == N_STUDIES and _instances(db) == N_STUDIES * SLICES


def test_scheduler_restart_keeps_one_job(tmp_path: Path) -> None:
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text('[node]\nstorage = "var"\n[sweep]\ncron = "30 2 * * *"\n')
    cfg = config_mod.load(cfg_path)
    cfg.storage_dir.mkdir(parents=True)
    db = Database(cfg.database_url)
    for _restart in range(2):
        sched = start_scheduler(cfg, db)
        job = sched.get_job(SCHEDULER_JOB_ID)
        assert job is not None and job.next_run_time.hour == 2 and job.next_run_time.minute == 30
        assert job.max_instances == 1 and job.coalesce
        sched.shutdown(wait=False)
    with sqlite3.connect(cfg.storage_dir / "prognode.db") as c:
        rows = c.execute("select id from apscheduler_jobs").fetchall()
    assert rows == [(SCHEDULER_JOB_ID,)]



def test_failed_series_is_retried_once(tmp_path: Path, source_pacs: Orthanc) -> None:
    """A series whose first retrieval fails (here: the store refuses one instance) is retried and completes."""
    cfg_path = write_config(tmp_path, source_pacs, "get")
    cfg = config_mod.load(cfg_path)
    db = open_database(cfg)
    store = default_store_handler(cfg, db)
    refused: list[str] = []

    def flaky(event: object) -> object:
        if not refused:
            refused.append("once")
            return 0xA700  # Out of Resources for the very first instance
        return store(event)

    lines: list[str] = []
    out = Sweeper(cfg, db, flaky, progress=lines.append).run(FIRST, FIRST + dt.timedelta(days=10))
    assert refused == ["once"]
    assert (out.retrieved, out.failed, out.state) == (N_STUDIES, 0, "done"), lines
    assert [i["state"] for i in out.items].count("retry") == 1
    assert _instances(db) == N_STUDIES * SLICES


def test_scheduled_job_runs_a_sweep(tmp_path: Path, source_pacs: Orthanc) -> None:
    """The function the cron job calls sweeps the lookback window from a serialised config."""
    from node.sweep import scheduled_sweep

    lookback = (dt.date.today() - FIRST).days + 1
    cfg_path = write_config(tmp_path, source_pacs, "get", extra=f"enabled = true\nlookback_days = {lookback}\n")
    cfg = config_mod.load(cfg_path)
    scheduled_sweep(cfg.model_dump_json())
    db = open_database(cfg)
    with db.session() as s:
        (sweep,) = s.scalars(select(Sweep)).all()
        assert sweep.state == "done" and sweep.report["retrieved"] == N_STUDIES + 1  # the late study too
    assert _instances(db) == N_STUDIES * SLICES + 2


def test_find_checks_series_answers_against_the_study(tmp_path: Path, source_pacs: Orthanc,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Each C-FIND has its own association; a study with fewer series answers than it announces is asked again.

    pynetdicom 3.0.4 can drop a C-FIND response when requests follow each other on one association
    (the sweep then silently missed a series); here a study announcing more series than the PACS
    holds stands in for the lost answer, deterministically.
    """
    cfg_path = write_config(tmp_path, source_pacs, "get")
    cfg = config_mod.load(cfg_path)
    db = open_database(cfg)
    metrics = Metrics(db)
    sweeper = Sweeper(cfg, db, default_store_handler(cfg, db), metrics)
    src = sweeper.source_config()
    d_from, d_to = FIRST.strftime("%Y%m%d"), (FIRST + dt.timedelta(days=10)).strftime("%Y%m%d")
    n_studies, found = sweeper.find(src, d_from, d_to)
    assert (n_studies, len(found)) == (N_STUDIES, N_STUDIES)
    assert all(r.modality == "CT" and r.instances == SLICES for r in found)

    def out_associations() -> float:
        for line in metrics.exposition().decode().splitlines():
            if line.startswith('prognode_associations_total{direction="out",outcome="accepted"}'):
                return float(line.split()[-1])
        return 0.0

    assert out_associations() == N_STUDIES + 1  # the STUDY query, then one SERIES query per study
    study = found[0].study_uid
    with caplog.at_level("WARNING", logger="node.sweep"):  # the package's loggers (node.sweep.plan)
        again = sweeper.find_series(src, study, announced=2, attempts=3)
    assert [r.series_uid for r in again] == [found[0].series_uid]
    assert out_associations() == N_STUDIES + 1 + 3
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("node.sweep")]
    assert len(warnings) == 3 and all(f"study {study}: 1 of 2 series" in w for w in warnings), warnings
    assert "going on with those" in warnings[-1]
    # the announced count met: one query, no warning
    caplog.clear()
    assert len(sweeper.find_series(src, study, announced=1)) == 1
    assert out_associations() == N_STUDIES + 1 + 3 + 1 and not caplog.records


def test_dicomweb_source_config_and_session(tmp_path: Path) -> None:
    """kind = "dicomweb": the union's default stays dimse; auth from files (Bearer or Basic), never both, through
    the session every DICOMweb peer gets (node.transports.dicomweb.peer_session); https implies TLS, as for a
    DICOMweb destination (the issue's ``[sources.tls] ca_certificates = ...`` without ``enabled``)."""
    import requests

    from node.sweep.dicomweb import DicomwebError, client
    from node.transports.dicomweb import peer_session

    (tmp_path / "vna.token").write_text("s3cret-token\n")
    (tmp_path / "vna.pw").write_text("pw\n")
    base = '[[sources]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n' \
           '[[sources]]\nname = "vna"\nkind = "dicomweb"\nurl = "http://127.0.0.1:8042/dicom-web/"\n'

    def load(extra: str, url: str = "") -> config_mod.Config:
        text = base.replace("http://127.0.0.1:8042/dicom-web/", url) if url else base
        (tmp_path / "c.toml").write_text(text + extra)
        return config_mod.load(tmp_path / "c.toml", environ={})

    def authorization(cfg: config_mod.Config) -> str:
        src = cfg.sources[1]
        assert isinstance(src, config_mod.DicomwebSourceConfig)
        with peer_session(src, cfg.base_dir, "sources 'vna'") as s:
            assert s.trust_env is False  # no proxy or .netrc credentials from the environment
            return str(s.prepare_request(requests.Request("GET", src.url)).headers["Authorization"])

    cfg = load('token_file = "vna.token"\n')
    pacs, vna = cfg.sources
    assert pacs.kind == "dimse" and vna.kind == "dicomweb" and vna.url == "http://127.0.0.1:8042/dicom-web"
    assert authorization(cfg) == "Bearer s3cret-token"
    assert authorization(load('username = "node"\npassword_file = "vna.pw"\n')) == "Basic bm9kZTpwdw=="  # node:pw
    # an unreadable credential file: the key named, never a secret, a DicomwebError for the sweep
    with pytest.raises(DicomwebError, match=r"sources 'vna'\.token_file: cannot read"):
        client(load('token_file = "missing.token"\n').sources[1], tmp_path)  # type: ignore[arg-type]
    # https: the example, a CA bundle by its other name and no enabled, is a TLS source
    https = load('[sources.tls]\nca_certificates = "ca.pem"\n', url="https://vna.example.org/dicom-web")
    assert https.sources[1].uses_tls and https.sources[1].tls.ca_bundle == Path("ca.pem")  # type: ignore[union-attr]
    for bad, message in (('token_file = "vna.token"\nusername = "u"\npassword_file = "vna.pw"\n', "not both"),
                         ('username = "u"\n', "password_file"),
                         ("[sources.tls]\nenabled = true\nuse_system_store = true\n", "https"),
                         ('kind2 = "x"\n', "kind2")):
        with pytest.raises(config_mod.ConfigError, match=message):
            load(bad)
    with pytest.raises(config_mod.ConfigError, match=r"sources\[1\]\.tls: ca_bundle is required for an https url"):
        load("", url="https://vna.example.org/dicom-web")
    (tmp_path / "c.toml").write_text(base.replace('kind = "dicomweb"', 'kind = "web"'))
    with pytest.raises(config_mod.ConfigError, match=r"sources\[1\]\.kind: 'dimse' \(the default\) or 'dicomweb'"):
        config_mod.load(tmp_path / "c.toml", environ={})


@pytest.mark.parametrize("method", ["get", "wado"])
def test_series_in_flight_while_retrieved(tmp_path: Path, source_pacs: Orthanc, method: str) -> None:
    """While C-GET or WADO-RS stores a series in this process, it is busy for completion (node.service passes
    in_flight() on), as a series an open association is delivering; afterwards nothing is."""
    from node.sweep.retrieve import in_flight

    cfg_path = write_config(tmp_path, source_pacs, method)
    cfg = config_mod.load(cfg_path)
    db = open_database(cfg)
    store = default_store_handler(cfg, db)
    seen: list[set[str]] = []

    def watching(event: object) -> object:
        seen.append(in_flight())
        return store(event)

    out = Sweeper(cfg, db, watching).run(FIRST, FIRST + dt.timedelta(days=10))
    assert out.retrieved == N_STUDIES and len(seen) == N_STUDIES * SLICES
    assert all(len(busy) in (1, 2) for busy in seen)  # max_concurrent = 2
    assert in_flight() == set()


class _StubHandler(http.server.BaseHTTPRequestHandler):
    """Base of the DICOMweb stubs below: HTTP/1.1 (keep-alive, as a PACS answers), no request log."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def _http_stub(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """A threading HTTP server with ``handler`` on 127.0.0.1 (a free port, yielded), stopped on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def test_qido_rs_json_answer_is_capped_in_bytes_and_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A QIDO-RS answer is read with a cap (node.transports.dicomweb.JSON_MAX_BYTES) and a deadline
    (JSON_READ_TIMEOUTS x the source's timeout): an endless JSON body is cut off while it arrives, a declared
    oversize body is refused before it is read, a peer trickling bytes just inside the read timeout is cut off
    at the deadline, and an answer within both comes out as sent."""
    import time

    import node.transports.dicomweb as dw
    from node.config import DicomwebSourceConfig
    from node.sweep.dicomweb import DicomwebError, client, search_studies

    monkeypatch.setattr(dw, "JSON_MAX_BYTES", 256 << 10)
    mode = {"kind": "endless"}
    match = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}

    class Handler(_StubHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            try:
                if mode["kind"] == "declared":
                    self.send_header("Content-Length", str(1 << 30))
                    self.end_headers()
                    return
                if mode["kind"] == "small":
                    body = json.dumps([match]).encode()
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(b"[")
                if mode["kind"] == "endless":
                    for _ in range(256):  # 16 MiB of one never-ending match list
                        self.wfile.write(b" " * (64 << 10))
                else:  # trickle: a byte every 0.3 s, inside the 1 s read timeout, for 12 s
                    for _ in range(40):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                        time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                pass

    with _http_stub(Handler) as port:
        src = DicomwebSourceConfig(kind="dicomweb", name="web", url=f"http://127.0.0.1:{port}/dicom-web",
                                   timeout_seconds=1)
        c = client(src, tmp_path)
        with pytest.raises(DicomwebError, match="passed the cap of 262144 bytes"):
            search_studies(c, src, {})
        mode["kind"] = "declared"
        with pytest.raises(DicomwebError, match="declares 1073741824 bytes"):
            search_studies(c, src, {})
        mode["kind"] = "trickle"
        t0 = time.monotonic()
        with pytest.raises(DicomwebError, match="took over 4 s"):
            search_studies(c, src, {})
        assert time.monotonic() - t0 < 9.0  # cut at the deadline, not when the peer stops
        mode["kind"] = "small"
        assert [d.StudyInstanceUID for d in search_studies(c, src, {})] == ["1.2.3"]


def test_wado_rs_part_over_the_cap_is_stopped_while_it_arrives(tmp_path: Path) -> None:
    """A WADO-RS answer is read part by part with at most node.max_dataset_bytes (+ MIME headers) of one part
    in memory: a part that never ends is cut off while it arrives, an answer without a multipart boundary is
    refused before its body is read, and parts within the cap come out as sent."""

    from node.config import DicomwebSourceConfig
    from node.sweep.dicomweb import PART_OVERHEAD_BYTES, DicomwebError, client, retrieve_series

    cap = 256 << 10
    mode = {"kind": "endless"}

    class Handler(_StubHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            if mode["kind"] == "no-boundary":
                self.send_header("Content-Type", "application/dicom")
                self.send_header("Content-Length", str(8 * cap))
                self.end_headers()
                return
            self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=B')
            self.send_header("Connection", "close")
            self.end_headers()
            head = b"\r\n--B\r\nContent-Type: application/dicom\r\n\r\n"
            try:
                if mode["kind"] == "small":
                    self.wfile.write(head + b"A" * 1000 + head + b"C" * 2000 + b"\r\n--B--\r\n")
                    return
                self.wfile.write(head)
                for _ in range(64):  # 4 MiB of one part, no closing boundary
                    self.wfile.write(b"x" * (64 << 10))
            except (BrokenPipeError, ConnectionResetError):
                pass

    with _http_stub(Handler) as port:
        src = DicomwebSourceConfig(kind="dicomweb", name="web", url=f"http://127.0.0.1:{port}/dicom-web",
                                   timeout_seconds=10)
        c = client(src, tmp_path)
        with pytest.raises(DicomwebError, match="transfer stopped"):
            list(retrieve_series(c, src, "1.2", "1.2.3", cap))
        # (without the cap the decoder would buffer all 4 MiB and hand it over as one part at the end)
        mode["kind"] = "no-boundary"
        with pytest.raises(DicomwebError, match="boundary"):
            list(retrieve_series(c, src, "1.2", "1.2.3", cap))
        mode["kind"] = "small"
        assert [len(p) for p in retrieve_series(c, src, "1.2", "1.2.3", cap)] == [1000, 2000]
        assert PART_OVERHEAD_BYTES < cap
