"""Dashboard in a real headless Chromium (signed in through its form), the REST API with its read and
write tokens, the sign-in cookie and CSRF rules, and /healthz and /metrics (open, without PHI)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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

TOKEN = "s3cret-write-token-0123"
READ_TOKEN = "s3cret-read-token-4567"
WRITE = {"Authorization": f"Bearer {TOKEN}"}
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
T0 = float(int(time.time()) - 3600)
# what populate() writes that identifies a patient or a series: never served without a token
PHI = ("P0", "P1", "P2", "Abdomen 0", "Abdomen 1", "1.2.3.0", "1.2.3.1", "CTSCANNER")


def make_config(tmp: Path, token: str = TOKEN, read_token: str = READ_TOKEN, extra: str = "") -> Config:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "config.toml"
    cfg.write_text(f'[node]\nstorage = "var"\n[web]\nport = 0\ntoken = "{token}"\nread_token = "{read_token}"\n'
                   + extra)
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
def node_db(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Config, Database]]:
    """The populated node database: SQLite, or PostgreSQL where a test asks (indirect ``"postgresql"``)."""
    cfg = make_config(tmp_path)
    if getattr(request, "param", "sqlite") == "postgresql":
        cfg = cfg.model_copy(update={"node": cfg.node.model_copy(
            update={"database": request.getfixturevalue("pg_server").create_database()})})
    db = Database(cfg.database_url)
    populate(db)
    yield cfg, db
    db.dispose()


@pytest.mark.parametrize("node_db", ["sqlite", "postgresql"], indirect=True)
def test_rest_api_reads_and_openapi(node_db: tuple[Config, Database]) -> None:
    cfg, db = node_db
    client = TestClient(create_app(cfg, db, Metrics(db)), headers=READ)
    spec = client.get("/openapi.json").json()
    for path in ("/api/series", "/api/jobs", "/api/jobs/{job_id}", "/api/results", "/api/sweeps",
                 "/api/dead-letters", "/api/jobs/{job_id}/resend"):
        assert path in spec["paths"], path
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
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
    assert client.post("/api/jobs/2/resend", headers=READ).status_code == 403  # the read token cannot write
    ok = client.post("/api/jobs/2/resend", headers=WRITE)
    assert ok.status_code == 200 and ok.json() == {"job_id": 2, "job_requeued": True, "exports_requeued": 0}
    assert client.get("/api/jobs/2", headers=WRITE).json()["state"] == "pending"  # the write token reads
    again = client.post("/api/jobs/2/resend", headers=WRITE)
    assert again.status_code == 409
    # the dashboard's form: a write session, same origin, its CSRF field; a done job with a dead export
    csrf = _signin(client, TOKEN)
    r = client.post("/ui/jobs/3/resend", data={"csrf": csrf}, headers={"Origin": "http://testserver"},
                    follow_redirects=False)
    assert r.status_code == 303 and "1+exports+requeued" in r.headers["location"]
    assert client.get("/api/dead-letters").json() == []  # the session cookie reads the API too
    assert [e["event"] for e in audit.read()] == ["resend", "web_signin", "resend"]
    # empty tokens in config: every read and write refused with 403
    cfg_off = make_config(tmp_path / "off", token="", read_token="")
    client_off = TestClient(create_app(cfg_off, db, Metrics(db)))
    assert client_off.post("/api/jobs/1/resend", headers={"Authorization": "Bearer "}).status_code == 403
    assert client_off.post("/ui/jobs/1/resend", content="token=").status_code == 403
    # a read token only: reads work, writes are disabled
    cfg_ro = make_config(tmp_path / "ro", token="")
    client_ro = TestClient(create_app(cfg_ro, db, Metrics(db)))
    assert client_ro.get("/api/jobs/1", headers=READ).status_code == 200
    refused = client_ro.post("/api/jobs/1/resend", headers=READ)
    assert refused.status_code == 403 and "disabled" in refused.json()["detail"]


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
    client = TestClient(create_app(cfg, db, Metrics(db), audit), headers=WRITE)
    assert client.post("/api/jobs/4/resend").status_code == 409
    assert client.post("/api/jobs/99/resend").status_code == 404
    assert [(e["event"], e["by"]) for e in audit.read()] == [("resend", "cli")]


@pytest.mark.parametrize("node_db", ["sqlite", "postgresql"], indirect=True)
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


def _signin(client: TestClient, token: str) -> str:
    """Sign ``client`` in through the form; the CSRF field of its dashboard forms."""
    r = client.post("/signin", data={"token": token, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/", r.text
    page = client.get("/").text
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m is not None
    return m.group(1)


def _no_phi(text: str) -> None:
    for value in PHI:
        assert value not in text, value


def test_anonymous_reader_gets_no_phi(node_db: tuple[Config, Database]) -> None:
    cfg, db = node_db
    client = TestClient(create_app(cfg, db, Metrics(db)))
    for path in ("/api/series", "/api/jobs", "/api/jobs/1", "/api/dead-letters", "/api/results", "/api/sweeps",
                 "/api/series?state=complete", "/api/not-a-route"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        _no_phi(r.text)
        assert client.get(path, cookies={"prognode_session": "v1.write.9999999999.x.y"}).status_code == 401
    for bad in ("Bearer wrong", f"Basic {READ_TOKEN}", f"Bearer {READ_TOKEN}x"):
        r = client.get("/api/series", headers={"Authorization": bad})
        assert r.status_code == 401, bad
        _no_phi(r.text)
    # the dashboard sends a browser to the sign-in page, which shows no PHI
    r = client.get("/?msg=x", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/signin?next=%2F%3Fmsg%3Dx"
    signin = client.get(r.headers["location"])
    assert signin.status_code == 200 and 'name="token"' in signin.text and 'value="/?msg=x"' in signin.text
    _no_phi(signin.text + r.text)
    assert signin.headers["cache-control"] == "no-store" and "frame-ancestors 'none'" in \
        signin.headers["content-security-policy"]
    r = client.post("/ui/jobs/2/resend", data={"csrf": "x"}, follow_redirects=False)
    assert r.status_code == 401
    assert client.get("/api/jobs/2", headers=READ).json()["state"] == "dead"


def test_read_and_write_tokens(node_db: tuple[Config, Database]) -> None:
    cfg, db = node_db
    client = TestClient(create_app(cfg, db, Metrics(db)))
    for headers in (READ, WRITE):
        r = client.get("/api/series", headers=headers)
        assert r.status_code == 200 and {s["patient_id"] for s in r.json()} == {"P0", "P1", "P2"}
        page = client.get("/", headers=headers)
        assert page.status_code == 200 and "Abdomen 0" in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "Resend</button>" not in page.text  # bearer clients get no forms (they need a session)
    assert client.post("/api/jobs/2/resend", headers=READ).status_code == 403
    assert client.get("/api/jobs/2", headers=READ).json()["state"] == "dead"
    assert client.post("/api/jobs/2/resend", headers=WRITE).status_code == 200


def test_no_token_configured_means_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With neither token set nothing with PHI is served (403), but /healthz and /metrics still answer."""
    cfg = make_config(tmp_path, token="", read_token="")
    db = Database(cfg.database_url)
    populate(db)
    try:
        client = TestClient(create_app(cfg, db, Metrics(db)))
        for path in ("/", "/api/series", "/api/jobs/1"):
            r = client.get(path, headers={"Authorization": "Bearer "}, follow_redirects=False)
            assert r.status_code == 403 and "read_token" in r.text, path
            _no_phi(r.text)
        page = client.get("/signin")
        assert 'id="closed"' in page.text and 'name="token"' not in page.text
        assert client.post("/signin", data={"token": ""}).status_code == 403
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
        with caplog.at_level("WARNING", logger="node.web.app"):
            server = serve_web(cfg, db, Metrics(db), port=0)
            server.stop()
        assert "answer 403" in caplog.text
    finally:
        db.dispose()


def test_signin_cookie_csrf_and_signout(node_db: tuple[Config, Database], tmp_path: Path) -> None:
    cfg, db = node_db
    audit = AuditLog(tmp_path / "audit.jsonl")
    client = TestClient(create_app(cfg, db, Metrics(db), audit))
    wrong = client.post("/signin", data={"token": "nope", "next": "/"})
    assert wrong.status_code == 401 and "wrong token" in wrong.text and "prognode_session" not in wrong.headers.get(
        "set-cookie", "")
    _no_phi(wrong.text)
    # the read token: a read session, no write
    r = client.post("/signin", data={"token": READ_TOKEN, "next": "//evil.example/x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # never an open redirect
    cookie = r.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
    assert cookie.startswith("prognode_session=v1.read.") and READ_TOKEN not in cookie
    assert {"httponly", "path", "max-age"} <= attrs and "samesite=strict" in cookie.lower()
    assert "secure" not in attrs  # plain HTTP without [web].secure_cookies
    assert "Abdomen 0" in client.get("/").text and client.get("/api/series").status_code == 200
    page = client.get("/").text
    assert "sign in with the write token to resend" in page and 'id="signout"' in page
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m is not None
    same = {"Origin": "http://testserver"}
    assert client.post("/ui/jobs/2/resend", data={"csrf": m.group(1)}, headers=same).status_code == 403
    assert client.post("/api/jobs/2/resend").status_code == 401  # a cookie never authorizes the API's writes
    # the write token: Resend works only same-origin and with the session's CSRF field
    csrf = _signin(client, TOKEN)
    post = {"follow_redirects": False}
    assert client.post("/ui/jobs/2/resend", data={"csrf": csrf}, **post).status_code == 403  # no Origin
    for origin in ("http://127.0.0.1:3000", "http://evil.example", "null"):
        r = client.post("/ui/jobs/2/resend", data={"csrf": csrf}, headers={"Origin": origin}, **post)
        assert r.status_code == 403, origin
    assert client.post("/ui/jobs/2/resend", data={"csrf": "0" * 64}, headers=same, **post).status_code == 403
    assert client.post("/api/jobs/2/resend").status_code == 401
    assert client.get("/api/jobs/2").json()["state"] == "dead"
    r = client.post("/ui/jobs/2/resend", data={"csrf": csrf}, headers={"Referer": "http://testserver/"}, **post)
    assert r.status_code == 303 and "job+2%3A+requeued" in r.headers["location"]
    # sign out: the cookie is cleared and its value no longer works
    value = client.cookies["prognode_session"]
    out = client.post("/signout", headers=same, **post)
    assert out.status_code == 303 and out.headers["location"].startswith("/signin")
    assert 'prognode_session=""' in out.headers["set-cookie"] or "max-age=0" in out.headers["set-cookie"].lower()
    client.cookies.clear()
    assert client.get("/api/series", cookies={"prognode_session": value}).status_code == 401
    assert client.post("/signin", data={"token": READ_TOKEN}, headers={"Origin": "http://evil.example"},
                       **post).status_code == 403
    events = [(e["event"], e.get("ok"), e.get("access")) for e in audit.read() if e["event"].startswith("web_")]
    assert events == [("web_signin", False, None), ("web_signin", True, "read"), ("web_signin", True, "write"),
                      ("web_signout", None, "write")]
    # Secure: over HTTPS, or with [web].secure_cookies behind a TLS proxy
    tls_client = TestClient(create_app(cfg, db, Metrics(db)), base_url="https://testserver")
    r = tls_client.post("/signin", data={"token": READ_TOKEN}, follow_redirects=False)
    assert "secure" in {a.strip().lower() for a in r.headers["set-cookie"].split(";")}
    cfg_proxy = make_config(tmp_path / "proxy", extra="secure_cookies = true\n")
    r = TestClient(create_app(cfg_proxy, db, Metrics(db))).post("/signin", data={"token": TOKEN},
                                                                 follow_redirects=False)
    assert "secure" in {a.strip().lower() for a in r.headers["set-cookie"].split(";")}


def test_sessions_end_with_their_token_and_expiry(tmp_path: Path) -> None:
    from node.web.auth import Access, WebAuth

    now = [1_000_000.0]
    web = make_config(tmp_path).web
    auth = WebAuth(web, clock=lambda: now[0])
    value, cred = auth.issue(Access.WRITE)
    assert auth.session(value) == cred and auth.csrf_ok(cred, auth.csrf(cred))
    assert auth.session(value.replace(".write.", ".read.")) is None  # the access is signed
    rotated = WebAuth(web.model_copy(update={"token": "another-write-token-000"}), clock=lambda: now[0])
    assert rotated.session(value) is None  # a new token ends the old sessions
    now[0] += web.session_hours * 3600 + 1
    assert auth.session(value) is None
    assert auth.check_token(TOKEN) is Access.WRITE and auth.check_token(READ_TOKEN) is Access.READ
    assert auth.check_token("") is None and WebAuth(web.model_copy(update={"read_token": ""})).check_token("") is None


def test_wrong_tokens_are_throttled(node_db: tuple[Config, Database]) -> None:
    from node.web.auth import MAX_FAILURES

    cfg, db = node_db
    client = TestClient(create_app(cfg, db, Metrics(db)))
    for _ in range(MAX_FAILURES):
        assert client.get("/api/series", headers={"Authorization": "Bearer guess"}).status_code == 401
    blocked = client.get("/api/series", headers=READ)
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    assert client.post("/signin", data={"token": READ_TOKEN}).status_code == 429
    assert client.get("/healthz").status_code == 200


def test_healthz_and_metrics_are_open_without_phi(node_db: tuple[Config, Database]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    cfg, db = node_db
    metrics = Metrics(db)
    metrics.record_instance(1000)
    metrics.record_association("in", "accepted")
    metrics.record_sweep_retrieval("move")
    client = TestClient(create_app(cfg, db, metrics))
    health = client.get("/healthz")
    text = client.get("/metrics").text
    assert health.status_code == 200 and "prognode_jobs" in text
    _no_phi(health.text + text)
    # label names say what a value can be: states, directions, outcomes, methods, lanes, buckets; never a patient
    labels = {k for fam in text_string_to_metric_families(text) for sample in fam.samples for k in sample.labels}
    assert labels <= {"state", "direction", "outcome", "method", "lane", "le"}, labels
    assert client.get("/openapi.json").status_code == 200


def test_config_tokens(tmp_path: Path) -> None:
    cfg_file = tmp_path / "config.toml"
    cfg_file.write_text(f'[web]\ntoken = "{TOKEN}"\nread_token = "{TOKEN}"\n')
    with pytest.raises(config_mod.ConfigError, match="read_token equals token"):
        config_mod.load(cfg_file, environ={})
    cfg_file.write_text("[web]\n")
    web = config_mod.load(cfg_file, environ={"PROGNODE_WEB_READ_TOKEN": READ_TOKEN}).web
    assert (web.token, web.read_token, web.session_hours) == ("", READ_TOKEN, 12.0)
    with pytest.raises(config_mod.ConfigError, match="web.read_token"):
        config_mod.load(cfg_file, environ={"PROGNODE_WEB_READ_TOKEN": "two words"})


def test_dashboard_over_https(node_db: tuple[Config, Database], tmp_path: Path) -> None:
    """[web].tls_certificate/tls_private_key: uvicorn serves HTTPS and the sign-in cookie is Secure."""
    import ssl

    need("openssl")
    crt, key = tmp_path / "web.crt", tmp_path / "web.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(crt), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    _cfg, db = node_db
    cfg = make_config(tmp_path / "tls", extra='tls_certificate = "../web.crt"\ntls_private_key = "../web.key"\n')
    server = serve_web(cfg, db, Metrics(db), port=0)
    try:
        assert server.url.startswith("https://127.0.0.1:")
        with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=str(crt))) as client:
            assert client.get("/api/series").status_code == 401
            r = client.post("/signin", data={"token": READ_TOKEN}, follow_redirects=False)
            assert r.status_code == 303
            assert "secure" in {a.strip().lower() for a in r.headers["set-cookie"].split(";")}
            assert "Abdomen 0" in client.get("/").text
    finally:
        server.stop()


_ATTACK = """<!doctype html><form id=f method=post action="{url}/ui/jobs/2/resend">
<input name=csrf value=guess></form>"""


@pytest.mark.browser
def test_dashboard_in_chromium(node_db: tuple[Config, Database], tmp_path: Path) -> None:
    """Sign in through the form in a real Chromium, read the dashboard, resend, refuse a cross-origin post."""
    import http.server
    import threading

    from tests.cdp import Browser

    need("chromium")
    cfg, db = node_db
    server = serve_web(cfg, db, Metrics(db), port=0)

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = _ATTACK.format(url=server.url).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    saved = REPO / "test-output"
    saved.mkdir(exist_ok=True)
    try:
        assert server.config.host == "127.0.0.1"
        with Browser() as browser:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert "/signin?next=%2F" in page.url()
            _no_phi(page.html())
            page.screenshot(tmp_path / "signin.png")
            page.act_and_wait_load(f"document.getElementById('token').value = {TOKEN!r};"
                                   "document.getElementById('signin-submit').click()")
            assert page.url() == server.url + "/"
            dom = page.html()
            for text in ("Series (3)", "Jobs (4)", "Dead letters (2)", "Recent results (2)", "Sweeps (1)",
                         "StageError: body mask empty", "association rejected by ARCHIVE", "7.9 s",
                         "20260301-20260310", "Abdomen 0"):
                assert text in dom, text
            assert dom.count('id="resend-') == 2 and 'action="/ui/jobs/2/resend"' in dom
            (cookie,) = [c for c in page.cookies() if c["name"] == "prognode_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
            assert not cookie["secure"] and page.evaluate("document.cookie") == ""  # scripts cannot read it
            shot = tmp_path / "dashboard.png"
            page.screenshot(shot)
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            # a page of another origin on the same site (the cookie goes along): its post is refused
            attack = browser.new_page()
            attack.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
            attack.act_and_wait_load("document.getElementById('f').submit()")
            assert "cross-origin" in attack.html()
            assert httpx.get(server.url + "/api/jobs/2", headers=READ).json()["state"] == "dead"
            # resend through the dashboard's button, then the page shows the message and one dead letter fewer
            page.act_and_wait_load("document.getElementById('resend-2').click()")
            dom2 = page.html()
            assert "job 2: requeued" in dom2 and "Dead letters (1)" in dom2
            after = tmp_path / "dashboard-after-resend.png"
            page.screenshot(after)
            page.act_and_wait_load("document.getElementById('signout').click()")
            assert "/signin" in page.url() and "signed out" in page.html()
            assert not [c for c in page.cookies() if c["name"] == "prognode_session"]
            page.goto(server.url + "/")
            assert "/signin" in page.url()
        for f in (tmp_path / "signin.png", shot, after):
            shutil.copy(f, saved / f.name)
        scrape = httpx.get(server.url + "/metrics")
        assert scrape.status_code == 200 and 'prognode_jobs{state="pending"} 2.0' in scrape.text
    finally:
        attacker.shutdown()
        attacker.server_close()
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
        assert httpx.get(url + "/api/series").status_code == 401  # no token, no PHI
        series = wait_until(lambda: httpx.get(url + "/api/series", headers=WRITE).json(), 30, what="series listed")
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
