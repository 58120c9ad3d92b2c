"""Cost of the counting triggers (node.counters) on the C-STORE index write, and of a metrics scrape.

``Index.record_instance`` is timed on a fresh SQLite database with the triggers and on one
without them (dropped after the start), interleaved, N instances each; then one metrics scrape
(``Metrics.exposition``) on the database with the triggers, against the same figures counted
from the tables.  Prints a table (median µs per instance of ``--repeats`` runs).

    .venv/bin/python bench/index_counters.py [--instances 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import text  # noqa: E402

from node import counters  # noqa: E402
from node.db import Database  # noqa: E402
from node.index import Index, InstanceMeta  # noqa: E402
from node.metrics import Metrics  # noqa: E402


def run(folder: Path, n: int, triggers: bool, tag: str) -> tuple[float, Database]:
    db = Database(f"sqlite:///{folder / f'{tag}.db'}")
    if not triggers:
        with db.engine.begin() as c:
            for (name,) in c.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).all():
                c.exec_driver_sql(f"DROP TRIGGER {name}")
    index = Index(db, folder)
    metas = [InstanceMeta(sop_instance_uid=f"1.2.3.{tag}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_uid="1.2.3", series_uid=f"1.2.3.{tag}.s{i // 300}", modality="CT",
                          instance_number=i % 300, position=float(i % 300)) for i in range(n)]
    t0 = time.perf_counter()
    for m in metas:
        index.record_instance(m, f"instances/x/{m.sop_instance_uid}.dcm", 500_000, "0" * 64,
                              "1.2.840.10008.1.2.1", "SCU", "127.0.0.1:1")
    return (time.perf_counter() - t0) / n * 1e6, db


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with_t, without_t, scrape, counted = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(args.repeats):
            us, db = run(folder, args.instances, True, f"t{r}")
            with_t.append(us)
            m = Metrics(db)
            t0 = time.perf_counter()
            m.exposition()
            scrape.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            with db.read() as s:
                for q in counters.FILL.values():
                    s.execute(text(q)).all()
            counted.append((time.perf_counter() - t0) * 1e3)
            db.dispose()
            us, db = run(folder, args.instances, False, f"n{r}")
            without_t.append(us)
            db.dispose()
    print(f"{args.instances} instances per run, {args.repeats} runs, SQLite, fsync of the index as configured")
    print("| figure | median |")
    print("|---|---|")
    print(f"| record_instance with counting triggers | {statistics.median(with_t):.1f} µs |")
    print(f"| record_instance without triggers | {statistics.median(without_t):.1f} µs |")
    print(f"| metrics scrape (counters + histogram windows) | {statistics.median(scrape):.2f} ms |")
    print(f"| the same figures counted from the tables | {statistics.median(counted):.2f} ms |")


if __name__ == "__main__":
    main()
