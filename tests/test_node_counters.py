"""Counters kept by the database (node.counters) and read-only reads (issue 11, item 8)."""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from sqlalchemy import text, update

from node import counters, schema
from node.db import Database, Export, ExportState, Instance, Job, JobState, Series, now
from node.metrics import Metrics


def counted(db: Database) -> dict[str, int]:
    """What the tables say, counted the slow way."""
    with db.read() as s:
        return {k: v for k, v in counters.count_from_tables(s.connection()).items() if v}


def kept(db: Database) -> dict[str, int]:
    with db.read() as s:
        return {k: v for k, v in counters.read_counters(s.connection()).items() if v}


def _populate(db: Database, n: int, tag: str) -> None:
    with db.session() as s:
        for i in range(n):
            s.add(Series(series_uid=f"{tag}.{i}", study_uid="1.2", state="receiving"))
            s.add(Instance(sop_instance_uid=f"{tag}.{i}.1", series_uid=f"{tag}.{i}", study_uid="1.2",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                           path="x", size=1000 + i, sha256="0" * 64))
            job = Job(series_uid=f"{tag}.{i}", study_uid="1.2", route="ct", pipeline="p", inputs={},
                      input_key=f"{tag}.{i}")
            s.add(job)
            s.flush()
            s.add(Export(job_id=job.id, destination="pacs", path="x", sop_instance_uid=f"{tag}.{i}.9"))


def test_counters_follow_every_change(database_url: str) -> None:
    db = Database(database_url)
    _populate(db, 5, "a")
    with db.session() as s:
        s.execute(update(Job).where(Job.id <= 2).values(state=JobState.RUNNING.value))
        s.execute(update(Job).where(Job.id == 3).values(state=JobState.DEAD.value))
        s.execute(update(Export).where(Export.id <= 3).values(state=ExportState.SENT.value, attempts=2))
        s.execute(update(Series).where(Series.series_uid == "a.0").values(state="complete", completed_at=now()))
        s.execute(text("DELETE FROM instances WHERE sop_instance_uid = 'a.4.1'"))
        # an upsert that replaces an instance's size (a new copy of the same instance)
        s.execute(text("INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax,"
                       " path, size, sha256, received_at, calling_ae, peer, generation, frames) VALUES ('a.3.1', 'a.3',"
                       " '1.2', '1', '1', 'x', 5, 'f', 0, '', '', 0, 1) ON CONFLICT (sop_instance_uid) DO UPDATE SET"
                       " size = excluded.size"))
    with db.session() as s:  # a rolled back change leaves the counters as they were
        s.execute(update(Job).values(state=JobState.DONE.value))
        s.rollback()
    assert kept(db) == counted(db)
    k = kept(db)
    assert k["jobs.running"] == 2 and k["jobs.dead"] == 1 and k["jobs.pending"] == 2
    assert k["exports.sent"] == 3 and k["exports:attempts"] == 6 and k["series:completed"] == 1
    assert k["instances:count"] == 4 and k["instances:bytes"] == 1000 + 1001 + 1002 + 5
    db.dispose()


def test_concurrent_writers_keep_counters_exact(database_url: str) -> None:
    dbs = [Database(database_url) for _ in range(3)]
    threads = [threading.Thread(target=_populate, args=(db, 20, f"w{i}")) for i, db in enumerate(dbs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kept(dbs[0]) == counted(dbs[0]) and kept(dbs[0])["jobs.pending"] == 60
    for db in dbs:
        db.dispose()


def test_an_existing_database_gets_counters_and_indexes(tmp_path: Path) -> None:
    """A database made before the counters (no state_counts, no triggers, no window indexes) is
    upgraded at the first open: counts filled from its rows, changes counted from then on."""
    path = tmp_path / "old.db"
    db = Database(f"sqlite:///{path}")
    _populate(db, 4, "old")
    db.dispose()
    with sqlite3.connect(path) as c:  # back to what the earlier version made
        for (name,) in c.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            c.execute(f"DROP TRIGGER {name}")
        for ix in ("ix_series_completed_at", "ix_jobs_finished_at", "ix_results_in_pacs_at"):
            c.execute(f"DROP INDEX {ix}")
        c.execute("DROP TABLE state_counts")
        c.execute("DROP TABLE alembic_version")  # made before Alembic too (node.schema.adopt) ...
        c.execute("DROP TABLE deliveries")  # ... which came with a migration, as did (0003, 0004) these:
        c.execute("DROP TABLE notifications")
        c.execute("DROP TABLE retractions")
        c.execute("DROP INDEX ix_exports_sent_at")
        c.execute("ALTER TABLE jobs DROP COLUMN priority")
        c.execute("ALTER TABLE jobs DROP COLUMN purged_at")
        c.execute("UPDATE jobs SET state = 'done' WHERE id = 1")
    db = Database(f"sqlite:///{path}")
    assert kept(db) == counted(db) and kept(db)["jobs.done"] == 1 and kept(db)["instances:count"] == 4
    with sqlite3.connect(path) as c:
        names = {n for (n,) in c.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger')")}
    assert {"ix_series_completed_at", "ix_jobs_finished_at", "ix_results_in_pacs_at",
            "prognode_count_jobs_update", "prognode_count_instances_insert"} <= names
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [(schema.head(),)]
    _populate(db, 2, "new")
    assert kept(db) == counted(db) and kept(db)["jobs.pending"] == 5
    assert not counters.install(db.engine)  # installed once
    db.dispose()


def test_metrics_read_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    """Reads are read-only transactions: a scrape does not wait for (or block) the C-STORE index
    write; before, it opened a write transaction and waited behind the writer."""
    path = tmp_path / "p.db"
    db = Database(f"sqlite:///{path}")
    _populate(db, 3, "m")
    metrics = Metrics(db)
    writer = sqlite3.connect(path, isolation_level=None, timeout=30)
    writer.execute("BEGIN IMMEDIATE")  # another process's write transaction, not committed
    writer.execute("UPDATE jobs SET state = 'running' WHERE id = 1")
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(metrics.exposition()), daemon=True)
    t.start()
    t.join(10)  # a write transaction would wait up to busy_timeout (30 s)
    writer.execute("COMMIT")
    writer.close()
    assert out, "the scrape waited for the writer"
    text_ = out[0].decode()
    assert 'prognode_jobs{state="pending"} 3.0' in text_ and "prognode_instances_stored 3.0" in text_
    assert 'prognode_exports{state="dead"} 0.0' in text_
    db.dispose()


def test_postgresql_triggers(tmp_path: Path) -> None:
    """The PostgreSQL flavour of the triggers, run by psql on a throw-away cluster (no Python driver
    is installed): the counts follow inserts, updates and deletes."""
    for tool in ("initdb", "pg_ctl", "psql"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from node.db import Base
    from tests.peers import free_port

    as_user: list[str] = []
    folder = tmp_path
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as nobody in a folder of its own
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        as_user = ["runuser", "-u", "nobody", "--"]
        folder = Path(tempfile.mkdtemp(prefix="prognode-pg-"))
        os.chown(folder, pwd.getpwnam("nobody").pw_uid, -1)
    data, port = folder / "pg", free_port()
    try:
        subprocess.run([*as_user, "initdb", "-D", str(data), "-A", "trust", "-U", "pn"], check=True,
                       capture_output=True)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"initdb cannot run here: {e.stderr.decode()[-200:]}")
    pg_ctl = [*as_user, "pg_ctl", "-D", str(data), "-o", f"-p {port} -k {folder} -c listen_addresses=''", "-w"]
    subprocess.run([*pg_ctl, "-l", str(folder / "pg.log"), "start"], check=True, capture_output=True)
    try:
        dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
        schema = [str(CreateTable(t).compile(dialect=dialect)) for t in Base.metadata.sorted_tables]
        schema += [str(CreateIndex(ix).compile(dialect=dialect)) for t in Base.metadata.sorted_tables
                   for ix in t.indexes]
        script = ";\n".join([*schema, *counters.ddl("postgresql")]) + ";\n"
        script += """
INSERT INTO jobs (series_uid, study_uid, route, pipeline, inputs, input_key, state, attempts, error, created_at,
  updated_at, not_before, worker, result_dir, summary) VALUES
  ('s1', 'st', 'r', 'p', '{}', 'k1', 'pending', 0, '', 0, 0, 0, '', '', '{}'),
  ('s2', 'st', 'r', 'p', '{}', 'k2', 'pending', 0, '', 0, 0, 0, '', '', '{}');
UPDATE jobs SET state = 'running' WHERE input_key = 'k1';
INSERT INTO exports (job_id, destination, path, sop_instance_uid, state, attempts, next_attempt_at, last_error)
  SELECT id, 'pacs', 'x', 'u' || id, 'pending', 3, 0, '' FROM jobs;
UPDATE exports SET state = 'dead';
DELETE FROM exports WHERE sop_instance_uid = 'u1';
INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid, transfer_syntax, path, size, sha256,
  received_at, calling_ae, peer, generation, frames) VALUES ('i1', 's1', 'st', 'c', 't', 'x', 100, 'h', 0, '', '', 0, 1);
SELECT name || '=' || value || '/' || total FROM state_counts WHERE value <> 0 AND name <> '_version' ORDER BY name;
"""
        r = subprocess.run(["psql", "-h", str(folder), "-p", str(port), "-U", "pn", "-d", "postgres", "-v",
                            "ON_ERROR_STOP=1", "-At"], input=script, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got = r.stdout.strip().splitlines()
        assert got[-4:] == ["exports.dead=1/3", "instances=1/100", "jobs.pending=1/0", "jobs.running=1/0"], r.stdout
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        if folder != tmp_path:
            shutil.rmtree(folder, ignore_errors=True)
