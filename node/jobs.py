"""The durable job queue (same database as the index) and its runner.

States: ``pending`` -> ``running`` -> ``done``; a failed attempt goes to ``failed`` and is
retried after ``jobs.retry_seconds`` until ``jobs.max_attempts``, then ``dead``.  A restart
(kill -9 included) puts ``running`` jobs back to ``pending``.  A job completes once:
:meth:`JobQueue.finish` only succeeds for the attempt that holds the job, and the unique
``(pipeline, input_key)`` keeps the same input from being queued twice.

Workers are separate processes behind :class:`Runner`; :class:`LocalProcessRunner` is a
local process pool, and a distributed engine can implement the same two methods.  The
worker entry point :func:`execute` is also what ``prognode run`` calls.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import tomllib
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import case, exists, func, select, update
from sqlalchemy.orm import aliased

from node.audit import AuditLog, AuditSink
from node.config import Config
from node.db import Database, Export, ExportState, Job, JobState, Result, Retraction, now
from node.dicom_facts import ResultFormat, result_format
from node.index import Index
from node.lanes import RANK, HoursWindow, Priority, claimable
from node.storage import Storage
from pipelines.base import Identity, Pipeline, PipelineContext, PipelineOutput, Predecessor, SeriesInput
from pipelines.common.forked import die_with_parent

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


# Identity ------------------------------------------------------------------------------


def package_version() -> str:
    """The installed prognode version, or the one in pyproject.toml when not installed."""
    try:
        return importlib.metadata.version("prognode")
    except importlib.metadata.PackageNotFoundError:
        data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
        return str(data["project"]["version"])


def machine_serial() -> str:
    """A stable per-host serial: /etc/machine-id (systemd), else the host name."""
    for p in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        try:
            value = p.read_text(encoding="ascii").strip()
        except OSError:
            continue
        if value:
            return value[:64]
    return socket.gethostname()[:64]


def identity_from_config(config: Config) -> Identity:
    return Identity(
        manufacturer=config.output.manufacturer,
        software_version=package_version(),
        device_serial_number=config.node.device_serial_number or machine_serial(),
        institution_name=config.node.institution_name,
        seg_series_number=config.output.seg_series_number,
        sr_series_number=config.output.sr_series_number,
        map_series_number=config.output.map_series_number,
        sc_series_number=config.output.sc_series_number,
        pdf_series_number=config.output.pdf_series_number,
    )


# Worker side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs; picklable, no database."""

    job_id: int
    attempt: int
    pipeline: str
    options: Mapping[str, Any]
    series: tuple[SeriesInput, ...]
    work_dir: Path
    identity: Identity
    predecessors: tuple[Predecessor, ...] = ()
    extra_files: tuple[Path, ...] = ()
    models: Mapping[str, Path] = field(default_factory=dict)
    device: str = "cpu"
    factory: str = ""  # "module:function" replacing the registry entry (tests only); empty: registry
    key_images: bool = False  # a destination of the job wants Secondary Capture key images (formats "sc")
    pdf_report: bool = False  # a destination of the job wants the Encapsulated PDF report (formats "pdf")


@dataclass(frozen=True)
class ResultFile:
    path: str  # absolute
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    modality: str


@dataclass(frozen=True)
class JobOutcome:
    ok: bool
    files: tuple[ResultFile, ...] = ()
    summary: Mapping[str, Any] = field(default_factory=dict)
    evaluable: bool = True
    reason: str = ""
    error: str = ""


def create_pipeline(name: str, options: Mapping[str, Any], factory: str = "") -> Pipeline:
    """Production path: :func:`pipelines.registry.create`; ``factory`` only where tests pass one."""
    if factory:
        module, func_name = factory.split(":")
        made: Pipeline = getattr(importlib.import_module(module), func_name)(dict(options))
        return made
    from pipelines import registry

    return registry.create(name, options)


def describe_file(path: Path) -> ResultFile:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ResultFile(str(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
                      str(ds.StudyInstanceUID), str(ds.get("Modality", "")))


def json_default(o: object) -> Any:
    """JSON for what a pipeline's summary may hold besides JSON types: a numpy scalar as its Python
    value (a numpy bool False must stay false, not become the truthy string "False"), else its text."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError):
            return str(o)
        if isinstance(value, bool | int | float | str) or value is None:
            return value
    return str(o)


def run_pipeline(spec: JobSpec, pipeline: Pipeline | None = None) -> PipelineOutput:
    """Build the context and run the pipeline (shared by the worker and ``prognode run``); a
    long-lived worker (a Ray actor) passes the pipeline it keeps between jobs."""
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    if pipeline is None:
        pipeline = create_pipeline(spec.pipeline, spec.options, spec.factory)
    ctx = PipelineContext(series=spec.series, work_dir=spec.work_dir, identity=spec.identity,
                          options=dict(spec.options), models=dict(spec.models), predecessors=spec.predecessors,
                          device=spec.device, extra_files=spec.extra_files)
    out = pipeline.run(ctx)
    # which version made it: in summary.json and in the job's summary (the results ledger's provenance)
    out = dataclasses.replace(out, summary={**dict(out.summary),
                                            "pipeline_version": str(getattr(pipeline, "version", ""))})
    summary = {"pipeline": spec.pipeline, "evaluable": out.evaluable, "reason": out.reason,
               "files": [str(f) for f in out.files], **dict(out.summary)}
    if spec.key_images or spec.pdf_report:
        out = _with_key_images(spec, out, summary)
        summary["files"] = [str(f) for f in out.files]
    (spec.work_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=json_default), encoding="utf-8")
    return out


def _with_key_images(spec: JobSpec, out: PipelineOutput, summary: Mapping[str, Any]) -> PipelineOutput:
    """``out`` plus its Secondary Capture key images and/or PDF report (:mod:`pipelines.common.key_images`)."""
    from pipelines.common.key_images import KeyImages, KeyImagesInput

    images = tuple(f for s in spec.series for f in s.files)
    sc = KeyImages(spec.identity, sc=spec.key_images, pdf=spec.pdf_report).run(KeyImagesInput(tuple(out.files), images, summary, spec.work_dir))
    return replace(out, files=(*out.files, *sc)) if sc else out


def execute(spec: JobSpec, pipeline: Pipeline | None = None) -> JobOutcome:
    """Worker entry point: never raises; failures come back as ``ok=False`` with the reason."""
    try:
        out = run_pipeline(spec, pipeline)
        files = tuple(describe_file(Path(f)) for f in out.files)
        return JobOutcome(True, files, json.loads(json.dumps(dict(out.summary), default=json_default)), out.evaluable,
                          out.reason)
    except Exception as e:
        logger.error("job %d (%s) failed: %s", spec.job_id, spec.pipeline, e)
        return JobOutcome(False, error=f"{type(e).__name__}: {e}"[:2000],
                          summary={"traceback": traceback.format_exc()[-4000:]})


def _worker_init(preload: tuple[str, ...] = (), log_level: str = "") -> None:
    """Die with the node (Linux), so a kill -9 of the node leaves no orphan writing results;
    import the configured pipelines' modules now, so the first job does not pay for it.

    The death signal is armed first: a node killed while its workers preload leaves none behind
    (and a node already gone by then ends the worker at once)."""
    parent = multiprocessing.parent_process()
    die_with_parent(parent.pid if parent is not None else None)
    if log_level:
        from node.logs import FORMAT

        logging.basicConfig(level=log_level.upper(), format=f"[worker %(process)d] {FORMAT}")
    for module in preload:
        try:
            mod = importlib.import_module(module)
            warm = getattr(mod, "warm", None)  # optional: a pipeline's one-off costs (lazy imports, tables)
            if callable(warm):
                warm()
        except Exception as e:  # the job itself will report it
            logger.warning("could not preload %s: %s", module, e)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _noop() -> int:
    return os.getpid()


def pipeline_modules(names: Sequence[str], factories: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Modules that implement the named pipelines (registry entries, or test factories)."""
    from pipelines import registry

    out = []
    for name in names:
        target = (factories or {}).get(name) or (registry.REGISTRY[name].target if name in registry.REGISTRY else "")
        if target:
            out.append(target.split(":")[0])
    return tuple(dict.fromkeys(out))


# Runner interface -----------------------------------------------------------------------


class Runner(Protocol):
    """Where jobs run; a distributed engine implements the same calls."""

    def submit(self, spec: JobSpec) -> Future[JobOutcome]: ...

    def shutdown(self, wait: bool) -> None: ...


class LocalProcessRunner:
    """A pool of local worker processes (spawned: no state inherited from the server's threads)."""

    def __init__(self, workers: int, warm: bool = True, preload: Sequence[str] = (), log_level: str = "") -> None:
        self.workers = workers
        self.preload = tuple(preload)
        self.log_level = log_level
        self.pool = self._new_pool()
        if warm:
            for _ in range(workers):
                self.pool.submit(_noop)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(self.preload, self.log_level))

    def submit(self, spec: JobSpec) -> Future[JobOutcome]:
        try:
            return self.pool.submit(execute, spec)
        except BrokenProcessPool:
            logger.warning("worker pool broken (a worker died): starting a new one")
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()
            return self.pool.submit(execute, spec)

    def shutdown(self, wait: bool) -> None:
        if not wait:
            for p in list(getattr(self.pool, "_processes", {}).values()):
                if p.is_alive():
                    p.kill()
        self.pool.shutdown(wait=wait, cancel_futures=True)


# Queue ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobView:
    """A job row as read by the queue, ``prognode status`` and the web API (``node.web.data.JobOut``)."""

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
    last_image_at: float | None
    inputs: Mapping[str, Any]
    priority: str = Priority.NORMAL.value  # lane (node.lanes)


def worker_gone(worker: str) -> bool:
    """Whether a job's worker (``host:pid``, :attr:`JobManager.worker_name`) is known to be gone:
    none, or a process of this host that no longer runs (another host's: unknown, False)."""
    host, _, pid = worker.rpartition(":")
    if not worker or not pid.isdigit():
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()  # this process is starting: whatever it held before is gone


def _rowcount(res: Any) -> int:
    return int(getattr(res, "rowcount", 0))


def _view(j: Job) -> JobView:
    return JobView(j.id, j.series_uid, j.study_uid, j.route, j.pipeline, j.state, j.attempts, j.error,
                   j.created_at, j.updated_at, j.started_at, j.finished_at, j.last_image_at, dict(j.inputs or {}),
                   j.priority)


def list_jobs(db: Database, limit: int = 1000, state: str | None = None) -> list[JobView]:
    """The latest jobs, newest first, optionally of one state."""
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        q = q.where(Job.state == state)
    with db.read() as s:
        return [_view(j) for j in s.scalars(q).all()]


def get_job(db: Database, job_id: int) -> JobView | None:
    with db.read() as s:
        j = s.get(Job, job_id)
        return _view(j) if j is not None else None


@dataclass(frozen=True)
class Resend:
    """What :func:`resend_job` queued again."""

    job_id: int
    job_requeued: bool
    exports_requeued: int


class NothingToResend(Exception):
    """The job is neither failed/dead nor has results that can be sent again (pending, running)."""


def resend_job(db: Database, job_id: int, audit: AuditSink | None, by: str) -> Resend:
    """Queue a job's results again to every destination; run a failed or dead job again.

    The one resend of the node (``prognode resend``, ``POST /api/jobs/{id}/resend`` and the
    dashboard's button):

    - a ``failed`` or ``dead`` job goes back to ``pending`` with its attempts reset (it runs again,
      and its new results are exported to the route's destinations when it is done);
    - every export of the job that is not already queued (``sent`` or ``dead``) goes back to
      ``pending`` with its attempts reset, so each destination gets the results again;
    - a job with neither (``pending``/``running``, or ``done`` with nothing to send) raises
      :class:`NothingToResend`; an unknown job raises ``KeyError``.

    One ``resend`` audit record (``job_id``, ``by``, ``job_requeued``, ``exports_requeued``).
    """
    t = now()
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise KeyError(f"job {job_id} not found")
        if s.get(Retraction, job_id) is not None:  # node.retract: its results were rejected
            raise NothingToResend(f"job {job_id} was retracted: its results are not sent again")
        if job.purged_at is not None:
            raise NothingToResend(f"job {job_id}'s work folder was deleted by retention: its results cannot be sent "
                                  "again")
        requeue_job = job.state in (JobState.FAILED, JobState.DEAD)
        exports = list(s.scalars(select(Export).where(Export.job_id == job_id, Export.state != ExportState.PENDING)))
        if not requeue_job and not exports:
            raise NothingToResend(f"job {job_id} is {job.state} and has no results to send again: nothing to resend")
        if requeue_job:
            job.state, job.attempts, job.error = JobState.PENDING.value, 0, ""
            job.not_before, job.lease_until, job.updated_at = 0.0, None, t
        for e in exports:
            e.state, e.attempts, e.next_attempt_at, e.last_error = ExportState.PENDING.value, 0, 0.0, ""
        out = Resend(job_id=job_id, job_requeued=requeue_job, exports_requeued=len(exports))
    logger.info("resend job %d by %s: job requeued %s, %d exports requeued", job_id, by, out.job_requeued,
                out.exports_requeued)
    if audit is not None:
        audit.write("resend", job_id=job_id, by=by, job_requeued=out.job_requeued,
                    exports_requeued=out.exports_requeued)
    return out


class JobQueue:
    """Transitions of the durable queue; each method is one transaction."""

    def __init__(self, db: Database, audit: AuditLog, max_attempts: int = 3, retry_seconds: float = 30.0,
                 lease_seconds: float = 600.0, batch_hours: HoursWindow | None = None) -> None:
        self.batch_hours = batch_hours  # batch jobs start only in this window (node.lanes); None: any time
        self.db = db
        self.audit = audit
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds
        self.lease_seconds = lease_seconds

    def recover(self) -> list[int]:
        """At start-up: every ``running`` job whose worker is gone was interrupted; queue it again.

        Gone: run by no one, or by a process of this host that no longer exists.  Jobs of live
        processes (another receiver sharing the database) are theirs; those of other hosts come
        back when their lease expires (:meth:`expire_leases`)."""
        with self.db.session() as s:
            rows = s.execute(select(Job.id, Job.worker).where(Job.state == JobState.RUNNING)).all()
            ids = [i for i, worker in rows if worker_gone(worker)]
            if ids:
                s.execute(update(Job).where(Job.id.in_(ids)).values(
                    state=JobState.PENDING.value, worker="", lease_until=None, not_before=0.0, updated_at=now(),
                    error="interrupted by a restart"))
        for i in ids:
            logger.warning("job %d was interrupted by a restart: pending again", i)
            self.audit.write("job_pending", job_id=i, reason="interrupted by a restart")
        return ids

    def expire_leases(self) -> list[int]:
        t = now()
        with self.db.read() as s:
            if s.scalar(select(Job.id).where(Job.state == JobState.RUNNING, Job.lease_until < t).limit(1)) is None:
                return []
        with self.db.session() as s:
            ids = list(s.scalars(select(Job.id).where(Job.state == JobState.RUNNING, Job.lease_until < t)).all())
            if ids:
                s.execute(update(Job).where(Job.id.in_(ids)).values(state=JobState.PENDING.value, worker="", lease_until=None,
                                                                   error="lease expired", updated_at=t))
        for i in ids:
            self.audit.write("job_pending", job_id=i, reason="lease expired")
        return ids

    def claim(self, worker: str) -> JobView | None:
        """Take the oldest runnable job of the first lane (urgent, normal, batch; batch only within
        ``batch_hours``, see :mod:`node.lanes`); returns it with its new attempt number.

        A job waits while another job of the same pipeline on the same series runs, so a later job
        (a new generation, a reader-confirmed level) starts after the earlier one is done and gets
        its results as predecessors to supersede."""
        t = now()
        lanes = claimable(self.batch_hours) if self.batch_hours is not None else tuple(RANK)
        with self.db.read() as s:
            if s.scalar(select(Job.id).where(Job.state.in_((JobState.PENDING, JobState.FAILED)), Job.not_before <= t,
                                             Job.priority.in_(lanes)).limit(1)) is None:
                return None
        running = aliased(Job)
        busy = exists().where(running.series_uid == Job.series_uid, running.pipeline == Job.pipeline,
                              running.state == JobState.RUNNING)
        with self.db.session() as s:
            # lanes: urgent first, batch only in its hours (node.lanes); PostgreSQL: rows another receiver
            # is claiming are skipped, the row taken stays locked until commit (SQLite: BEGIN IMMEDIATE
            # already serialises the claims)
            job = s.scalars(select(Job).where(Job.state.in_((JobState.PENDING, JobState.FAILED)), Job.not_before <= t, ~busy,
                                              Job.priority.in_(lanes))
                            .order_by(case(RANK, value=Job.priority, else_=RANK[Priority.NORMAL]), Job.id)
                            .limit(1).with_for_update(skip_locked=True)).first()
            if job is None:
                return None
            job.state = JobState.RUNNING.value
            job.attempts += 1
            job.worker = worker
            job.started_at = t
            job.updated_at = t
            job.lease_until = t + self.lease_seconds
            view = _view(job)
        logger.info("job %d running: %s on series %s (attempt %d)", view.id, view.pipeline, view.series_uid,
                    view.attempts)
        self.audit.write("job_running", job_id=view.id, pipeline=view.pipeline, series_uid=view.series_uid,
                         attempt=view.attempts)
        return view

    def renew(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id.in_(list(ids)), Job.state == JobState.RUNNING)
                      .values(lease_until=now() + self.lease_seconds))

    def predecessors(self, job: JobView) -> tuple[Predecessor, ...]:
        """Results of the latest earlier done job of the same pipeline on the same series."""
        with self.db.read() as s:
            prev = s.scalar(select(func.max(Job.id)).where(
                Job.pipeline == job.pipeline, Job.series_uid == job.series_uid, Job.route == job.route,
                Job.state == JobState.DONE, Job.id != job.id))
            if prev is None:
                return ()
            rows = s.scalars(select(Result).where(Result.job_id == prev)).all()
            return tuple(Predecessor(r.sop_instance_uid, r.series_uid, r.study_uid, r.sop_class_uid) for r in rows)

    def finish(self, job: JobView, attempt: int, outcome: JobOutcome, result_dir: str,
               predecessors: Sequence[Predecessor], send_to: Sequence[str],
               formats: Mapping[str, Sequence[ResultFormat]] | None = None) -> bool:
        """Record a successful attempt, its results and their exports; False if this attempt lost the job.

        ``formats``: per destination, the formats it gets (``[[destinations]] formats``); a result
        of another format is not exported to it (a result of no format, to every destination)."""
        t = now()
        with self.db.session() as s:
            res = s.execute(update(Job).where(Job.id == job.id, Job.state == JobState.RUNNING, Job.attempts == attempt)
                          .values(state=JobState.DONE.value, finished_at=t, updated_at=t, lease_until=None, error="",
                                  result_dir=result_dir,
                                  summary={"evaluable": outcome.evaluable, "reason": outcome.reason,
                                           **dict(outcome.summary)}))
            if _rowcount(res) != 1:
                return False
            by_class = {p.sop_class_uid: p.sop_instance_uid for p in predecessors}
            for f in outcome.files:
                s.add(Result(sop_instance_uid=f.sop_instance_uid, job_id=job.id, series_uid=f.series_uid,
                             source_series_uid=job.series_uid, study_uid=f.study_uid, modality=f.modality,
                             sop_class_uid=f.sop_class_uid, pipeline=job.pipeline,
                             supersedes=by_class.get(f.sop_class_uid, ""), created_at=t))
                fmt = result_format(f.sop_class_uid)
                for dest in send_to:
                    if fmt is not None and formats is not None and dest in formats and fmt not in formats[dest]:
                        continue
                    s.add(Export(job_id=job.id, destination=dest, path=f.path, sop_instance_uid=f.sop_instance_uid,
                                 state=ExportState.PENDING.value, attempts=0, next_attempt_at=0.0))
        logger.info("job %d done: %d result files%s", job.id, len(outcome.files),
                    "" if outcome.evaluable else f" (not evaluable: {outcome.reason})")
        self.audit.write("job_done", job_id=job.id, pipeline=job.pipeline, series_uid=job.series_uid,
                         attempt=attempt, results=[f.sop_instance_uid for f in outcome.files],
                         evaluable=outcome.evaluable, reason=outcome.reason)
        return True

    def fail(self, job: JobView, attempt: int, error: str) -> str:
        """Record a failed attempt: ``failed`` (retried later) or ``dead``; returns the new state."""
        t = now()
        with self.db.session() as s:
            row = s.get(Job, job.id)
            if row is None or row.state != JobState.RUNNING or row.attempts != attempt:
                return row.state if row is not None else "missing"
            state = JobState.DEAD if row.attempts >= self.max_attempts else JobState.FAILED
            row.state = state.value
            row.error = error[:4000]
            row.updated_at = t
            row.finished_at = t
            row.lease_until = None
            row.not_before = t + self.retry_seconds
        logger.warning("job %d %s after attempt %d: %s", job.id, state, attempt, error)
        self.audit.write(f"job_{state}", job_id=job.id, pipeline=job.pipeline, series_uid=job.series_uid,
                         attempt=attempt, error=error[:500])
        return state

    def resend(self, job_id: int, by: str = "cli") -> Resend:
        """:func:`resend_job` with this queue's database and audit log."""
        return resend_job(self.db, job_id, self.audit, by)

    def get(self, job_id: int) -> JobView | None:
        return get_job(self.db, job_id)

    def list(self, limit: int = 1000) -> list[JobView]:
        return list_jobs(self.db, limit)


# Manager: claims jobs, hands them to the runner, records outcomes -----------------------------


class JobManager:
    """The node-side loop between the queue and the runner."""

    def __init__(self, config: Config, queue: JobQueue, index: Index, storage: Storage, runner: Runner,
                 factories: Mapping[str, str] | None = None, on_done: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.queue = queue
        self.index = index
        self.storage = storage
        self.runner = runner
        self.factories = dict(factories or {})
        self.identity = identity_from_config(config)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.inflight: dict[int, tuple[JobView, int, Future[JobOutcome], JobSpec]] = {}
        self.on_done = on_done
        self.wake = threading.Event()

    def spec_for(self, job: JobView) -> JobSpec:
        series = []
        for item in job.inputs.get("series", []):
            files = tuple(self.index.series_files(str(item["uid"])))
            study = job.study_uid
            series.append(SeriesInput(series_uid=str(item["uid"]), study_uid=study, files=files,
                                      role=str(item.get("role", ""))))
        extra: tuple[Path, ...] = ()
        if job.inputs.get("level") == "study":
            extra = tuple(self.index.study_files(job.study_uid, exclude_series=[s.series_uid for s in series]))
        work = self.storage.work_dir(job.id, fresh=False) / f"attempt-{job.attempts}"
        if work.exists():
            import shutil

            shutil.rmtree(work)
        device = self.config.jobs.device
        if device == "auto":
            device = "cpu"  # the worker may upgrade to cuda itself; the node never imports torch
        options = dict(self.config.pipelines.get(job.pipeline, {}))
        wanted = {f for fs in self.formats([str(d) for d in job.inputs.get("send_to", [])]).values() for f in fs}
        if job.inputs.get("level_override"):  # a reader-confirmed level (node.reader): this job's only
            options["level_override"] = dict(job.inputs["level_override"])
        return JobSpec(job_id=job.id, attempt=job.attempts, pipeline=job.pipeline,
                       options=options, series=tuple(series),
                       work_dir=work, identity=self.identity, predecessors=self.queue.predecessors(job),
                       extra_files=extra,
                       models={k: self.config.path(v) for k, v in self.config.models.items()},
                       device=device, factory=self.factories.get(job.pipeline, ""),
                       key_images=ResultFormat.SC in wanted, pdf_report=ResultFormat.PDF in wanted)

    def formats(self, send_to: Sequence[str]) -> dict[str, Sequence[ResultFormat]]:
        """The formats each configured destination of ``send_to`` gets."""
        known = {d.name: d.formats for d in self.config.destinations}
        return {d: known[d] for d in send_to if d in known}

    def tick(self) -> None:
        self.queue.expire_leases()
        while len(self.inflight) < self.config.jobs.workers:
            job = self.queue.claim(self.worker_name)
            if job is None:
                break
            try:
                spec = self.spec_for(job)
                fut = self.runner.submit(spec)
            except Exception as e:
                self.queue.fail(job, job.attempts, f"could not start: {type(e).__name__}: {e}")
                continue
            fut.add_done_callback(lambda _f: self.wake.set())  # record and export at once, not at the next poll
            self.inflight[job.id] = (job, job.attempts, fut, spec)
        self.queue.renew(list(self.inflight))
        for job_id, (job, attempt, fut, spec) in list(self.inflight.items()):
            if not fut.done():
                continue
            del self.inflight[job_id]
            try:
                outcome = fut.result()
            except Exception as e:  # the worker process died (BrokenProcessPool) or similar
                outcome = JobOutcome(False, error=f"worker failed: {type(e).__name__}: {e}")
            if outcome.ok:
                send_to = [str(d) for d in job.inputs.get("send_to", [])]
                self.queue.finish(job, attempt, outcome, str(spec.work_dir), spec.predecessors, send_to,
                                  self.formats(send_to))
                if self.on_done:
                    self.on_done(job_id)
            else:
                self.queue.fail(job, attempt, outcome.error)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("job manager tick failed")
            self.wake.wait(self.config.completion.poll_seconds)
            self.wake.clear()
