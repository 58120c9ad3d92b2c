"""Dashboard in a real headless Chromium, the REST API with its token rule, and /metrics."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from node import config as config_mod
from node.audit import AuditLog
from node.config import Config
from node.db import Database, Export, Job, Result, Series, Sweep, SweepItem
from node.metrics import Metrics
from node.web import create_app, serve_web
from tests.conftest import need
from tests.peers import REPO

TOKEN = "s3cret-token"
T0 = float(int(time.time()) - 3600)


def make_config(tmp: Path, token: str = TOKEN) -> Config:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "config.toml"
    cfg.write_text(f'[node]\nstorage = "var"\n[web]\nport = 0\ntoken = "{token}"\n')
    c = config_mod.load(cfg)
    c.storage_dir.mkdir(parents=True, exist_ok=True)
    return c


def populate(db: Database) -> None:
    with db.session() as s:
        for i, state in enumerate(("complete", "complete", "receiving")):
            s.add(Series(series_uid=f"1.2.3.{i}", study_uid="1.2.3", patient_id=f"P{i}", modality="CT",
                         description=f"Abdomen {i}", instances=120 + i, state=state, first_received=T0,
                         last_received=T0 + 10 * i, completed_at=T0 + 10 * i + 1.2 if state == "complete" else None,
                         completion_reason="geometry" if state == "complete" else "", source="CTSCANNER"))
        jobs = [Job(id=1, series_uid="1.2.3.0", study_uid="1.2.3", route="ct", pipeline="tissue-hu",
                    input_key="k1", state="done", attempts=1, created_at=T0 + 2, updated_at=T0 + 9,
                    started_at=T0 + 2, finished_at=T0 + 6.5, last_image_at=T0),
                Job(id=2, series_uid="1.2.3.1", study_uid="1.2.3", route="ct", pipeline="tissue-hu",
                    input_key="k2", state="dead", attempts=3, error="StageError: body mask empty",
                    created_at=T0 + 12, updated_at=T0 + 20, last_image_at=T0 + 10),
                Job(id=3, series_uid="1.2.3.0", study_uid="1.2.3", route="ct", pipeline="radiomics",
                    input_key="k3", state="done", attempts=1, created_at=T0 + 3, updated_at=T0 + 9,
                    started_at=T0 + 3, finished_at=T0 + 8, last_image_at=T0),
                Job(id=4, series_uid="1.2.3.2", study_uid="1.2.3", route="ct", pipeline="tissue-hu",
                    input_key="k4", state="pending", created_at=T0 + 30, updated_at=T0 + 30)]
        s.add_all(jobs)
        s.flush()
        s.add(Export(job_id=1, destination="pacs", path="r/seg.dcm", sop_instance_uid="9.1", state="sent", attempts=1,
                     sent_at=T0 + 7.9))
        s.add(Export(job_id=1, destination="pacs", path="r/sr.dcm", sop_instance_uid="9.2", state="sent", attempts=2,
                     sent_at=T0 + 8.1))
        s.add(Export(job_id=3, destination="archive", path="r/sr3.dcm", sop_instance_uid="9.3", state="dead",
                     attempts=10, last_error="association rejected by ARCHIVE"))
        s.add(Result(sop_instance_uid="9.1", job_id=1, series_uid="9.0", source_series_uid="1.2.3.0",
                      study_uid="1.2.3", modality="SEG", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                      pipeline="tissue-hu", created_at=T0 + 6.5, in_pacs_at=T0 + 7.9))
        s.add(Result(sop_instance_uid="9.2", job_id=1, series_uid="9.00", source_series_uid="1.2.3.0",
                     study_uid="1.2.3", modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                     pipeline="tissue-hu", created_at=T0 + 6.5, in_pacs_at=T0 + 8.1))
        s.add(Sweep(id=1, source="pacs", date_from="20260301", date_to="20260310", state="done", started_at=T0,
                    finished_at=T0 + 40, report={"studies": 24, "retrieved": 20, "skipped": 4, "failed": 0,
                                                 "item_states": {"retrieved": 20, "skipped": 4}}))
        s.flush()
        s.add(SweepItem(sweep_id=1, study_uid="1.2.3", series_uid="1.2.3.0", instances=120, state="retrieved"))


@pytest.fixture
def node_db(tmp_path: Path) -> Iterator[tuple[Config, Database]]:
    cfg = make_config(tmp_path)
    db = Database(cfg.database_url)
    populate(db)
    yield cfg, db
    db.dispose()


def test_rest_api_reads_and_openapi(node_db: tuple[Config, Database]) -> None:
    cfg, db = node_db
    client = TestClient(create_app(cfg, db, Metrics(db)))
    spec = client.get("/openapi.json").json()
    for path in ("/api/series", "/api/jobs", "/api/jobs/{job_id}", "/api/results", "/api/sweeps",
                 "/api/dead-letters", "/api/jobs/{job_id}/resend"):
        assert path in spec["paths"], path
    assert [s["series_uid"] for s in client.get("/api/series").json()] == ["1.2.3.2", "1.2.3.1", "1.2.3.0"]
    assert [j["id"] for j in client.get("/api/jobs", params={"state": "done"}).json()] == [3, 1]
    assert client.get("/api/jobs/99").status_code == 404
    results = {r["sop_instance_uid"]: r for r in client.get("/api/results").json()}
    assert results["9.1"]["seconds_to_pacs"] == pytest.approx(7.9)
    dead = client.get("/api/dead-letters").json()
    assert {(d["kind"], d["job_id"]) for d in dead} == {("job", 2), ("export", 3)}
    sweeps = client.get("/api/sweeps").json()
    assert sweeps[0]["retrieved"] == 20 and sweeps[0]["item_states"] == {"retrieved": 20, "skipped": 4}


def test_resend_needs_token(node_db: tuple[Config, Database], tmp_path: Path) -> None:
    cfg, db = node_db
    audit = AuditLog(tmp_path / "audit.jsonl")
    client = TestClient(create_app(cfg, db, Metrics(db), audit))
    assert client.post("/api/jobs/2/resend").status_code == 401
    assert client.post("/api/jobs/2/resend", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = client.post("/api/jobs/2/resend", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json() == {"job_id": 2, "job_requeued": True, "exports_requeued": 0}
    assert client.get("/api/jobs/2").json()["state"] == "pending"
    again = client.post("/api/jobs/2/resend", headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.status_code == 409
    # the dashboard's form: a done job with a dead export
    r = client.post("/ui/jobs/3/resend", content=f"token={TOKEN}",
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 303 and "1+exports+requeued" in r.headers["location"]
    assert client.get("/api/dead-letters").json() == []
    assert [e["event"] for e in audit.read()] == ["resend", "resend"]
    # empty token in config: every write refused with 403
    cfg_off = make_config(tmp_path / "off", token="")
    client_off = TestClient(create_app(cfg_off, db, Metrics(db)))
    assert client_off.post("/api/jobs/1/resend", headers={"Authorization": "Bearer "}).status_code == 403
    assert client_off.post("/ui/jobs/1/resend", content="token=").status_code == 403


def test_resend_is_one_behaviour_for_cli_and_api(node_db: tuple[Config, Database], tmp_path: Path) -> None:
    """node.jobs.resend_job: a done job's results go again to every destination (sent ones too);
    a pending job has nothing to resend; the CLI and the API answer the same."""
    from node.jobs import NothingToResend, resend_job

    cfg, db = node_db
    audit = AuditLog(tmp_path / "audit.jsonl")
    out = resend_job(db, 1, audit, by="cli")
    assert (out.job_requeued, out.exports_requeued) == (False, 2)
    with db.session() as s:
        assert {e.state for e in s.query(Export).filter(Export.job_id == 1)} == {"pending"}
    with pytest.raises(NothingToResend):
        resend_job(db, 4, audit, by="cli")
    with pytest.raises(KeyError):
        resend_job(db, 99, audit, by="cli")
    client = TestClient(create_app(cfg, db, Metrics(db), audit))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/api/jobs/4/resend", headers=auth).status_code == 409
    assert client.post("/api/jobs/99/resend", headers=auth).status_code == 404
    assert [(e["event"], e["by"]) for e in audit.read()] == [("resend", "cli")]


def test_metrics_scrape(node_db: tuple[Config, Database]) -> None:
    cfg, db = node_db
    metrics = Metrics(db)
    metrics.record_instance(1000)
    metrics.record_instance(500)
    metrics.record_association("in", "accepted")
    text = TestClient(create_app(cfg, db, metrics)).get("/metrics").text
    expected = [
        "prognode_instances_received_total 2.0",
        "prognode_bytes_received_total 1500.0",
        'prognode_associations_total{direction="in",outcome="accepted"} 1.0',
        "prognode_series_completed_total 2.0",
        'prognode_jobs{state="dead"} 1.0',
        'prognode_jobs{state="done"} 2.0',
        "prognode_queue_depth 1.0",
        "prognode_export_attempts_total 13.0",
        "prognode_export_failures_total 11.0",
        'prognode_exports{state="dead"} 1.0',
        'prognode_pipeline_seconds_bucket{le="5"} 2.0',
        "prognode_pipeline_seconds_count 2.0",
        'prognode_time_to_result_seconds_bucket{le="10"} 1.0',
        "prognode_time_to_result_seconds_sum 7.9",
        'prognode_completion_latency_seconds_bucket{le="2"} 2.0',
    ]
    for line in expected:
        assert line in text, line
    saved = REPO / "test-output"
    saved.mkdir(exist_ok=True)
    (saved / "metrics-sample.txt").write_text(text)


def _chromium(url: str, out: Path, dom: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="prognode-chromium-") as profile:
        args = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1280,900"]
        args += ["--dump-dom"] if dom else [f"--screenshot={out}"]
        r = subprocess.run(args + [url], capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.browser
def test_dashboard_in_chromium(node_db: tuple[Config, Database], tmp_path: Path) -> None:
    need("chromium")
    cfg, db = node_db
    server = serve_web(cfg, db, Metrics(db), port=0)
    try:
        assert server.config.host == "127.0.0.1"
        dom = _chromium(server.url + "/", tmp_path / "unused.png", dom=True)
        for text in ("Series (3)", "Jobs (4)", "Dead letters (2)", "Recent results (2)", "Sweeps (1)",
                     "StageError: body mask empty", "association rejected by ARCHIVE", "7.9 s", "20260301-20260310"):
            assert text in dom, text
        assert dom.count('type="submit"') == 2 and 'action="/ui/jobs/2/resend"' in dom
        shot = tmp_path / "dashboard.png"
        _chromium(server.url + "/", shot, dom=False)
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # resend through the form, then the page shows the message and one dead letter fewer
        r = httpx.post(server.url + "/ui/jobs/2/resend", data={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303
        after = tmp_path / "dashboard-after-resend.png"
        location = server.url + r.headers["location"]
        dom2 = _chromium(location, after, dom=True)
        assert "job 2: requeued" in dom2 and "Dead letters (1)" in dom2
        _chromium(location, after, dom=False)
        saved = REPO / "test-output"
        saved.mkdir(exist_ok=True)
        for f in (shot, after):
            shutil.copy(f, saved / f.name)
        scrape = httpx.get(server.url + "/metrics")
        assert scrape.status_code == 200 and 'prognode_jobs{state="pending"} 2.0' in scrape.text
    finally:
        server.stop()


def test_operations_start_web_and_schedule(tmp_path: Path) -> None:
    from node.ops import Operations
    from node.sweep import SCHEDULER_JOB_ID

    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text('[node]\nstorage = "var"\n[[sources]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
                        'port = 4242\n[sweep]\nenabled = true\nsource = "pacs"\n[web]\nport = 0\n')
    cfg = config_mod.load(cfg_file)
    cfg.storage_dir.mkdir()
    db = Database(cfg.database_url)
    ops = Operations(cfg, db, AuditLog(tmp_path / "audit.jsonl")).start()
    try:
        assert ops.web is not None and ops.scheduler is not None
        assert httpx.get(ops.web.url + "/healthz").json() == {"status": "ok", "ae_title": "PROGNODE"}
        assert ops.scheduler.get_job(SCHEDULER_JOB_ID) is not None
        assert "prognode_queue_depth 0.0" in httpx.get(ops.web.url + "/metrics").text
    finally:
        ops.stop()
        db.dispose()


@pytest.mark.slow
def test_node_serve_runs_web_and_counts_scp_events(tmp_path: Path) -> None:
    """`prognode serve` starts the dashboard beside the SCP; /metrics counts what the SCP received."""
    import datetime as dt
    import os

    from tests.peers import free_port, stop_pid, storescu, wait_port, wait_until
    from tests.synthetic_ct import write_study

    need("storescu")
    dicom_port, web_port = free_port(), free_port()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\nport = {dicom_port}\nstorage = "var"\nfsync = false\n'
                   f'[web]\nport = {web_port}\ntoken = "{TOKEN}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(cfg)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(dicom_port, 60)
        wait_port(web_port, 60)
        study = write_study(tmp_path / "dcm", 7, dt.date(2026, 3, 2), slices=3)
        storescu(dicom_port, list(study.files))
        url = f"http://127.0.0.1:{web_port}"
        series = wait_until(lambda: httpx.get(url + "/api/series").json(), 30, what="series listed")
        assert series[0]["series_uid"] == study.series_uids[0] and series[0]["instances"] == 3
        text = httpx.get(url + "/metrics").text
        assert "prognode_instances_received_total 3.0" in text
        assert 'prognode_associations_total{direction="in",outcome="accepted"} 1.0' in text
        assert "prognode_instances_stored 3.0" in text
        saved = REPO / "test-output"
        saved.mkdir(exist_ok=True)
        (saved / "metrics-node-serve.txt").write_text(text)
    finally:
        stop_pid(proc)
