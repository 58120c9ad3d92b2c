"""Retention: delete received instances and job work folders the node no longer needs.

What may go (``[retention]``, see :class:`node.config.RetentionConfig`):

* the **instances of a series** whose study is finished here: the series is ``complete`` (not receiving),
  no series of its study is receiving, every job of the study is ``done`` (none ``pending``, ``running``,
  ``failed`` -- retried later -- or ``dead``), and every export of those jobs is ``sent`` (none pending,
  none a dead letter).  Age: the series' last instance.  The study is the unit because a study-level job
  reads every series of it (and the SEG/RTSTRUCT/SR objects beside them).
* the **work folder** ``jobs/<id>`` of a ``done`` job all of whose exports are ``sent`` (a pending or
  dead-letter export still reads its result files).  Age: the job's end.

Index rows, chosen so that nothing later reads a missing file:

* the instance rows of a purged series are **deleted** (in the same transaction that removes the files):
  every reader of instances (a job's inputs, study files, re-indexing, ``has_instance``) then sees only
  files that exist, with no filter to remember anywhere, and the counters (instances, bytes; node.counters)
  stay true.  The **series row stays**, marked ``purged``: the ledger sweeps consult (it was here and was
  processed, so it is not retrieved again) and what the dashboard shows.  An instance of it arriving later
  reopens it as any late instance does (a new generation, only the new instances).
* a purged work folder sets ``jobs.purged_at``; its job and export rows stay (what went where), and
  ``resend`` refuses such a job (its result files are gone).

Each purge is one write transaction that checks the rules again (a job queued or an instance received since
the plan keeps it), deletes the rows, removes the files and commits; each deletion writes one audit record
(``retention_purged``: kind, series or job, files, bytes, the SOP Instance UIDs, trigger) and each run one
``retention_run``.  Runs: ``[retention].cron`` (apscheduler, in ``prognode serve``; stops outside
``[retention].hours``), ``prognode retention [--dry-run]``, and the disk watermark (node.watermark), which
purges what these rules allow whatever its age, oldest first, until enough space is free.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from node.audit import AuditSink
from node.config import Config
from node.db import Database, Export, ExportState, Instance, Job, JobState, Series, SeriesState, now
from node.lanes import HoursWindow
from node.storage import INSTANCES, JOBS

logger = logging.getLogger(__name__)

DAY = 86400.0
SCHEDULER_JOB_ID = "prognode-retention"


class Kind(StrEnum):
    """What one purge removes."""

    INSTANCES = "instances"  # the instance files of one series (rows deleted, series marked purged)
    WORK = "work"  # a job's work folder (jobs.purged_at set)


class Trigger(StrEnum):
    """Why a run happened (in the audit records)."""

    SCHEDULE = "schedule"  # [retention].cron
    CLI = "cli"  # prognode retention
    WATERMARK = "watermark"  # free space under the first mark (node.watermark)


@dataclass(frozen=True)
class Candidate:
    """One thing retention may delete now."""

    kind: Kind
    study_uid: str
    series_uid: str  # the series (instances) or the job's primary series (work)
    job_id: int | None  # work folders
    last_used: float  # epoch seconds: the series' last instance, or the job's end
    files: int
    bytes: int

    def age_days(self, t: float) -> float:
        return (t - self.last_used) / DAY

    @property
    def label(self) -> str:
        return f"series {self.series_uid}" if self.kind is Kind.INSTANCES else f"job {self.job_id} work folder"


@dataclass
class Report:
    """What a run did (or, dry, would do)."""

    trigger: str
    dry_run: bool
    cutoff_days: float | None  # None: any age (the watermark)
    purged: list[Candidate] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # candidates found ineligible when their turn came
    stopped_reason: str = ""
    free_before: int = 0
    free_after: int = 0

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.purged)

    @property
    def files(self) -> int:
        return sum(c.files for c in self.purged)


# Rules ------------------------------------------------------------------------------------------------


def _blocked_studies() -> Any:
    """Studies something still needs: a job not done, an export not sent, a series receiving."""
    open_job = select(Job.study_uid).where(Job.state != JobState.DONE)
    open_export = select(Job.study_uid).join(Export, Export.job_id == Job.id).where(Export.state != ExportState.SENT)
    receiving = select(Series.study_uid).where(Series.state == SeriesState.RECEIVING)
    return open_job.union(open_export, receiving)


def _unsent() -> Any:
    return exists().where(Export.job_id == Job.id, Export.state != ExportState.SENT)


def _study_blocked(s: Session, study_uid: str) -> bool:
    """:func:`_blocked_studies` for one study (inside a purge's write transaction)."""
    return any(s.scalar(q.limit(1)) is not None for q in (
        select(Job.id).where(Job.study_uid == study_uid, Job.state != JobState.DONE),
        select(Export.id).join(Job, Export.job_id == Job.id).where(Job.study_uid == study_uid,
                                                                   Export.state != ExportState.SENT),
        select(Series.series_uid).where(Series.study_uid == study_uid, Series.state == SeriesState.RECEIVING)))


class Retention:
    """Plans and runs purges of one node's storage folder and index."""

    def __init__(self, config: Config, db: Database, audit: AuditSink | None,
                 free_space: Callable[[], int] | None = None) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.root = config.storage_dir
        self.free_space = free_space or (lambda: shutil.disk_usage(self.root).free)

    # Plan -------------------------------------------------------------------------------------------
    def plan(self, older_than_days: float | None, t: float | None = None) -> list[Candidate]:
        """Everything the rules allow now, last used before ``older_than_days`` (None: any age), oldest first."""
        t = now() if t is None else t
        cutoff = t - older_than_days * DAY if older_than_days is not None else t + 1.0
        blocked = _blocked_studies().subquery()
        out: list[Candidate] = []
        with self.db.read() as s:
            rows = s.execute(
                select(Series.series_uid, Series.study_uid, Series.last_received, func.count(Instance.sop_instance_uid),
                       func.coalesce(func.sum(Instance.size), 0))
                .join(Instance, Instance.series_uid == Series.series_uid)
                .where(Series.state == SeriesState.COMPLETE, Series.last_received < cutoff,
                       Series.study_uid.not_in(select(blocked.c.study_uid)))
                .group_by(Series.series_uid, Series.study_uid, Series.last_received)).all()
            out += [Candidate(Kind.INSTANCES, study, uid, None, float(last), int(n), int(size))
                    for uid, study, last, n, size in rows]
            jobs = s.execute(select(Job.id, Job.study_uid, Job.series_uid, Job.finished_at).where(
                Job.state == JobState.DONE, Job.purged_at.is_(None), Job.finished_at < cutoff, ~_unsent())).all()
        for job_id, study, series, finished in jobs:
            folder = self.root / JOBS / str(job_id)
            if folder.is_dir():
                n, size = _du(folder)
                out.append(Candidate(Kind.WORK, study, series, int(job_id), float(finished or 0.0), n, size))
        out.sort(key=lambda c: (c.last_used, c.kind, c.series_uid))
        return out

    # Run --------------------------------------------------------------------------------------------
    def run(self, trigger: Trigger, dry_run: bool = False, older_than_days: float | None = None,
            free_target: int | None = None, hours: HoursWindow | None = None) -> Report:
        """Purge the plan in order; stop once ``free_target`` bytes are free, or when the time leaves ``hours``."""
        t0 = now()
        report = Report(trigger.value, dry_run, older_than_days, free_before=self.free_space())
        for c in self.plan(older_than_days, t0):
            if free_target is not None and not dry_run and self.free_space() >= free_target:
                report.stopped_reason = f"{free_target} bytes free"
                break
            if hours is not None and not hours.contains():
                report.stopped_reason = f"outside retention.hours {hours}"
                break
            if dry_run:
                report.purged.append(c)
            elif self._purge(c, trigger, t0):
                report.purged.append(c)
            else:
                report.kept.append(c.label)
        report.free_after = self.free_space()
        level = logging.INFO if report.purged or trigger is not Trigger.WATERMARK else logging.WARNING
        logger.log(level, "retention (%s%s): %s %d series and %d work folders, %d files, %d bytes%s%s",
                   trigger, ", dry run" if dry_run else "", "would delete" if dry_run else "deleted",
                   sum(1 for c in report.purged if c.kind is Kind.INSTANCES),
                   sum(1 for c in report.purged if c.kind is Kind.WORK), report.files, report.bytes,
                   f"; kept {len(report.kept)} that became needed" if report.kept else "",
                   f"; stopped: {report.stopped_reason}" if report.stopped_reason else "")
        if self.audit is not None and (report.purged or trigger is not Trigger.WATERMARK):
            self.audit.write("retention_run", trigger=trigger.value, dry_run=dry_run, older_than_days=older_than_days,
                             series=sum(1 for c in report.purged if c.kind is Kind.INSTANCES),
                             work_folders=sum(1 for c in report.purged if c.kind is Kind.WORK),
                             files=report.files, bytes=report.bytes, kept=len(report.kept),
                             stopped=report.stopped_reason, free_before=report.free_before,
                             free_after=report.free_after)
        return report

    def free_up(self, target_free: int) -> int:
        """The watermark's purge: what the rules allow, any age, oldest first, until ``target_free`` bytes are
        free; returns the bytes freed (0: nothing could go)."""
        return self.run(Trigger.WATERMARK, free_target=target_free).bytes

    def scheduled(self) -> Report:
        """The ``[retention].cron`` run: older than ``days``, within ``hours``."""
        cfg = self.config.retention
        return self.run(Trigger.SCHEDULE, older_than_days=cfg.days, hours=HoursWindow.parse(cfg.hours))

    def _purge(self, c: Candidate, trigger: Trigger, t: float) -> bool:
        try:
            done = self._purge_series(c) if c.kind is Kind.INSTANCES else self._purge_work(c)
        except Exception:
            logger.exception("retention: could not delete %s", c.label)
            return False
        if done is None:
            logger.info("retention: kept %s: needed again since the plan", c.label)
            return False
        files, size, sops = done
        logger.info("retention (%s): deleted %s of study %s: %d files, %d bytes, %.1f days old", trigger, c.label,
                    c.study_uid, files, size, c.age_days(t))
        if self.audit is not None:
            self.audit.write("retention_purged", kind=c.kind.value, trigger=trigger.value, study_uid=c.study_uid,
                             series_uid=c.series_uid, job_id=c.job_id, files=files, bytes=size,
                             age_days=round(c.age_days(t), 3),
                             **({"sop_instance_uids": sops} if c.kind is Kind.INSTANCES else {}))
        return True

    def _purge_series(self, c: Candidate) -> tuple[int, int, list[str]] | None:
        """One transaction: check the rules again, delete the instance rows, mark the series purged, remove the
        files (before the commit: an instance stored again meanwhile waits for the index and keeps its file)."""
        with self.db.session() as s:
            series = s.get(Series, c.series_uid)
            if series is None or series.state != SeriesState.COMPLETE or _study_blocked(s, series.study_uid):
                return None
            rows = s.execute(select(Instance.sop_instance_uid, Instance.path, Instance.size)
                             .where(Instance.series_uid == c.series_uid)).all()
            s.execute(delete(Instance).where(Instance.series_uid == c.series_uid))
            series.state = SeriesState.PURGED.value
            for _sop, rel, _size in rows:
                _unlink(self.root / rel)
        folders = {(self.root / rel).parent for _sop, rel, _size in rows}
        for folder in sorted(folders | {f.parent for f in folders}, key=lambda p: -len(p.parts)):
            if folder.is_relative_to(self.root / INSTANCES) and folder != self.root / INSTANCES:
                try:
                    folder.rmdir()  # only when empty: an instance arriving meanwhile keeps it
                except OSError:
                    pass
        return len(rows), sum(int(r[2]) for r in rows), [str(r[0]) for r in rows]

    def _purge_work(self, c: Candidate) -> tuple[int, int, list[str]] | None:
        assert c.job_id is not None
        folder = self.root / JOBS / str(c.job_id)
        with self.db.session() as s:
            job = s.get(Job, c.job_id)
            if job is None or job.state != JobState.DONE or job.purged_at is not None or s.scalar(
                    select(Export.id).where(Export.job_id == c.job_id, Export.state != ExportState.SENT).limit(1)):
                return None
            files, size = _du(folder)
            job.purged_at = now()
            shutil.rmtree(folder, ignore_errors=True)
        return files, size, []


def _du(folder: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(folder):
        for n in names:
            try:
                size += os.lstat(os.path.join(dirpath, n)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


# Schedule --------------------------------------------------------------------------------------------


def start_scheduler(retention: Retention) -> Any:
    """apscheduler running :meth:`Retention.scheduled` at ``[retention].cron`` (local time), one run at a time."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600})
    scheduler.add_job(retention.scheduled, CronTrigger.from_crontab(retention.config.retention.cron),
                      id=SCHEDULER_JOB_ID, replace_existing=True)
    scheduler.start()
    logger.info("retention scheduled: %s (older than %g days, within %s)", retention.config.retention.cron,
                retention.config.retention.days, retention.config.retention.hours)
    return scheduler


# CLI ---------------------------------------------------------------------------------------------------


def table(report: Report, t: float | None = None) -> list[str]:
    """The report as text lines: one per purged (or, dry, to be purged) thing, then the totals."""
    t = now() if t is None else t
    lines = [f"{'kind':<10} {'age (days)':>10} {'files':>7} {'bytes':>12}  what"]
    for c in report.purged:
        lines.append(f"{c.kind.value:<10} {c.age_days(t):>10.1f} {c.files:>7} {c.bytes:>12}  {c.label} "
                     f"(study {c.study_uid})")
    verb = "would delete" if report.dry_run else "deleted"
    lines.append(f"{verb}: {sum(1 for c in report.purged if c.kind is Kind.INSTANCES)} series, "
                 f"{sum(1 for c in report.purged if c.kind is Kind.WORK)} work folders, {report.files} files, "
                 f"{report.bytes} bytes" + (f"; kept {len(report.kept)}" if report.kept else "")
                 + (f"; stopped: {report.stopped_reason}" if report.stopped_reason else ""))
    return lines


def _cmd(args: argparse.Namespace) -> int:
    from node.audit import AuditLog
    from node.cli import config_from_args

    config = config_from_args(args)
    days = config.retention.days if args.days is None else args.days
    db = Database(config.database_url)
    try:
        audit = AuditLog(config.path(config.logging.audit_file))
        report = Retention(config, db, audit).run(Trigger.CLI, dry_run=args.dry_run, older_than_days=days)
    finally:
        db.dispose()
    if args.json:
        import json

        doc = {**{k: v for k, v in asdict(report).items() if k != "purged"},
               "purged": [{**asdict(c), "kind": c.kind.value} for c in report.purged],
               "files": report.files, "bytes": report.bytes}
        print(json.dumps(doc, indent=1))
    else:
        print("\n".join(table(report)))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("retention", help="delete received instances and work folders retention allows "
                                                "([retention]); --dry-run lists them")
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    p.add_argument("--days", type=float, default=None, help="older than this many days (default retention.days)")
    p.add_argument("--json", action="store_true")
    from node.cli import add_common

    add_common(p)
    p.set_defaults(func=_cmd)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - python -m node.retention
    from node.cli import main as cli_main

    return cli_main(["retention", *(argv or [])])

