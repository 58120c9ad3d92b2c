"""Lanes (node.lanes): urgent before normal before batch, batch only in its hours, depth per lane."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from node.audit import AuditLog
from node.config import ConfigError, RouteConfig, load
from node.db import Database, Job, JobState, Series, SeriesState, Sweep, SweepItem, SweepItemState, now
from node.jobs import JobQueue
from node.lanes import HoursWindow, Priority, claimable
from node.metrics import Metrics
from node.routing import Router


def test_hours_window() -> None:
    night = HoursWindow.parse("19:00-07:00")
    assert night.contains(dt.datetime(2026, 1, 1, 23, 30)) and night.contains(dt.datetime(2026, 1, 1, 6, 59))
    assert not night.contains(dt.datetime(2026, 1, 1, 7, 0)) and not night.contains(dt.datetime(2026, 1, 1, 12))
    day = HoursWindow.parse("08:30-17:00")
    assert day.contains(dt.datetime(2026, 1, 1, 8, 30)) and not day.contains(dt.datetime(2026, 1, 1, 17, 0))
    assert HoursWindow.parse("00:00-24:00").contains(dt.datetime(2026, 1, 1, 23, 59))
    assert str(night) == "19:00-07:00"
    for bad in ("7-19", "25:00-07:00", "10:00-10:00", "10:60-11:00"):
        with pytest.raises(ValueError):
            HoursWindow.parse(bad)
    assert claimable(day, dt.datetime(2026, 1, 1, 3)) == ("urgent", "normal")
    assert claimable(day, dt.datetime(2026, 1, 1, 9)) == ("urgent", "normal", "batch")


def test_config_lanes() -> None:
    c = load(None, ['routes=[{"name": "r", "pipelines": ["tissue-hu"], "priority": "urgent"}]',
                    "jobs.batch_hours=19:00-07:00"], environ={})
    assert c.routes[0].priority is Priority.URGENT and c.sweep.priority is Priority.BATCH
    assert load(None, [], environ={}).jobs.batch_hours == "00:00-24:00"
    assert load(None, ["jobs.allowed_hours=20:00-06:00"], environ={}).jobs.batch_hours == "20:00-06:00"  # the name
    with pytest.raises(ConfigError, match=r"routes\[0\]\.priority"):
        load(None, ['routes=[{"name": "r", "pipelines": ["x"], "priority": "asap"}]'], environ={})
    with pytest.raises(ConfigError, match="jobs.batch_hours"):
        load(None, ["jobs.batch_hours=night"], environ={})


def _job(db: Database, n: int, priority: Priority, series: str = "") -> int:
    t = now()
    with db.session() as s:
        j = Job(series_uid=series or f"1.2.{n}", study_uid="1.2", route="r", pipeline="p", inputs={},
                input_key=f"k{n}", state=JobState.PENDING.value, created_at=t, updated_at=t, not_before=0.0,
                priority=priority.value)
        s.add(j)
        s.flush()
        return int(j.id)


def test_claim_order_and_batch_hours(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    closed = HoursWindow.parse("00:00-00:01") if dt.datetime.now().hour else HoursWindow.parse("12:00-13:00")
    batch_first = _job(db, 1, Priority.BATCH)
    normal = _job(db, 2, Priority.NORMAL)
    urgent = _job(db, 3, Priority.URGENT)
    q = JobQueue(db, AuditLog(None), batch_hours=closed)
    lanes = Metrics(db).exposition().decode()
    assert 'prognode_lane_queue_depth{lane="urgent"} 1.0' in lanes
    assert 'prognode_lane_queue_depth{lane="batch"} 1.0' in lanes
    got = [q.claim("w"), q.claim("w"), q.claim("w")]
    assert [g.id if g else None for g in got] == [urgent, normal, None]  # batch waits outside its hours
    assert got[0] is not None and got[0].priority == "urgent"
    # in its hours a batch job still yields to a normal job queued after it
    later = _job(db, 4, Priority.NORMAL)
    q_open = JobQueue(db, AuditLog(None), batch_hours=HoursWindow.parse("00:00-24:00"))
    first, second = q_open.claim("w"), q_open.claim("w")
    assert first is not None and second is not None
    assert (first.id, second.id) == (later, batch_first)
    db.dispose()


def test_route_priority_and_swept_series_are_batch(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    routes = (RouteConfig(name="plain", pipelines=("a",)), RouteConfig(name="fast", pipelines=("b",),
                                                                       priority=Priority.URGENT))
    router = Router(routes, sweep_priority=Priority.BATCH)
    t = now()
    with db.session() as s:
        for uid in ("1.2.10", "1.2.11"):
            s.add(Series(series_uid=uid, study_uid="1.2", modality="CT", attributes={"Modality": "CT"},
                         state=SeriesState.COMPLETE.value, first_received=t, last_received=t))
        s.add(SweepItem(sweep_id=_sweep(s), study_uid="1.2", series_uid="1.2.11",
                        state=SweepItemState.RETRIEVED.value))
        s.flush()
        a, b = s.get(Series, "1.2.10"), s.get(Series, "1.2.11")
        assert a is not None and b is not None
        scanner, swept = router.on_series_complete(s, a), router.on_series_complete(s, b)
        got = {(j.series_uid, j.route): j.priority for j in [*scanner, *swept]}
    assert got == {("1.2.10", "plain"): "normal", ("1.2.10", "fast"): "urgent",
                   ("1.2.11", "plain"): "batch", ("1.2.11", "fast"): "urgent"}
    db.dispose()


def _sweep(s: Session) -> int:
    sw = Sweep(source="pacs", date_from="20260101", date_to="20260101")
    s.add(sw)
    s.flush()
    return int(sw.id)


def test_old_database_gets_the_lane_column(tmp_path: Path) -> None:
    """A database of the version before lanes (Alembic revision 0003) is migrated at the first open:
    its queued jobs are in the normal lane, with no purge recorded (migration 0004)."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from node import schema

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as c:
        command.upgrade(schema.alembic_config(c), "0003")
        c.execute(text("INSERT INTO jobs (id, series_uid, study_uid, route, pipeline, inputs, input_key, state, attempts, "
                       "error, created_at, updated_at, not_before, worker, result_dir, summary) VALUES (1, '1.2.3', "
                       "'1.2', 'r', 'p', '{}', 'k', 'pending', 0, '', 0, 0, 0, '', '', '{}')"))
    engine.dispose()
    db = Database(url)
    with db.read() as s:
        job = s.get(Job, 1)
        assert job is not None and job.priority == "normal" and job.purged_at is None
    with db.engine.connect() as c:
        assert schema.current(c) == schema.head()
    db.dispose()


def test_dashboard_and_api_show_lanes(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from node.web.app import create_app
    from tests.test_web import READ, make_config

    cfg = make_config(tmp_path)
    db = Database(cfg.database_url)
    for n, lane in enumerate((Priority.URGENT, Priority.BATCH, Priority.BATCH)):
        _job(db, n, lane)
    client = TestClient(create_app(cfg, db, Metrics(db)))
    page = client.get("/", headers=READ).text
    assert "Queue urgent<b>1</b>" in page and "Queue normal<b>0</b>" in page and "Queue batch<b>2</b>" in page
    assert sorted(j["priority"] for j in client.get("/api/jobs", headers=READ).json()) == ["batch", "batch", "urgent"]
    db.dispose()
