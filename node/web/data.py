"""Read models shared by the dashboard and the REST API (one query per view); resend is node.jobs.resend_job."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from node import jobs
from node.db import Database, Export, ExportState, Job, JobState, Result, Series, Sweep
from node.jobs import JobView
from node.retract import retractions_of


class SeriesOut(BaseModel):
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    instances: int
    state: str
    generation: int
    last_received: float
    completed_at: float | None
    completion_reason: str
    source: str


class JobOut(BaseModel):
    """The API's view of :class:`node.jobs.JobView` (its fields but ``last_image_at`` and ``inputs``;
    ``level_override`` from the inputs of a job at a reader-confirmed level, see :mod:`node.reader`)."""

    id: int
    series_uid: str
    study_uid: str
    route: str
    pipeline: str
    state: str
    attempts: int
    error: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    priority: str  # lane: urgent, normal or batch (node.lanes)
    level_override: dict[str, str] | None = None  # level, image, reader, source, time (node.reader)
    pipeline_version: str = ""  # the version that made the results (the job's summary), once done
    retraction: dict[str, Any] | None = None  # reason, by, at, KOS UID, results, destinations (node.retract)


class DeadLetterOut(BaseModel):
    kind: str  # "job" (the pipeline gave up) or "export" (a destination never took the result)
    job_id: int
    series_uid: str
    pipeline: str
    destination: str
    attempts: int
    error: str
    sop_instance_uid: str


class ResultOut(BaseModel):
    sop_instance_uid: str
    job_id: int
    modality: str
    pipeline: str
    study_uid: str
    source_series_uid: str
    supersedes: str
    created_at: float
    in_pacs_at: float | None
    last_image_at: float | None
    seconds_to_pacs: float | None  # from the last image of the input series to the result stored in PACS
    retracted: bool = False  # rejected by a retraction of its job (node.retract)


class LevelIn(BaseModel):
    """A reader-confirmed level: the level and one image of the series (by UID or instance number)."""

    level: str  # "L3" or "C3"
    sop_instance_uid: str | None = None
    instance_number: int | None = None
    reader: str = ""  # DICOM person name, Family^Given


class LevelOut(BaseModel):
    job_id: int
    sop_instance_uid: str  # the image the job measures on


class SweepOut(BaseModel):
    id: int
    source: str
    date_from: str
    date_to: str
    state: str
    dry_run: bool
    started_at: float
    finished_at: float | None
    studies: int
    retrieved: int
    skipped: int
    failed: int
    planned: int
    item_states: dict[str, int]


class RetractIn(BaseModel):
    reason: str  # why the results are rejected (in the rejection note and the audit log)


class RetractOut(BaseModel):
    job_id: int
    kos_sop_instance_uid: str  # the rejection note (IOCM KOS "Rejected for Quality Reasons")
    retracted: list[str]  # SOP Instance UIDs of the rejected results
    destinations: list[str]  # those that get the rejection note (they had received the results)
    exports_cancelled: int  # exports of the results not sent yet, cancelled


class RerunIn(BaseModel):
    pipeline: str  # a registered pipeline (pipelines/registry.py)
    force: bool = False  # run again even if the installed version made the latest result


class RerunOut(BaseModel):
    job_id: int
    created: bool  # False: that version's job for these inputs was queued already
    previous_job: int  # the job whose inputs it takes and whose results it supersedes
    previous_version: str  # the version of the latest result ("" if unknown)
    version: str  # the installed version it runs at


class ResendOut(BaseModel):
    job_id: int
    job_requeued: bool
    exports_requeued: int


def list_series(db: Database, limit: int = 200, state: str | None = None) -> list[SeriesOut]:
    with db.read() as s:
        q = select(Series).order_by(Series.last_received.desc()).limit(limit)
        if state:
            q = q.where(Series.state == state)
        return [SeriesOut(series_uid=r.series_uid, study_uid=r.study_uid, patient_id=r.patient_id,
                          modality=r.modality, description=r.description, instances=r.instances, state=r.state,
                          generation=r.generation, last_received=r.last_received, completed_at=r.completed_at,
                          completion_reason=r.completion_reason, source=r.source)
                for r in s.scalars(q)]


def _job(v: JobView, retractions: dict[int, dict[str, Any]] | None = None,
         versions: dict[int, str] | None = None) -> JobOut:
    out = JobOut.model_validate(v, from_attributes=True)
    override = v.inputs.get("level_override")
    if override:
        out.level_override = {str(k): str(val) for k, val in dict(override).items()}
    out.retraction = (retractions or {}).get(v.id)
    out.pipeline_version = (versions or {}).get(v.id, "")
    return out


def _versions(db: Database, ids: list[int]) -> dict[int, str]:
    if not ids:
        return {}
    with db.read() as s:
        return {int(i): str((summary or {}).get("pipeline_version", ""))
                for i, summary in s.execute(select(Job.id, Job.summary).where(Job.id.in_(ids))).all()}


def list_jobs(db: Database, limit: int = 200, state: str | None = None) -> list[JobOut]:
    views = jobs.list_jobs(db, limit, state)
    ids = [v.id for v in views]
    retracted, versions = retractions_of(db, ids), _versions(db, ids)
    return [_job(v, retracted, versions) for v in views]


def get_job(db: Database, job_id: int) -> JobOut | None:
    v = jobs.get_job(db, job_id)
    return _job(v, retractions_of(db, [job_id]), _versions(db, [job_id])) if v is not None else None


def list_dead_letters(db: Database, limit: int = 200) -> list[DeadLetterOut]:
    out: list[DeadLetterOut] = []
    with db.read() as s:
        for j in s.scalars(select(Job).where(Job.state == JobState.DEAD).order_by(Job.id.desc()).limit(limit)):
            out.append(DeadLetterOut(kind="job", job_id=j.id, series_uid=j.series_uid, pipeline=j.pipeline,
                                     destination="", attempts=j.attempts, error=j.error, sop_instance_uid=""))
        rows = s.execute(select(Export, Job).join(Job, Job.id == Export.job_id)
                         .where(Export.state == ExportState.DEAD).order_by(Export.id.desc()).limit(limit)).all()
        for e, j in rows:
            out.append(DeadLetterOut(kind="export", job_id=j.id, series_uid=j.series_uid, pipeline=j.pipeline,
                                     destination=e.destination, attempts=e.attempts, error=e.last_error,
                                     sop_instance_uid=e.sop_instance_uid))
    return out


def list_results(db: Database, limit: int = 200) -> list[ResultOut]:
    with db.read() as s:
        rows = s.execute(select(Result, Job.last_image_at).join(Job, Job.id == Result.job_id)
                         .order_by(Result.created_at.desc()).limit(limit)).all()
        out = []
        for r, last in rows:
            secs = (r.in_pacs_at - last) if (r.in_pacs_at is not None and last is not None) else None
            out.append(ResultOut(sop_instance_uid=r.sop_instance_uid, job_id=r.job_id, modality=r.modality,
                                 pipeline=r.pipeline, study_uid=r.study_uid, source_series_uid=r.source_series_uid,
                                 supersedes=r.supersedes, created_at=r.created_at, in_pacs_at=r.in_pacs_at,
                                 last_image_at=last, seconds_to_pacs=secs))
    retracted = retractions_of(db, sorted({o.job_id for o in out}))
    for o in out:
        o.retracted = o.sop_instance_uid in (retracted.get(o.job_id) or {}).get("retracted", ())
    return out


def list_sweeps(db: Database, limit: int = 50) -> list[SweepOut]:
    with db.read() as s:
        out = []
        for w in s.scalars(select(Sweep).order_by(Sweep.id.desc()).limit(limit)):
            rep: dict[str, Any] = w.report or {}
            out.append(SweepOut(id=w.id, source=w.source, date_from=w.date_from, date_to=w.date_to, state=w.state,
                                dry_run=bool(w.dry_run), started_at=w.started_at, finished_at=w.finished_at,
                                studies=int(rep.get("studies", 0)), retrieved=int(rep.get("retrieved", 0)),
                                skipped=int(rep.get("skipped", 0)), failed=int(rep.get("failed", 0)),
                                planned=int(rep.get("planned", 0)),
                                item_states={str(k): int(v) for k, v in (rep.get("item_states") or {}).items()}))
        return out
