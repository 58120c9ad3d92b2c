"""Retraction of a result, and re-runs after a pipeline upgrade.

Retraction (``prognode retract JOB_ID --reason TEXT``, ``POST /api/jobs/{id}/retract``)
------------------------------------------------------------------------------------------
:func:`retract_job` builds an IOCM rejection note -- a Key Object Selection Document titled
"Rejected for Quality Reasons" (DCM 113001, :func:`dicom_templates.kos.build_rejection_kos`)
that references the job's SEG/SR results -- and queues it, as ``exports`` rows of the job, to every
destination that received them, so the export machinery's retries, dead letters and every
destination kind apply.  Exports of the results that had not been sent yet are cancelled (their
rows removed: a destination that never had a result needs no rejection of it, and must not get it
later by a resend or a probe).  The ``retractions`` row marks the job and its results retracted
(the results ledger, the dashboard, the REST API); ``prognode resend`` refuses a retracted job.
Audited (``job_retracted``).

Re-runs after an upgrade (``prognode rerun SERIES_UID --pipeline NAME``)
------------------------------------------------------------------------
:func:`request_rerun` queues a **new job for the same inputs**, the mechanism of the
reader-confirmed level (:mod:`node.reader`): its ``input_key`` adds the pipeline version to the
route and series, so the unique ``(pipeline, input_key)`` rule does not block it, while asking
twice for the same version queues one job.  It keeps the route, destinations and any
reader-confirmed level of the series' latest job of that pipeline; the job queue hands it that
job's results as predecessors (:meth:`node.jobs.JobQueue.predecessors`), so its SR lists the old
SR in Predecessor Documents and the results ledger links each new result to the one it
supersedes.  Each job's summary records the ``pipeline_version`` that made it.  Asking for a
version that already made the latest result is refused unless ``force``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from node.audit import AuditSink
from node.config import Config
from node.db import Database, Export, ExportState, Job, JobState, Result, Retraction, Series, now

logger = logging.getLogger(__name__)

KOS_SERIES_NUMBER = 9199  # Series Number of the rejection notes this node writes
KOS_FOLDER = "retractions"  # under the storage folder: one KOS per retracted job
ACTIVE_STATES = (JobState.PENDING, JobState.RUNNING, JobState.FAILED)


class RetractError(Exception):
    """A refused retraction or re-run; ``status`` is the HTTP status the REST API answers."""

    status = 409


class UnknownJob(RetractError):
    status = 404


@dataclass(frozen=True)
class Retracted:
    job_id: int
    kos_sop_instance_uid: str
    kos_path: str
    retracted: tuple[str, ...]  # SOP Instance UIDs of the rejected results
    destinations: tuple[str, ...]  # those that get the KOS
    cancelled: int  # exports of the results not sent yet, cancelled


def _result_files(job: Job, results: list[Result], exports: list[Export]) -> dict[str, Path]:
    """SOP Instance UID -> file of each result (from its exports, else the job's result folder)."""
    import pydicom

    wanted = {r.sop_instance_uid for r in results}
    found = {e.sop_instance_uid: Path(e.path) for e in exports if e.sop_instance_uid in wanted and Path(e.path).is_file()}
    if len(found) < len(wanted) and job.result_dir and Path(job.result_dir).is_dir():
        for f in sorted(Path(job.result_dir).rglob("*.dcm")):
            try:
                uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            except Exception:
                continue
            if uid in wanted:
                found.setdefault(uid, f)
    return found


def retract_job(db: Database, config: Config, audit: AuditSink | None, job_id: int, reason: str,
                by: str) -> Retracted:
    """Reject job ``job_id``'s results (see the module's docstring).

    Raises :class:`UnknownJob` (404), :class:`RetractError` (409: not done, already retracted, no
    results, a result file that cannot be read) or ValueError (422: an empty reason)."""
    import pydicom

    from dicom_templates.kos import build_rejection_kos
    from node.jobs import identity_from_config

    reason = reason.strip()
    if not reason:
        raise ValueError("a retraction needs a reason (--reason TEXT)")
    with db.read() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UnknownJob(f"job {job_id} not found")
        if s.get(Retraction, job_id) is not None:
            raise RetractError(f"job {job_id} is already retracted")
        if job.state != JobState.DONE:
            raise RetractError(f"job {job_id} is {job.state}: only a done job's results can be retracted")
        results = list(s.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.created_at)))
        exports = list(s.scalars(select(Export).where(Export.job_id == job_id)))
    if not results:
        raise RetractError(f"job {job_id} has no results to retract")
    files = _result_files(job, results, exports)
    missing = [r.sop_instance_uid for r in results if r.sop_instance_uid not in files]
    if missing:
        raise RetractError(f"job {job_id}: the files of results {', '.join(missing)} are gone; the rejection note "
                           "references each rejected object and copies its study, so it cannot be made")
    rejected = [pydicom.dcmread(files[r.sop_instance_uid], stop_before_pixels=True) for r in results]
    kos = build_rejection_kos(rejected, identity_from_config(config), KOS_SERIES_NUMBER, reason)
    folder = config.storage_dir / KOS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"job-{job_id}-kos.dcm"
    kos.save_as(path)
    kos_uid = str(kos.SOPInstanceUID)
    uids = [r.sop_instance_uid for r in results]
    t = now()
    with db.session() as s:
        if s.get(Retraction, job_id) is not None:  # a concurrent retraction won
            path.unlink(missing_ok=True)
            raise RetractError(f"job {job_id} is already retracted")
        received = sorted(set(s.scalars(select(Export.destination).where(
            Export.job_id == job_id, Export.sop_instance_uid.in_(uids), Export.state == ExportState.SENT)).all()))
        cancelled = s.execute(delete(Export).where(Export.job_id == job_id, Export.sop_instance_uid.in_(uids),
                                                   Export.state != ExportState.SENT))
        for dest in received:
            s.add(Export(job_id=job_id, destination=dest, path=str(path), sop_instance_uid=kos_uid,
                         state=ExportState.PENDING.value, attempts=0, next_attempt_at=0.0))
        s.add(Retraction(job_id=job_id, kos_sop_instance_uid=kos_uid, kos_path=str(path), reason=reason, by=by,
                         retracted=uids, destinations=received, created_at=t))
    out = Retracted(job_id, kos_uid, str(path), tuple(uids), tuple(received), int(getattr(cancelled, "rowcount", 0)))
    logger.warning("job %d retracted by %s (%s): rejection note %s queued to %s; %d unsent exports cancelled",
                   job_id, by, reason, kos_uid, ", ".join(received) or "no destination", out.cancelled)
    if audit is not None:
        audit.write("job_retracted", job_id=job_id, by=by, reason=reason, kos_sop_instance_uid=kos_uid,
                    retracted=uids, destinations=received, exports_cancelled=out.cancelled)
    return out


def retractions_of(db: Database, job_ids: list[int]) -> dict[int, dict[str, Any]]:
    """The retractions of these jobs, for the dashboard and the REST API."""
    if not job_ids:
        return {}
    with db.read() as s:
        rows = s.scalars(select(Retraction).where(Retraction.job_id.in_(job_ids))).all()
        return {r.job_id: {"reason": r.reason, "by": r.by, "at": r.created_at, "kos_sop_instance_uid":
                           r.kos_sop_instance_uid, "retracted": list(r.retracted),
                           "destinations": list(r.destinations)} for r in rows}


def is_retracted(db: Database, job_id: int) -> bool:
    with db.read() as s:
        return s.get(Retraction, job_id) is not None


# Re-runs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rerun:
    job_id: int
    created: bool  # False: this version's job for these inputs was already queued
    previous_job: int
    previous_version: str
    version: str


def rerun_key(route: str, series: list[dict[str, Any]], version: str, level_override: dict[str, Any] | None,
              forced_at: str = "") -> str:
    """:func:`node.routing.input_key` (route, series and pipeline version, the key of a routed job
    at that version) with a reader-confirmed level carried over and the request time of a forced re-run."""
    from node.routing import input_key

    return input_key(route, series, version, level_override, forced_at)


def request_rerun(db: Database, audit: AuditSink | None, series_uid: str, pipeline: str, version: str, by: str,
                  force: bool = False) -> Rerun:
    """Queue ``pipeline`` again on the inputs of the series' latest job of it, at ``version``."""
    from node.reader import now_iso

    if not version:
        raise RetractError(f"pipeline {pipeline} has no version: a re-run is keyed by it")
    t = now()
    with db.session() as s:
        if s.get(Series, series_uid) is None:
            raise UnknownJob(f"series {series_uid} not found")
        jobs = list(s.scalars(select(Job).where(Job.series_uid == series_uid, Job.pipeline == pipeline)
                              .order_by(Job.id.desc())))
        if not jobs:
            raise UnknownJob(f"series {series_uid} has no {pipeline} job to run again")
        active = next((j for j in jobs if j.state in ACTIVE_STATES), None)
        if active is not None:
            raise RetractError(f"job {active.id} ({pipeline}) on series {series_uid} is {active.state}: "
                               "ask again when it is done")
        last = jobs[0]
        done = next((j for j in jobs if j.state == JobState.DONE), None)
        previous = str((done.summary or {}).get("pipeline_version", "")) if done is not None else ""
        if previous == version and not force:
            raise RetractError(f"the latest {pipeline} result of series {series_uid} (job {done.id if done else '?'}) "
                               f"was made by version {version} already: nothing to re-run (--force runs it again)")
        inputs = dict(last.inputs or {})
        override = inputs.get("level_override") or None
        key = rerun_key(last.route, list(inputs.get("series", [])), version, override, now_iso(t) if force else "")
        existing = s.scalar(select(Job.id).where(Job.pipeline == pipeline, Job.input_key == key))
        if existing is not None:
            return Rerun(int(existing), False, int(last.id), previous, version)
        inputs["pipeline_version"] = version
        inputs["rerun"] = {"by": by, "time": now_iso(t), "previous_job": int(last.id),
                           "previous_version": previous, "forced": force}
        job = Job(series_uid=series_uid, study_uid=last.study_uid, route=last.route, pipeline=pipeline,
                  inputs=inputs, input_key=key, state=JobState.PENDING.value, attempts=0, created_at=t, updated_at=t,
                  not_before=0.0, last_image_at=last.last_image_at)
        s.add(job)
        s.flush()
        out = Rerun(int(job.id), True, int(last.id), previous, version)
    logger.info("job %d queued: %s on series %s again at version %s (was %s, job %d), by %s", out.job_id, pipeline,
                series_uid, version, previous or "unknown", out.previous_job, by)
    if audit is not None:
        audit.write("job_rerun", job_id=out.job_id, series_uid=series_uid, pipeline=pipeline, version=version,
                    previous_job=out.previous_job, previous_version=previous, by=by, forced=force)
        audit.write("job_pending", job_id=out.job_id, series_uid=series_uid)
    return out


# Command line -------------------------------------------------------------------------------------


def cmd_retract(args: argparse.Namespace) -> int:
    from node.audit import AuditLog
    from node.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, config_from_args

    config = config_from_args(args)
    db = Database(config.database_url)
    try:
        out = retract_job(db, config, AuditLog(config.path(config.logging.audit_file)), args.job_id, args.reason,
                          by="cli")
    except (UnknownJob, ValueError) as e:
        print(f"retract: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RetractError as e:
        print(f"retract: {e}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        db.dispose()
    print(f"job {out.job_id}: {len(out.retracted)} results retracted; rejection note {out.kos_sop_instance_uid} "
          f"queued to {', '.join(out.destinations) or 'no destination (none had received them)'}"
          + (f"; {out.cancelled} unsent exports cancelled" if out.cancelled else ""))
    return EXIT_OK


def pipeline_version(config: Config, pipeline: str, factory: str = "") -> str:
    """The version of ``pipeline`` as installed now: its ``pipelines/registry.py`` entry (KeyError
    for an unknown name); with a test ``factory``, the version of the pipeline it makes."""
    if not factory:
        from pipelines import registry

        return registry.version(pipeline)
    from node.jobs import create_pipeline

    made = create_pipeline(pipeline, dict(config.pipelines.get(pipeline, {})), factory)
    return str(getattr(made, "version", ""))


def cmd_rerun(args: argparse.Namespace) -> int:
    from node.audit import AuditLog
    from node.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, config_from_args

    config = config_from_args(args)
    try:
        version = pipeline_version(config, args.pipeline, (getattr(args, "factories", None) or {}).get(args.pipeline, ""))
    except (KeyError, ValueError) as e:
        print(f"rerun: {e}", file=sys.stderr)
        return EXIT_USAGE
    db = Database(config.database_url)
    try:
        out = request_rerun(db, AuditLog(config.path(config.logging.audit_file)), args.series_uid, args.pipeline,
                            version, by="cli", force=args.force)
    except UnknownJob as e:
        print(f"rerun: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RetractError as e:
        print(f"rerun: {e}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        db.dispose()
    what = "queued" if out.created else "already queued"
    print(f"job {out.job_id} {what}: {args.pipeline} {out.version} on series {args.series_uid} "
          f"(supersedes job {out.previous_job}, version {out.previous_version or 'unknown'})")
    return EXIT_OK


def register(sub: Any) -> None:
    from node.cli import add_common

    p = sub.add_parser("retract", help="reject a job's results (IOCM KOS 'Rejected for Quality Reasons') "
                                       "at every destination that received them")
    p.add_argument("job_id", type=int)
    p.add_argument("--reason", required=True, help="why (written in the rejection note and the audit log)")
    add_common(p)
    p.set_defaults(func=cmd_retract)

    p = sub.add_parser("rerun", help="run a pipeline again on a series after an upgrade; the new result "
                                     "supersedes the old (Predecessor Documents)")
    p.add_argument("series_uid")
    p.add_argument("--pipeline", required=True)
    p.add_argument("--force", action="store_true", help="run again even if the installed version made the latest result")
    add_common(p)
    p.set_defaults(func=cmd_rerun)
