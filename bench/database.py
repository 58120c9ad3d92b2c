"""The node's database work on SQLite and on PostgreSQL: C-STORE index writes and job claims.

For each database: ``Index.record_instance`` (the write before every C-STORE success) from 1 and
from 4 threads (parallel associations, each on its own connection), and ``JobQueue.claim`` from 1
and from 4 queues on their own ``Database`` objects (receivers).  SQLite is a file in a temporary
folder (WAL, ``synchronous=NORMAL``: a commit survives a process crash, not a power loss);
PostgreSQL is a private server from Debian's package (tests/pg.py) on 127.0.0.1, with
``fsync=on`` and ``synchronous_commit=on`` (every commit flushed: stronger than SQLite's setting)
and with ``synchronous_commit=off`` (the same guarantee as SQLite's).  Prints one table.

    PYTHONPATH=$PWD .venv/bin/python bench/database.py [--instances 2000] [--jobs 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import update  # noqa: E402

from node.audit import AuditLog  # noqa: E402
from node.db import Database, Job, JobState  # noqa: E402
from node.index import Index, InstanceMeta  # noqa: E402
from node.jobs import JobQueue  # noqa: E402
from tests import pg  # noqa: E402


def _parallel(n: int, work: Callable[[int], None]) -> float:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def ingest(url: str, folder: Path, n: int, threads: int) -> float:
    """Instances indexed per second, ``threads`` writers each with its own series."""
    db = Database(url)
    index = Index(db, folder)

    def work(k: int) -> None:
        for i in range(n // threads):
            m = InstanceMeta(sop_instance_uid=f"1.2.9.{threads}.{k}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                             study_uid="1.2.9", series_uid=f"1.2.9.{threads}.{k}", modality="CT",
                             instance_number=i, position=float(i))
            index.record_instance(m, f"instances/{m.sop_instance_uid}.dcm", 500_000, "0" * 64,
                                  "1.2.840.10008.1.2.1", "SCU", "127.0.0.1:1")

    seconds = _parallel(threads, work)
    db.dispose()
    return (n // threads) * threads / seconds


def claims(url: str, n: int, claimers: int) -> float:
    """Jobs claimed (and marked done) per second by ``claimers`` queues; checks each job was claimed once."""
    db = Database(url)
    with db.session() as s:
        s.add_all(Job(series_uid=f"1.3.{claimers}.{i}", study_uid="1.3", route="r", pipeline="p", inputs={},
                      input_key=f"{claimers}.{i}") for i in range(n))
    taken: list[list[int]] = [[] for _ in range(claimers)]
    dbs = [Database(url) for _ in range(claimers)]

    def work(k: int) -> None:
        queue = JobQueue(dbs[k], AuditLog(None))
        while (job := queue.claim(f"w{k}")) is not None:
            taken[k].append(job.id)
            with dbs[k].session() as s:  # done at once: as in the node, few jobs run at any time
                s.execute(update(Job).where(Job.id == job.id).values(state=JobState.DONE.value))

    seconds = _parallel(claimers, work)
    ids = [i for t in taken for i in t]
    assert len(ids) == len(set(ids)) == n, "a job was claimed twice or not at all"
    for d in [*dbs, db]:
        d.dispose()
    return n / seconds


def measure(name: str, url_of: Callable[[], str], folder: Path, args: argparse.Namespace) -> list[str]:
    row = [name]
    for threads in (1, 4):
        row.append(f"{ingest(url_of(), folder, args.instances, threads):,.0f}")
    for claimers in (1, 4):
        row.append(f"{claims(url_of(), args.jobs, claimers):,.0f}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=1000)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        counter = iter(range(1000))
        rows.append(measure("SQLite (WAL, synchronous=NORMAL)",
                            lambda: f"sqlite:///{folder / f'b{next(counter)}.db'}", folder, args))
        for label, settings in (("PostgreSQL (synchronous_commit=on)", ()),
                                ("PostgreSQL (synchronous_commit=off)", ("synchronous_commit=off",))):
            with pg.postgres(fsync=True, settings=settings) as server:
                rows.append(measure(label, server.create_database, folder, args))
    head = ["database", "index writes/s, 1 thread", "index writes/s, 4 threads", "claim+done/s, 1 queue",
            "claim+done/s, 4 queues"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
