"""Retention (node.retention) and the disk watermarks (node.watermark).

Unit tests build an index by hand (jobs in every state) and probe free space through a stand-in; the
real-peer tests run the node with marks set relative to the real free space and send with dcmtk.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select

from node import counters
from node.audit import AuditLog
from node.cli import main as cli_main
from node.config import Config, load
from node.db import Database, Export, ExportState, Instance, Job, JobState, Series, SeriesState, now
from node.dicom_facts import SweepState
from node.index import Index, InstanceMeta
from node.jobs import NothingToResend, resend_job
from node.retention import Kind, Retention, Trigger, table
from node.storage import OutOfSpace, Storage
from node.sweep import cli as sweep_cli
from node.watermark import FreeSpace, Level, Watermark
from tests.conftest import need
from tests.node_helpers import running_node, write_config
from tests.peers import echoscu, storescu, wait_until
from tests.synthetic_ct import write_study

DAY = 86400.0
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Study:
    name: str
    study_uid: str
    series_uid: str
    job_id: int | None


def _config(tmp_path: Path, *overrides: str) -> Config:
    return load(None, [f"node.storage={tmp_path / 'var'}", "node.min_free_bytes=0", *overrides], environ={})


def _study(db: Database, index: Index, store: Storage, n: int, name: str, age_days: float,
           job: JobState | None = JobState.DONE, export: ExportState | None = ExportState.SENT,
           series_state: SeriesState = SeriesState.COMPLETE) -> Study:
    """A study of one series of 3 instance files, optionally a job (with a work folder) and an export."""
    study, series = f"1.2.826.0.1.{n}", f"1.2.826.0.1.{n}.1"
    for k in range(3):
        sop = f"{series}.{k + 1}"
        stored = store.write_instance(study, series, sop, [b"\0" * 128 + b"DICM", name.encode() * 100])
        index.record_instance(InstanceMeta(sop, CT, study, series, modality="CT"), stored.path, stored.size,
                              stored.sha256, "1.2.840.10008.1.2.1")
    t = now() - age_days * DAY
    job_id = None
    with db.session() as s:
        row = s.get(Series, series)
        assert row is not None
        row.state, row.last_received = series_state.value, t
        if job is not None:
            j = Job(series_uid=series, study_uid=study, route="r", pipeline="p", inputs={}, input_key=f"k{n}",
                    state=job.value, created_at=t, updated_at=t, not_before=0.0, finished_at=t)
            s.add(j)
            s.flush()
            job_id = int(j.id)
            work = store.work_dir(job_id) / "attempt-1"
            work.mkdir()
            (work / "sr.dcm").write_bytes(b"result" * 50)
            if export is not None:
                s.add(Export(job_id=job_id, destination="pacs", path=str(work / "sr.dcm"),
                             sop_instance_uid=f"{series}.99", state=export.value))
    return Study(name, study, series, job_id)


def _world(tmp_path: Path, cfg: Config) -> tuple[Database, Storage, dict[str, Study]]:
    store = Storage(cfg.storage_dir, fsync=False)
    db = Database(cfg.database_url)
    index = Index(db, cfg.storage_dir)
    studies = [
        _study(db, index, store, 1, "exported", 40),
        _study(db, index, store, 2, "no-job", 40, job=None),
        _study(db, index, store, 3, "pending", 40, job=JobState.PENDING, export=None),
        _study(db, index, store, 4, "running", 40, job=JobState.RUNNING, export=None),
        _study(db, index, store, 5, "failed", 40, job=JobState.FAILED, export=None),
        _study(db, index, store, 6, "dead", 40, job=JobState.DEAD, export=None),
        _study(db, index, store, 7, "export-pending", 40, export=ExportState.PENDING),
        _study(db, index, store, 8, "dead-letter", 40, export=ExportState.DEAD),
        _study(db, index, store, 9, "recent", 2),
        _study(db, index, store, 10, "receiving", 40, job=None, series_state=SeriesState.RECEIVING),
    ]
    store.close()
    return db, store, {s.name: s for s in studies}


def _files(cfg: Config, s: Study) -> list[Path]:
    return sorted((cfg.storage_dir / "instances" / s.study_uid / s.series_uid).glob("*.dcm"))


def test_retention_removes_only_what_is_allowed(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "retention.days=30")
    db, _store, st = _world(tmp_path, cfg)
    audit = AuditLog(tmp_path / "audit.jsonl")
    retention = Retention(cfg, db, audit)

    dry = retention.run(Trigger.CLI, dry_run=True, older_than_days=30)
    assert sorted((c.kind.value, c.series_uid) for c in dry.purged) == sorted([
        ("instances", st["exported"].series_uid), ("work", st["exported"].series_uid),
        ("instances", st["no-job"].series_uid)])
    assert all(len(_files(cfg, s)) == 3 for s in st.values())  # a dry run deletes nothing
    assert "would delete: 2 series, 1 work folders, 7 files" in table(dry)[-1]

    report = retention.run(Trigger.CLI, older_than_days=30)
    assert {c.label for c in report.purged} == {c.label for c in dry.purged} and report.bytes > 0
    for name, s in st.items():
        gone = name in ("exported", "no-job")
        assert len(_files(cfg, s)) == (0 if gone else 3), name
        with db.read() as ses:
            row = ses.get(Series, s.series_uid)
            assert row is not None and row.state == (SeriesState.PURGED if gone else row.state), name
            n = ses.scalar(select(func.count()).select_from(Instance).where(Instance.series_uid == s.series_uid))
            assert n == (0 if gone else 3), name  # rows go with the files: nothing reads a missing file
            if s.job_id is not None:
                job = ses.get(Job, s.job_id)
                assert job is not None
                assert (job.purged_at is not None) == (name == "exported"), name
                assert (cfg.storage_dir / "jobs" / str(s.job_id)).exists() == (name != "exported"), name
    # the inputs of in-flight, pending, failed, dead jobs, unsent results, recent and receiving studies stay
    assert not (cfg.storage_dir / "instances" / st["exported"].study_uid).exists()  # emptied folders go
    with db.read() as ses:
        assert counters.read_counters(ses.connection())["instances:count"] == 8 * 3
    events = [r for r in audit.read() if r["event"] == "retention_purged"]
    assert len(events) == 3 and all(e["trigger"] == "cli" for e in events)
    series_event = next(e for e in events if e["series_uid"] == st["exported"].series_uid and e["kind"] == "instances")
    assert series_event["files"] == 3 and len(series_event["sop_instance_uids"]) == 3
    assert [r["event"] for r in audit.read()].count("retention_run") == 2
    job_id = st["exported"].job_id
    assert job_id is not None
    with pytest.raises(NothingToResend, match="deleted by retention"):
        resend_job(db, job_id, None, "test")
    assert retention.run(Trigger.CLI, older_than_days=30).purged == []  # nothing more to do
    db.dispose()


def test_a_job_queued_after_the_plan_keeps_its_inputs(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    db, _store, st = _world(tmp_path, cfg)
    retention = Retention(cfg, db, None)
    plan = retention.plan(30)
    s = st["no-job"]
    with db.session() as ses:  # a reader-confirmed level (say) queues a job on it before its turn
        ses.add(Job(series_uid=s.series_uid, study_uid=s.study_uid, route="r", pipeline="p", inputs={},
                    input_key="late", state=JobState.PENDING.value, not_before=0.0))
    kept = [c for c in plan if c.series_uid == s.series_uid]
    assert kept and not retention._purge(kept[0], Trigger.CLI, now())
    assert len(_files(cfg, s)) == 3
    db.dispose()


def test_watermark_purges_then_refuses_then_rejects(tmp_path: Path) -> None:
    """Free space from a stand-in probe: the first mark purges (any age, oldest first), then refuses."""
    cfg = _config(tmp_path)
    db, _store, st = _world(tmp_path, cfg)
    free = {"bytes": 900}
    audit = AuditLog(tmp_path / "audit.jsonl")
    retention = Retention(cfg, db, audit, free_space=lambda: free["bytes"])
    freed_by_purge: list[int] = []

    def purge(target: int) -> int:
        got = retention.free_up(target)
        free["bytes"] += got
        freed_by_purge.append(got)
        return got

    wm = Watermark(FreeSpace(tmp_path, 60.0, probe=lambda _p: free["bytes"]), 1000, 500, 0, audit, purge)
    assert wm.level(fresh=True) is Level.LOW
    assert wm.relieve(10)  # purging the recent, done study too (any age) frees enough
    assert freed_by_purge and free["bytes"] >= 1010
    assert len(_files(cfg, st["recent"])) == 0 or len(_files(cfg, st["exported"])) == 0
    assert len(_files(cfg, st["pending"])) == 3 and len(_files(cfg, st["dead"])) == 3
    free["bytes"] = 400  # nothing left to purge: refused at once, and below the lower mark
    assert not wm.relieve(10)
    assert not wm.relieve(10)  # rate limited: no second plan
    assert wm.level(fresh=True) is Level.CRITICAL
    levels = [(r["previous"], r["level"]) for r in audit.read() if r["event"] == "disk_watermark"]
    assert levels[0] == ("ok", "low") and ("low", "ok") in levels and levels[-1][1] == "critical"
    purges = [r for r in audit.read() if r["event"] == "retention_purged"]
    assert purges and {r["trigger"] for r in purges} == {"watermark"}
    db.dispose()


def test_cli_dry_run_lists_and_run_deletes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = write_config(tmp_path, retention={"days": 30})
    cfg = load(cfg_path, environ={})
    db, _store, st = _world(tmp_path, cfg)
    db.dispose()
    assert cli_main(["retention", "--config", str(cfg_path), "--dry-run"]) == 0  # `prognode retention --dry-run`
    out = capsys.readouterr().out
    assert st["exported"].series_uid in out and "would delete: 2 series, 1 work folders" in out
    assert st["pending"].series_uid not in out
    assert len(_files(cfg, st["exported"])) == 3
    assert cli_main(["retention", "--config", str(cfg_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {p["kind"] for p in doc["purged"]} == {Kind.INSTANCES.value, Kind.WORK.value} and doc["files"] == 7
    assert len(_files(cfg, st["exported"])) == 0 and len(_files(cfg, st["pending"])) == 3


def test_sweep_cli_storage_purges_before_it_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prognode sweep`` (node.sweep.cli) stores through a Storage with the serve's watermark relief: below
    node.min_free_bytes an instance is refused without [retention] enabled, stored after a purge with it.
    Free space is a stand-in (the disk holds the instance and work files and 500 bytes more) and the sweep
    one C-GET instance written through the process's shared Storage."""
    cfg_path = write_config(tmp_path, retention={"days": 30, "headroom_bytes": 0})
    cfg = load(cfg_path, environ={})
    db, _store, st = _world(tmp_path, cfg)
    db.dispose()

    def used() -> int:
        return sum(f.stat().st_size for d in ("instances", "jobs") for f in (cfg.storage_dir / d).rglob("*")
                   if f.is_file())

    capacity = used() + 500
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: SimpleNamespace(total=capacity, free=capacity - used()))
    outcomes: list[str] = []

    def sweep(config: Config, *_args: Any, **_kw: Any) -> SimpleNamespace:
        store = Storage.shared(config.storage_dir, config.node.fsync, config.node.min_free_bytes)
        try:
            store.write_instance("1.2.826.0.1.99", "1.2.826.0.1.99.1", "1.2.826.0.1.99.1.1", [b"\0" * 300])
            outcomes.append("stored")
        except OutOfSpace as e:
            outcomes.append(str(e))
        finally:
            store.close()
        return SimpleNamespace(state=SweepState.DONE, failed=0)

    monkeypatch.setattr(sweep_cli, "run_sweep", sweep)
    argv = ["sweep", "--config", str(cfg_path), "--from", "2025-01-01", "--to", "2025-01-02",
            "--set", "node.min_free_bytes=1000"]
    assert cli_main([*argv, "--set", "retention.enabled=false"]) == 0
    assert "below node.min_free_bytes" in outcomes[-1] and all(len(_files(cfg, s)) == 3 for s in st.values())
    assert cli_main([*argv, "--set", "retention.enabled=true"]) == 0
    assert outcomes[-1] == "stored" and capacity - used() >= 1000
    assert len(_files(cfg, st["exported"])) == 0 or len(_files(cfg, st["no-job"])) == 0
    assert len(_files(cfg, st["pending"])) == 3 and len(_files(cfg, st["dead"])) == 3
    audit = AuditLog(cfg.path(cfg.logging.audit_file)).read()
    assert {r["trigger"] for r in audit if r["event"] == "retention_purged"} == {"watermark"}


# Real peers: the node, dcmtk ---------------------------------------------------------------------------


GiB = 1 << 30


def test_cstore_refused_at_the_mark_after_a_purge_then_associations_rejected(tmp_path: Path) -> None:
    """Marks relative to the real free space: a done, routed-nowhere series is purged first, the instance is
    still refused (0xA700, the reason in the ErrorComment, storescu shows it); with the lower mark above the
    free space too, storescu's and echoscu's associations are rejected (transient, local limit exceeded)."""
    need("storescu", "echoscu")
    old = write_study(tmp_path / "old", 0, dt.date(2026, 1, 1), slices=3, seed="retention-old").files
    new = write_study(tmp_path / "new", 1, dt.date(2026, 1, 2), slices=1, seed="retention-new").files
    cfg_path = write_config(tmp_path / "node", retention={"enabled": True, "headroom_bytes": 0})
    with running_node(cfg_path) as node:
        storescu(node.port, old)
        wait_until(lambda: node.index.all_series() and node.index.all_series()[0].state == "complete", 15,
                   what="series complete")
    free = shutil.disk_usage(tmp_path).free
    low = [f"node.min_free_bytes={free + 20 * GiB}", f"node.associate_min_free_bytes={max(0, free - 20 * GiB)}"]
    with running_node(cfg_path, low) as node:
        r = storescu(node.port, new, extra=["-d"], check=False, timeout=60)
        out = r.stdout + r.stderr
        assert "0xa700: Refused: Out of resources" in out, out[-2000:]
        assert "below node.min_free_bytes" in out, out[-2000:]
        assert node.index.all_series()[0].state == "purged" and node.index.instance_count() == 0
    audit = [json.loads(x) for x in (tmp_path / "node" / "var" / "audit.jsonl").read_text().splitlines()]
    events = [r["event"] for r in audit]
    purged = events.index("retention_purged")
    refused = events.index("instance_refused")
    assert purged < refused and audit[purged]["trigger"] == "watermark"  # purged first, then refused
    assert audit[refused]["status"] == "0xA700"
    reject = [f"node.min_free_bytes={free + 20 * GiB}", f"node.associate_min_free_bytes={free + 10 * GiB}"]
    with running_node(cfg_path, reject) as node:
        r = storescu(node.port, new, extra=["-d"], check=False, timeout=60)
        out = r.stdout + r.stderr
        assert "Association Rejected" in out and "Local Limit Exceeded" in out, out[-2000:]
        assert "Rejected Transient" in out, out[-2000:]
        assert echoscu(node.port) != 0
    audit = [json.loads(x) for x in (tmp_path / "node" / "var" / "audit.jsonl").read_text().splitlines()]
    rejected = [r for r in audit if r["event"] == "association_rejected"]
    assert len(rejected) >= 2 and all(r.get("transient") and "disk nearly full" in r["reason"] for r in rejected)
    assert any(r["event"] == "disk_watermark" and r["level"] == "critical" for r in audit)


def test_storage_writes_into_a_series_folder_retention_removed(tmp_path: Path) -> None:
    """Storage remembers the folders it made; retention may remove them (emptied) in between."""
    store = Storage(tmp_path, fsync=False)
    try:
        first = store.write_instance("1.2.3", "1.2.3.4", "1.2.3.4.1", [b"a" * 10])
        (tmp_path / first.path).unlink()
        (tmp_path / first.path).parent.rmdir()
        second = store.write_instance("1.2.3", "1.2.3.4", "1.2.3.4.2", [b"b" * 10])
        assert (tmp_path / second.path).read_bytes() == b"b" * 10
        staged = store.stage_instance("1.2.3", "1.2.3.4", "1.2.3.4.2", [b"c" * 10])  # a copy of a stored one
        assert staged.staged
        (tmp_path / second.path).unlink()
        (tmp_path / second.path).parent.rmdir()
        store.commit(staged)
        assert (tmp_path / second.path).read_bytes() == b"c" * 10
    finally:
        store.close()
