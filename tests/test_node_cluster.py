"""Several receivers sharing one database (node.cluster): claims, recovery, deliveries, and two real
``prognode serve`` processes on PostgreSQL splitting one series between them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
from sqlalchemy import func, select, update

from node import counters
from node.audit import AuditLog
from node.cluster import Deliveries
from node.db import Database, Job, JobState, Result, Series
from node.jobs import JobQueue, worker_gone
from node.metrics import Metrics
from tests.conftest import need
from tests.node_helpers import ROUTE, node_process, pacs_destination, write_config
from tests.peers import Orthanc, stop_pid, storescu, wait_port, wait_until, with_uids
from tests.pg import PgServer


def _jobs(db: Database, n: int) -> None:
    with db.session() as s:
        s.add_all(Job(series_uid=f"1.2.{i}", study_uid="1.2", route="ct", pipeline="p", inputs={},
                      input_key=f"k{i}") for i in range(n))


def test_each_job_is_claimed_once(database_url: str) -> None:
    """Four queues on their own connections claim concurrently: every job once, none twice."""
    db = Database(database_url)
    _jobs(db, 40)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def claimer(i: int) -> None:
        mine = Database(database_url)
        queue = JobQueue(mine, AuditLog(None))
        while (job := queue.claim(f"w{i}")) is not None:
            claimed[i].append(job.id)
        mine.dispose()

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ids = sorted(i for c in claimed for i in c)
    assert ids == list(range(1, 41)), claimed
    with db.read() as s:
        assert counters.read_counters(s.connection())["jobs.running"] == 40
        assert counters.count_from_tables(s.connection())["jobs.running"] == 40
    assert 'prognode_jobs{state="running"} 40.0' in Metrics(db).exposition().decode()  # the metrics' queries too
    db.dispose()


def test_recovery_leaves_the_jobs_of_live_workers(tmp_path: Path) -> None:
    """A starting receiver re-queues the jobs of gone workers only, not another receiver's."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    host = socket.gethostname()
    workers = {"": True, f"{host}:{gone}": True, f"{host}:{os.getppid()}": False, "elsewhere:1": False,
               f"{host}:{os.getpid()}": True}
    assert {w: worker_gone(w) for w in workers} == workers
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    _jobs(db, len(workers))
    with db.session() as s:
        for i, w in enumerate(workers, start=1):
            s.execute(update(Job).where(Job.id == i).values(state=JobState.RUNNING.value, worker=w))
    assert JobQueue(db, AuditLog(None)).recover() == [i for i, w in enumerate(workers, start=1) if workers[w]]
    db.dispose()


def test_deliveries_are_seen_by_the_other_receivers(database_url: str) -> None:
    db = Database(database_url)
    open_a: set[str] = set()
    a = Deliveries(db, lambda: set(open_a), poll_seconds=0.05, receiver="a:1")
    b = Deliveries(db, set, poll_seconds=0.05, receiver="b:2")
    assert a.busy() == b.busy() == set()
    open_a.add("1.2.3")
    assert a.busy() == {"1.2.3"} and b.busy() == {"1.2.3"}
    open_a.clear()
    assert a.busy() == set() and b.busy() == set()  # released: the row goes at once
    open_a.add("1.2.4")
    a.busy()
    a.lease = -1.0  # a receiver that died: its row's lease runs out
    a._publish({"1.2.4"}, a._refreshed)
    assert b.busy() == set()
    a.close()
    db.dispose()


# Two receivers on PostgreSQL ----------------------------------------------------------------------


def _split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Two parts of one series, neither of which (nor any union of their beginnings) is an even stack:
    completion can only be decided on the whole series, whatever the timing of the two senders."""
    by_z = sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))
    first = [f for i, f in enumerate(by_z) if i % 2 == 0 and i > 0] + [by_z[-1]]
    second = [f for f in by_z if f not in first]
    return first, second


def test_two_receivers_split_one_series(tmp_path: Path, pacs: Orthanc, pg_server: PgServer,
                                        shared_data: Path) -> None:
    """Two ``prognode serve`` processes share PostgreSQL and the storage folder; one series comes in
    through both at once: one completion, one job, one run, one result in the PACS."""
    need("storescu")
    ct = with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", tmp_path / "ct", seed="cluster")
    study = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    url = pg_server.create_database()
    runs = tmp_path / "runs.txt"
    configs = [write_config(tmp_path / name, destinations=[pacs_destination(pacs.dicom_port)], routes=[ROUTE],
                            pipelines={"test-sr": {"marker": str(runs)}},
                            node={"database": url, "storage": str(tmp_path / "var")},
                            completion={"quiet_seconds": 15.0},
                            logging={"audit_file": str(tmp_path / name / "audit.jsonl")})
               for name in ("a", "b")]
    ports = [int(c.read_text().split("port = ", 1)[1].split("\n", 1)[0]) for c in configs]
    procs = [node_process(c, test_pipelines=True, log=c.parent / "node.log") for c in configs]
    try:
        for port in ports:
            wait_port(port, 60)
        parts = _split(ct)
        sent: list[subprocess.CompletedProcess[str]] = []
        senders = [threading.Thread(target=lambda port=port, f=f: sent.append(storescu(port, f, extra=["-xv"])))
                   for port, f in zip(ports, parts, strict=True)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        assert len(sent) == 2 and all(r.returncode == 0 for r in sent)
        wait_until(lambda: "SR" in pacs.modalities_in_study(study), 90, what="the SR in the PACS")
        db = Database(url)
        try:
            def settled() -> bool:
                with db.read() as s:
                    return bool(s.scalar(select(func.count()).select_from(Result).where(Result.in_pacs_at.is_not(None))))

            wait_until(settled, 30, what="the result marked as in the PACS")
            with db.read() as s:
                series = s.scalars(select(Series)).all()
                jobs = s.scalars(select(Job)).all()
                results = s.scalars(select(Result)).all()
            assert [(x.state, x.generation, x.instances) for x in series] == [("complete", 0, len(ct))]
            assert [j.state for j in jobs] == ["done"] and len(results) == 1
        finally:
            db.dispose()
    finally:
        for p in procs:
            stop_pid(p, 30)
    logs = [json.loads(line) for c in configs for line in (c.parent / "audit.jsonl").read_text().splitlines()]
    per_receiver = [sum(1 for line in (c.parent / "audit.jsonl").read_text().splitlines()
                        if json.loads(line)["event"] == "instance_stored") for c in configs]
    assert per_receiver == [len(parts[0]), len(parts[1])]
    assert sum(e["event"] == "series_complete" for e in logs) == 1
    assert sum(e["event"] == "job_done" for e in logs) == 1
    assert sum(e["event"] == "export_sent" for e in logs) == 1  # one receiver sends it
    assert [line.split()[0] for line in runs.read_text().splitlines()] == ["start", "done"]  # one run
    assert pacs.modalities_in_study(study).count("SR") == 1


def test_a_postgresql_restart_is_survived(tmp_path: Path, pg_server: PgServer) -> None:
    """PostgreSQL restarts under a running node's database object: the next transactions work
    (dead pooled connections are replaced), and the instance recorded before is still there."""
    from node.index import Index, InstanceMeta

    db = Database(pg_server.create_database())
    index = Index(db, tmp_path)
    meta = InstanceMeta(sop_instance_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_uid="1.2",
                        series_uid="1.2.3", modality="CT")
    index.record_instance(meta, "a.dcm", 10, "0" * 64, "1.2.840.10008.1.2.1")
    _jobs(db, 1)
    pg_server.restart(0.5)
    index.record_instance(InstanceMeta(**{**meta.__dict__, "sop_instance_uid": "1.2.3.2"}), "b.dcm", 10, "1" * 64,
                          "1.2.840.10008.1.2.1")
    assert JobQueue(db, AuditLog(None)).claim("w") is not None
    with db.read() as s:
        assert s.scalar(select(Series.instances)) == 2
    db.dispose()
