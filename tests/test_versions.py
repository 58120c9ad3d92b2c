"""Pipeline versions (issue 14 item 8): one place (pipelines/registry.py), routed jobs keyed by the
version so an upgrade re-routes the same inputs into a new job that supersedes the old, old
databases' keys kept, and ``POST /api/series/{uid}/rerun``."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from node.audit import AuditLog
from node.config import RouteConfig, SeriesMatch, load
from node.db import Database, Job, JobState, Result, Series, SeriesState, now
from node.jobs import JobQueue, get_job
from node.metrics import Metrics
from node.retract import rerun_key
from node.routing import Router, input_key, legacy_input_key
from node.web import create_app
from pipelines import registry

TOKEN = "versions-token"
SERIES = [{"uid": "1.2.3.1", "generation": 0, "role": ""}]
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def test_the_registry_is_the_one_place() -> None:
    for e in registry.REGISTRY.values():
        assert e.version and registry.version(e.name) == e.version
        spec = importlib.util.find_spec(e.target.split(":")[0])  # read, not imported (deep-features needs torch)
        assert spec is not None and spec.origin is not None
        source = Path(spec.origin).read_text()
        assert "VERSION = registry.version(NAME)" in source and 'VERSION = "' not in source, e.name
    from pipelines import tissue_hu

    assert tissue_hu.VERSION == registry.version("tissue-hu")


def test_key_format() -> None:
    """Routed jobs and ``prognode rerun`` share the key; the version is in it; old keys stay computable."""
    assert input_key("ct", SERIES, "1.0.0") == rerun_key("ct", SERIES, "1.0.0", None)
    assert input_key("ct", SERIES, "1.0.0") != input_key("ct", SERIES, "2.0.0") != legacy_input_key("ct", SERIES)
    assert len(input_key("ct", SERIES, "1.0.0")) == 40
    # the documented format (docs/node.md, "Job input keys")
    import hashlib
    import json

    canon = json.dumps({"route": "ct", "series": [["1.2.3.1", 0]], "pipeline_version": "1.0.0", "level": None,
                        "forced": ""}, sort_keys=True)
    assert input_key("ct", SERIES, "1.0.0") == hashlib.sha256(canon.encode()).hexdigest()[:40]


def _series(db: Database, uid: str, number: str) -> None:
    t = now()
    with db.session() as s:
        s.add(Series(series_uid=uid, study_uid="1.2.3", modality="CT", state=SeriesState.COMPLETE.value,
                     attributes={"Modality": "CT", "SeriesNumber": number}, first_received=t, last_received=t))


def _complete(db: Database, router: Router, uid: str) -> list[int]:
    with db.session() as s:
        series = s.get(Series, uid)
        assert series is not None
        return [j.id for j in router.on_series_complete(s, series)]


def _finish(db: Database, job_id: int, version: str) -> None:
    """The job ran: done, the version in its summary (as node.jobs records it), one SR result."""
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.summary = JobState.DONE.value, {"pipeline_version": version}
        s.add(Result(sop_instance_uid=f"9.9.{job_id}", job_id=job_id, series_uid=f"9.8.{job_id}",
                     source_series_uid=job.series_uid, study_uid=job.study_uid, modality="SR",
                     sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22", pipeline=job.pipeline))


def test_a_version_bump_through_routing_supersedes(tmp_path: Path) -> None:
    """A study route is routed again when another series of the study completes: at the same version
    that is a no-op (the unique input), after an upgrade it is a new job whose predecessors are the
    old job's results."""
    db = Database(f"sqlite:///{tmp_path / 'v.db'}")
    route = RouteConfig(name="ct", level="study", pipelines=("tissue-hu",),
                        requires=(SeriesMatch(name="ct", when={"SeriesNumber": "1"}),))
    _series(db, "1.2.3.1", "1")
    old = Router([route])  # the registry's version
    [first] = _complete(db, old, "1.2.3.1")
    _finish(db, first, registry.version("tissue-hu"))
    _series(db, "1.2.3.2", "2")  # another series of the study: the route picks series 1 again
    assert _complete(db, old, "1.2.3.2") == []  # same inputs, same version: one job
    new = Router([route], versions={"tissue-hu": "9.0.0"})  # the pipeline was upgraded
    [second] = _complete(db, new, "1.2.3.2")
    assert _complete(db, new, "1.2.3.2") == []
    with db.read() as s:
        a, b = s.get(Job, first), s.get(Job, second)
        assert a is not None and b is not None
        assert a.input_key == input_key("ct", SERIES, registry.version("tissue-hu"))
        assert b.input_key == input_key("ct", SERIES, "9.0.0") and b.inputs["pipeline_version"] == "9.0.0"
        assert b.inputs["series"] == a.inputs["series"] and b.series_uid == a.series_uid == "1.2.3.1"
    view = get_job(db, second)
    assert view is not None
    assert [p.sop_instance_uid for p in JobQueue(db, AuditLog(None)).predecessors(view)] == [f"9.9.{first}"]
    db.dispose()


def test_an_old_databases_jobs_keep_their_keys(tmp_path: Path) -> None:
    """A job queued with the key of before (no version) stands for the installed version: no duplicate;
    one that recorded another version is superseded by a new job."""
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    route = RouteConfig(name="ct", pipelines=("tissue-hu", "body-composition"))
    _series(db, "1.2.3.1", "1")
    t = now()
    with db.session() as s:
        for pipeline, summary in (("tissue-hu", {}), ("body-composition", {"pipeline_version": "0.0.1"})):
            s.add(Job(series_uid="1.2.3.1", study_uid="1.2.3", route="ct", pipeline=pipeline,
                      inputs={"series": SERIES, "send_to": [], "level": "series"}, summary=summary,
                      input_key=legacy_input_key("ct", SERIES), state=JobState.DONE.value if summary else
                      JobState.PENDING.value, created_at=t, updated_at=t, not_before=0.0))
    created = _complete(db, Router([route]), "1.2.3.1")
    with db.read() as s:
        jobs = s.scalars(select(Job).where(Job.id.in_(created))).all()
        assert [(j.pipeline, j.inputs["pipeline_version"]) for j in jobs] == [
            ("body-composition", registry.version("body-composition"))]
    assert _complete(db, Router([route]), "1.2.3.1") == []
    db.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Database]]:
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(f'[node]\nstorage = "var"\n[web]\nport = 0\ntoken = "{TOKEN}"\n')
    cfg = load(cfg_path, environ={})
    cfg.storage_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url)
    _series(db, "1.2.3.1", "1")
    _series(db, "1.2.3.9", "9")
    t = now()
    with db.session() as s:
        s.add(Job(id=1, series_uid="1.2.3.1", study_uid="1.2.3", route="ct", pipeline="tissue-hu",
                  inputs={"series": SERIES, "send_to": ["pacs"], "level": "series",
                          "pipeline_version": registry.version("tissue-hu")},
                  input_key=input_key("ct", SERIES, registry.version("tissue-hu")), state=JobState.DONE.value,
                  summary={"pipeline_version": registry.version("tissue-hu")}, created_at=t, updated_at=t,
                  not_before=0.0))
    yield TestClient(create_app(cfg, db, Metrics(db), AuditLog(tmp_path / "audit.jsonl"))), db
    db.dispose()


def test_rest_rerun(api: tuple[TestClient, Database], monkeypatch: pytest.MonkeyPatch) -> None:
    client, db = api
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = "/api/series/1.2.3.1/rerun"
    assert "/api/series/{series_uid}/rerun" in client.get("/openapi.json").json()["paths"]
    assert client.post(url, json={"pipeline": "tissue-hu"}).status_code == 401
    assert client.post("/api/series/9.9/rerun", json={"pipeline": "tissue-hu"}, headers=auth).status_code == 404
    r = client.post("/api/series/1.2.3.9/rerun", json={"pipeline": "tissue-hu"}, headers=auth)
    assert r.status_code == 404 and "no tissue-hu job" in r.json()["detail"]
    r = client.post(url, json={"pipeline": "no-such"}, headers=auth)
    assert r.status_code == 422 and "unknown pipeline" in r.json()["detail"]
    r = client.post(url, json={"pipeline": "tissue-hu"}, headers=auth)  # the installed version made it already
    assert r.status_code == 409 and "already" in r.json()["detail"]
    entry = registry.entry("tissue-hu")
    monkeypatch.setitem(registry.REGISTRY, "tissue-hu", dataclasses.replace(entry, version="9.0.0"))  # upgraded
    r = client.post(url, json={"pipeline": "tissue-hu"}, headers=auth)
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["created"] and out["previous_job"] == 1 and out["version"] == "9.0.0"
    assert out["previous_version"] == entry.version
    with db.read() as s:
        job = s.get(Job, out["job_id"])
        assert job is not None and job.state == "pending" and job.inputs["send_to"] == ["pacs"]
        assert job.input_key == input_key("ct", SERIES, "9.0.0")  # what routing would key it by
    r = client.post(url, json={"pipeline": "tissue-hu", "force": True}, headers=auth)
    assert r.status_code == 409 and "pending" in r.json()["detail"]  # one at a time


@pytest.mark.slow
def test_an_upgrade_through_a_running_node_supersedes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end with the versioned test pipeline: a study route's job at 1.0.0; the pipeline is
    upgraded (registry and worker both say 2.0.0) and another series of the study arrives: the route
    picks the same series, a new job runs at 2.0.0 and its results supersede the old ones."""
    import datetime as dt

    import pydicom

    from node.config import load as load_config
    from node.service import Node
    from pipelines import tissue_hu
    from tests.conftest import need
    from tests.node_helpers import write_config
    from tests.peers import storescu, wait_until
    from tests.synthetic_ct import write_study
    from tests.test_notify import TISSUE

    need("storescu")
    monkeypatch.setattr(tissue_hu, "VERSION", tissue_hu.VERSION)
    study = write_study(tmp_path / "ct", 7, dt.date(2026, 1, 6), series=2, slices=4, size=32)
    first_series, other = study.series_uids
    route = {"name": "ct", "level": "study", "pipelines": ["tissue-hu"],
             "requires": [{"name": "ct", "when": {"SeriesNumber": "1"}}]}

    def done(node: Node) -> list[Job]:
        with node.db.read() as s:
            return list(s.scalars(select(Job).where(Job.state == JobState.DONE).order_by(Job.id)))

    def run(version: str, files: list[Path], jobs: int) -> list[Job]:
        monkeypatch.setitem(registry.REGISTRY, "tissue-hu",
                            dataclasses.replace(registry.entry("tissue-hu"), version=version))
        cfg = write_config(tmp_path / "node", routes=[route], pipelines={"tissue-hu": {"test_version": version}})
        node = Node(load_config(cfg, environ={}), factories=TISSUE).start()
        try:
            storescu(node.port, files)
            return list(wait_until(lambda: len(d := done(node)) >= jobs and d, 120, interval=0.2,
                                   what=f"{jobs} done jobs"))
        finally:
            node.stop(timeout=10)

    by_series = {uid: [f for f in study.files if pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID == uid]
                 for uid in study.series_uids}
    [old] = run("1.0.0", by_series[first_series], 1)
    old_job, new_job = run("2.0.0", by_series[other], 2)
    assert old_job.id == old.id and new_job.series_uid == old.series_uid == first_series
    assert old.summary["pipeline_version"] == "1.0.0" and new_job.summary["pipeline_version"] == "2.0.0"
    assert new_job.inputs["pipeline_version"] == "2.0.0" and new_job.input_key != old.input_key
    assert new_job.inputs["series"] == old.inputs["series"]
    db = Database(load_config(tmp_path / "node" / "config.toml", environ={}).database_url)
    try:
        with db.read() as s:
            new_rows = s.scalars(select(Result).where(Result.job_id == new_job.id)).all()
            old_rows = {r.sop_instance_uid for r in s.scalars(select(Result).where(Result.job_id == old.id))}
            assert new_rows and old_rows and all(r.supersedes in old_rows for r in new_rows)
    finally:
        db.dispose()
