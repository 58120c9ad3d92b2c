"""Retention on a full disk: a 64 MiB tmpfs filled with studies, then the node receives more.

The storage folder is a fresh tmpfs (``mount -t tmpfs -o size=64m``, unmounted at the end; without root, a
temporary folder on the real disk with the marks set relative to its free space, said in the output).  It
is filled, through the node's own Storage and Index, with CT studies (8 slices of 256 x 256) in these states:

* ``old-done``: done 40 days ago, results sent;
* ``recent-done``: done yesterday, results sent;
* in flight: a ``pending``, a ``running``, a ``failed`` (retried later) and a ``dead`` job, and a ``done``
  job whose export is still pending (its PACS is down).

The marks are set so that the disk is 4 MiB short of ``node.min_free_bytes`` and 4 MiB above
``node.associate_min_free_bytes``.  Then, with the node running (``[retention] enabled``, a runner that
holds every job it is given so that in-flight jobs stay in flight):

1. at its start the watermark's monitor finds the disk under the mark and purges what retention allows
   (oldest first, any age) until ``min_free_bytes + headroom_bytes`` are free; dcmtk storescu then sends
   two new studies;
2. ``prognode retention``'s run (older than 30 days) deletes the remaining old studies;
3. a ballast file eats the free space (2 MiB under the first mark) until the watermark has purged everything
   retention allows (the recent studies and the new ones too): storescu gets 0xA700, then, below the
   lower mark, echoscu's association is rejected.

Every in-flight study's files are checked against the SHA-256 the index recorded.  Prints a table.

    .venv/bin/python bench/retention.py [--old 40] [--size-mib 64]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from node.config import load  # noqa: E402
from node.db import Database, Export, ExportState, Instance, Job, JobState, Series, SeriesState, now  # noqa: E402
from node.index import Index, InstanceMeta  # noqa: E402
from node.jobs import JobOutcome, JobSpec  # noqa: E402
from node.retention import Retention, Trigger  # noqa: E402
from node.service import Node  # noqa: E402
from node.storage import Storage  # noqa: E402
from tests.peers import free_port, storescu  # noqa: E402
from tests.synthetic_ct import write_study  # noqa: E402

MiB = 1 << 20
DAY = 86400.0
IN_FLIGHT = ("pending", "running", "failed", "dead", "export-pending")


class HoldingRunner:
    """Takes jobs and never finishes them: in-flight jobs stay in flight during the bench."""

    def submit(self, spec: JobSpec) -> Future[JobOutcome]:
        return Future()

    def shutdown(self, wait: bool) -> None:
        pass


@contextlib.contextmanager
def storage_folder(size_mib: int) -> Iterator[tuple[Path, str]]:
    base = Path(tempfile.mkdtemp(prefix="prognode-retention-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(base)],
                             capture_output=True, text=True).returncode == 0
    try:
        yield base, f"tmpfs of {size_mib} MiB" if mounted else "a folder on the real disk (tmpfs not mountable)"
    finally:
        if mounted:
            subprocess.run(["umount", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def free(p: Path) -> int:
    return shutil.disk_usage(p).free


def add_study(db: Database, index: Index, store: Storage, files: Sequence[Path], name: str, age_days: float,
              job: JobState | None, export: ExportState | None, n: int) -> dict[str, Any]:
    """Store and index a study's files as the SCP would, then give it a job (and export) in the given state."""
    study = series = ""
    for f in files:
        data = f.read_bytes()
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        meta = InstanceMeta.from_dataset(ds)
        study, series = meta.study_uid, meta.series_uid
        stored = store.write_instance(meta.study_uid, meta.series_uid, meta.sop_instance_uid, [data])
        index.record_instance(meta, stored.path, stored.size, stored.sha256, str(ds.file_meta.TransferSyntaxUID))
    t = now() - age_days * DAY
    with db.session() as s:
        row = s.get(Series, series)
        assert row is not None
        row.state, row.last_received, row.completed_at = SeriesState.COMPLETE.value, t, t
        if job is not None:
            j = Job(series_uid=series, study_uid=study, route="bench", pipeline="bench", inputs={}, input_key=f"k{n}",
                    state=job.value, created_at=t, updated_at=t, finished_at=t,
                    not_before=now() + DAY if job is JobState.FAILED else 0.0)
            s.add(j)
            s.flush()
            work = store.work_dir(int(j.id)) / "attempt-1"
            work.mkdir()
            shutil.copyfile(files[0], work / "sr.dcm")  # a DICOM file as the result (its PACS is down)
            if export is not None:
                s.add(Export(job_id=j.id, destination="pacs", path=str(work / "sr.dcm"), sop_instance_uid=f"{series}.9",
                             state=export.value))
    return {"name": name, "study": study, "series": series}


def study_files(root: Path, st: dict[str, Any]) -> list[Path]:
    return sorted((root / "instances" / st["study"] / st["series"]).glob("*.dcm"))


def intact(db: Database, root: Path, st: dict[str, Any]) -> bool:
    with db.read() as s:
        rows = s.execute(Instance.__table__.select().where(Instance.series_uid == st["series"])).all()
    return bool(rows) and all(hashlib.sha256((root / r.path).read_bytes()).hexdigest() == r.sha256 for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=int, default=40, help="old, done and sent studies")
    ap.add_argument("--size-mib", type=int, default=64)
    args = ap.parse_args()
    with storage_folder(args.size_mib) as (root, what), tempfile.TemporaryDirectory() as tmp_name:
        return run(root, what, Path(tmp_name), args.old)


def run(root: Path, what: str, tmp: Path, n_old: int) -> int:
    var = root / "var"
    port = free_port()
    base = [f"node.storage={var}", f"node.port={port}", "node.min_free_bytes=0", "web.enabled=false",
            "logging.level=WARNING", f"logging.audit_file={tmp / 'audit.jsonl'}", "retention.enabled=true",
            "retention.days=30", "retention.check_seconds=0.5", f"retention.headroom_bytes={8 * MiB}",
            'destinations=[{"name": "pacs", "ae_title": "DOWN", "host": "127.0.0.1", "port": 9}]']
    cfg = load(None, base, environ={})
    store = Storage(cfg.storage_dir, fsync=False)
    db = Database(cfg.database_url)
    index = Index(db, cfg.storage_dir)
    studies: list[dict[str, Any]] = []
    states: list[tuple[str, float, JobState | None, ExportState | None]] = [
        *[("old-done", 40.0 + i / 24, JobState.DONE, ExportState.SENT) for i in range(n_old)],
        *[("recent-done", 1.0, JobState.DONE, ExportState.SENT) for _ in range(3)],
        ("pending", 40.0, JobState.PENDING, None), ("running", 40.0, JobState.RUNNING, None),
        ("failed", 40.0, JobState.FAILED, None), ("dead", 40.0, JobState.DEAD, None),
        ("export-pending", 40.0, JobState.DONE, ExportState.PENDING)]
    t0 = time.perf_counter()
    for n, (name, age, job, export) in enumerate(states):
        files = write_study(tmp / f"s{n}", n, dt.date(2026, 1, 1), slices=8, size=256, seed="bench-retention").files
        studies.append(add_study(db, index, store, files, name, age, job, export, n))
        shutil.rmtree(tmp / f"s{n}")
    fill_s = time.perf_counter() - t0
    store.close()
    db.dispose()
    f0 = free(root)
    marks = [f"node.min_free_bytes={f0 + 4 * MiB}", f"node.associate_min_free_bytes={max(0, f0 - 4 * MiB)}"]
    print(f"storage: {what}; filled with {len(studies)} studies in {fill_s:.1f} s; {f0 / MiB:.1f} MiB free; "
          f"node.min_free_bytes {(f0 + 4 * MiB) / MiB:.1f} MiB, associate_min_free_bytes "
          f"{max(0, f0 - 4 * MiB) / MiB:.1f} MiB, retention.headroom_bytes 8 MiB")

    def count() -> dict[str, int]:
        return {name: sum(len(study_files(var, s)) for s in studies if s["name"] == name)
                for name in dict.fromkeys(s["name"] for s in studies)}

    before = count()
    cfg = load(None, base + marks, environ={})
    node = Node(cfg, runner=HoldingRunner()).start()
    try:
        time.sleep(1.0)  # the watermark's monitor checks at once: under the first mark, it purges
        at_start = count()
        free_at_start = free(root)
        new = [write_study(tmp / f"new{i}", 100 + i, dt.date(2026, 2, 1), slices=8, size=256,
                           seed="bench-retention").files for i in range(2)]
        timings = []
        for files in new:
            t = time.perf_counter()
            r = storescu(node.port, files, check=False, timeout=120)
            timings.append((time.perf_counter() - t, r.returncode))
        after_watermark = count()
        free_after_watermark = free(root)
        t = time.perf_counter()
        aged = Retention(cfg, node.db, node.audit).run(Trigger.CLI, older_than_days=30)
        age_s = time.perf_counter() - t
        after_age = count()
        free_after_age = free(root)
        # ballast: another process eats the disk down to 2 MiB under the first mark, until the watermark has
        # purged everything retention allows (the recent studies and the new ones too: any age)
        ballast = root / "ballast"
        t = time.perf_counter()
        while True:
            with ballast.open("ab") as f:
                f.write(b"\0" * max(0, free(root) - (f0 + 2 * MiB)))
            if not Retention(cfg, node.db, None).plan(None):
                break
            node.watermark.check()
        full_s = time.perf_counter() - t
        after_full = count()
        third = write_study(tmp / "new3", 200, dt.date(2026, 2, 2), slices=1, size=256, seed="bench-retention").files
        r = storescu(node.port, third, extra=["-d"], check=False, timeout=60)
        refused = "0xa700" in (r.stdout + r.stderr).lower()
        with ballast.open("ab") as f:  # below the lower mark
            f.write(b"\0" * max(0, free(root) - max(0, f0 - 6 * MiB)))
        time.sleep(cfg.retention.check_seconds + 0.2)
        echo = subprocess.run(["echoscu", "-aec", "PROGNODE", "127.0.0.1", str(port)], capture_output=True,
                              text=True, timeout=30)
        rejected = "Local Limit Exceeded" in (echo.stdout + echo.stderr)
        ok = {s["name"]: intact(node.db, var, s) for s in studies if s["name"] in IN_FLIGHT}
        with node.db.read() as s:
            states_now = {int(j.id): j.state for j in s.query(Job).all()}
    finally:
        node.stop(timeout=10)
    audit = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()]
    purged = [a for a in audit if a["event"] == "retention_purged"]
    by_trigger = {tr: (sum(1 for a in purged if a["trigger"] == tr and a["kind"] == "instances"),
                       sum(1 for a in purged if a["trigger"] == tr and a["kind"] == "work"),
                       sum(a["bytes"] for a in purged if a["trigger"] == tr)) for tr in ("watermark", "cli")}

    print()
    print("instance files of each kind of study, after each step:")
    print(f"{'studies':<16} {'n':>3} {'filled':>7} {'node start':>10} {'2 new studies':>13} {'age run':>8} "
          f"{'full disk':>9} {'intact':>7}")
    for name, n0 in before.items():
        n = sum(1 for s in studies if s["name"] == name)
        print(f"{name:<16} {n:>3} {n0:>7} {at_start[name]:>10} {after_watermark[name]:>13} {after_age[name]:>8} "
              f"{after_full[name]:>9} {('yes' if ok[name] else 'NO') if name in ok else '-':>7}")
    print()
    print(f"{'purge':<10} {'series':>6} {'work folders':>12} {'MiB freed':>9}")
    for tr, (ns, nw, b) in by_trigger.items():
        print(f"{tr:<10} {ns:>6} {nw:>12} {b / MiB:>9.1f}")
    print()
    print(f"free space: {f0 / MiB:.1f} MiB filled, {free_at_start / MiB:.1f} MiB once the node started (watermark "
          f"purge), {free_after_watermark / MiB:.1f} MiB after 2 new studies, {free_after_age / MiB:.1f} MiB after the "
          f"age run ({aged.files} files in {age_s * 1000:.0f} ms)")
    for i, (secs, rc) in enumerate(timings):
        print(f"new study {i + 1} (8 instances): storescu {secs:.2f} s, exit {rc}")
    print(f"full disk: ballast and watermark purges until retention allowed nothing more: {full_s:.1f} s")
    print(f"with nothing left to purge and the disk under the first mark: storescu got 0xA700: {refused}")
    print(f"under the lower mark: echoscu's association rejected (transient, local limit exceeded): {rejected}")
    print(f"in-flight job states at the end: {sorted(set(states_now.values()))}; in-flight studies intact: "
          f"{all(ok.values())}")
    return 0 if all(ok.values()) and refused and rejected else 1


if __name__ == "__main__":
    raise SystemExit(main())
