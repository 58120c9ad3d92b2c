"""Sweeps: query a PACS for a date range, skip what the ledger already has, retrieve the rest.

``prognode sweep --config FILE --from DATE --to DATE [--dry-run]`` runs one sweep now; ``prognode
serve`` runs ``[sweep].cron`` through :func:`start_scheduler`.

1. C-FIND (Study Root) at STUDY level for ``StudyDate`` in the range and ``ModalitiesInStudy``,
   then at SERIES level per study (``Modality``, ``NumberOfSeriesRelatedInstances``), one
   association per request; a study's answers are checked against its
   ``NumberOfStudyRelatedSeries`` and queried again when some are missing.  The series found
   become ``sweep_items`` (state ``pending``) of a ``sweeps`` row: the sweep's durable plan.
2. Each pending item is checked against the ledger: the same SeriesInstanceUID with at least the
   same instance count in ``series`` is already here (``present``), and ``processed`` when a job or a
   result exists for it.  Such items are ``skipped``; the rest are retrieved unless ``--dry-run``
   (they become ``planned``).
3. Retrieval by C-MOVE to the node's own AE (the PACS must know that AE) or by C-GET, where this
   SCU stores the instances through the SCP's own store handler (``node.handlers.handle_store``).  If no node listens on
   ``[node].host:port`` during a C-MOVE sweep, the sweep starts a temporary receiver there.
4. Throttled: ``max_concurrent`` associations, ``pause_seconds`` between retrievals of a worker,
   retrieval only within ``allowed_hours`` (outside them the sweep stops as ``interrupted`` and the
   next run resumes it).
5. Resumable: a sweep of the same source and range that is ``running`` (its process gone) or
   ``interrupted`` is resumed: the plan is reused, retrieved and skipped items are not redone.
6. Progress lines go to the ``progress`` callback (the CLI prints them); the report is written to
   ``<storage>/sweeps/sweep-<id>.json`` and kept in ``sweeps.report``.

After retrieval the normal completion, routing and jobs of the node do the work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from sqlalchemy import func, select

from node import config as config_mod
from node.access import AccessPolicy, access_handlers
from node.audit import AuditLog, AuditSink
from node.config import Config, SourceConfig
from node.db import Database, Job, Result, Series, Sweep, SweepItem
from node.dicom_facts import (
    STORAGE_CLASS_UIDS,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    TRANSFER_SYNTAX_UIDS,
    VERIFICATION,
    SweepItemState,
    SweepState,
)
from node.handlers import handle_store
from node.index import Index
from node.metrics import Metrics
from node.storage import Storage
from node.tls import associate, client_identity_handlers, server_context

log = logging.getLogger(__name__)

StoreHandler = Callable[[Any], Any]  # EVT_C_STORE handler: event -> status (int or Dataset)
Progress = Callable[[str], None]

SCHEDULER_JOB_ID = "prognode-sweep"


class SweepError(RuntimeError):
    """A sweep cannot run (unknown source, PACS unreachable, another live sweep holds the range)."""


@dataclass(frozen=True)
class RemoteSeries:
    study_uid: str
    series_uid: str
    modality: str
    instances: int | None
    study_date: str = ""
    description: str = ""


@dataclass
class SweepOutcome:
    """What one run of a sweep did (also the JSON report)."""

    sweep_id: int
    source: str
    method: str
    date_from: str
    date_to: str
    dry_run: bool
    state: str = SweepState.RUNNING
    resumed: bool = False
    studies: int = 0
    series: int = 0
    retrieved: int = 0  # series retrieved in this run
    instances_retrieved: int = 0
    skipped: int = 0
    planned: int = 0
    failed: int = 0
    already_done: int = 0  # items finished by an earlier run of this sweep (resume)
    stopped_reason: str = ""
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def studies_per_minute(self) -> float:
        return 60.0 * self.studies / self.seconds if self.seconds > 0 else 0.0


# Dates and hours ---------------------------------------------------------------------------------


def parse_date(text: str) -> dt.date:
    """``YYYY-MM-DD`` or ``YYYYMMDD``."""
    t = text.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(t, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"not a date (YYYY-MM-DD): {text!r}")


def within_hours(hour: int, allowed: tuple[int, int]) -> bool:
    """``[start, end)`` local hours; ``start > end`` wraps midnight (e.g. 20-6)."""
    start, end = allowed
    if start == end or (start, end) == (0, 24):
        return True
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end


def _local_hour() -> int:
    return dt.datetime.now().hour


# DICOM helpers -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(host: str, port: int) -> bool:
    """True when something (the running node) holds ``host:port``.

    Checked by trying to bind, not by connecting: a bare TCP connect would leave the node's SCP
    waiting for an A-ASSOCIATE-RQ until its ACSE timeout.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY, so small DIMSE PDUs are not held back by Nagle's algorithm."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:  # not TCP (tests may use other transports)
            log.debug("TCP_NODELAY not set: %s", e)


def _count_association(_event: Any, metrics: Metrics, direction: str, outcome: str) -> None:
    metrics.record_association(direction, outcome)


def _retrieve_contexts(ae: AE, model: str) -> list[Any]:
    """Request the retrieve model plus storage contexts with the SCP role (for C-GET): the SOP classes
    and transfer syntaxes the node's SCP accepts (:mod:`node.dicom_facts`)."""
    ae.add_requested_context(model)
    roles = []
    for uid in STORAGE_CLASS_UIDS:
        ae.add_requested_context(uid, list(TRANSFER_SYNTAX_UIDS))
        roles.append(build_role(uid, scp_role=True))
    return roles


class Receiver:
    """A temporary storage SCP at the node's address for C-MOVE sweeps when no node is running."""

    def __init__(self, config: Config, handler: StoreHandler, audit: AuditSink | None = None,
                 metrics: Metrics | None = None) -> None:
        node = config.node
        self.ae = AE(ae_title=node.ae_title)
        self.ae.add_supported_context(VERIFICATION)
        for uid in STORAGE_CLASS_UIDS:
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAX_UIDS))
        self.ae.maximum_pdu_size = node.max_pdu
        self.ae.network_timeout = node.network_timeout
        ctx = server_context(node.tls, config.base_dir) if node.tls.enabled else None
        policy = AccessPolicy.from_lists(node.allowed_calling_aets, node.allowed_hosts)
        self.ae.require_calling_aet = []  # the policy handler rejects, with AE@network pairs too
        handlers: list[Any] = [(evt.EVT_C_STORE, handler), (evt.EVT_CONN_OPEN, _nodelay),
                               *access_handlers(policy, audit), *client_identity_handlers(node.tls, audit)]
        if metrics is not None:
            handlers += [(evt.EVT_ACCEPTED, _count_association, [metrics, "in", "accepted"]),
                         (evt.EVT_REJECTED, _count_association, [metrics, "in", "rejected"])]
        self.server = self.ae.start_server((node.host, node.port), block=False, ssl_context=ctx,
                                           evt_handlers=handlers)
        log.info("sweep receiver %s listening on %s:%d", node.ae_title, node.host, node.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


# The sweep ---------------------------------------------------------------------------------------


class Sweeper:
    """Runs sweeps of one source; dependencies passed explicitly.

    Parameters
    ----------
    config, db
        The node's configuration and database.
    store_handler
        ``EVT_C_STORE`` handler used for C-GET sub-operations and the temporary C-MOVE receiver.
        :func:`default_store_handler` gives the node's.
    metrics, audit
        Optional recorders.
    progress
        Called with one human-readable line per step (the CLI prints them).
    hour
        Returns the local hour (tests pass a fixed one).
    """

    def __init__(self, config: Config, db: Database, store_handler: StoreHandler,
                 metrics: Metrics | None = None, audit: AuditSink | None = None,
                 progress: Progress | None = None, hour: Callable[[], int] = _local_hour) -> None:
        self.config = config
        self.db = db
        self.store_handler = store_handler
        self.metrics = metrics
        self.audit = audit
        self.progress = progress or (lambda _line: None)
        self.hour = hour
        self._stop = threading.Event()

    # Public ------------------------------------------------------------------------------------
    def source_config(self, name: str | None = None) -> SourceConfig:
        wanted = name or self.config.sweep.source
        if wanted:
            try:
                return self.config.source(wanted)
            except KeyError:
                raise SweepError(f"sweep: unknown source {wanted!r}") from None
        if not self.config.sources:
            raise SweepError("sweep: no [[sources]] configured")
        return self.config.sources[0]

    def run(self, date_from: dt.date, date_to: dt.date, dry_run: bool = False,
            source: str | None = None) -> SweepOutcome:
        src = self.source_config(source)
        d_from, d_to = date_from.strftime("%Y%m%d"), date_to.strftime("%Y%m%d")
        t0 = time.monotonic()
        sweep_id, resumed, planned_already = self._open_sweep(src.name, d_from, d_to, dry_run)
        out = SweepOutcome(sweep_id, src.name, src.retrieve, d_from, d_to, dry_run, resumed=resumed,
                           started_at=_iso_now())
        self.progress(f"sweep {sweep_id}: {src.name} ({src.ae_title}@{src.host}:{src.port}) "
                      f"{d_from}-{d_to} by C-{src.retrieve.upper()}{' (dry run)' if dry_run else ''}"
                      f"{' resuming' if resumed else ''}")
        try:
            if not planned_already:
                self._plan(sweep_id, src, d_from, d_to)
            self._execute(sweep_id, src, dry_run, out)
            out.state = SweepState.INTERRUPTED if out.stopped_reason else SweepState.DONE
        except BaseException as e:  # noqa: BLE001 - record the state, then re-raise
            out.state = SweepState.FAILED if isinstance(e, Exception) else SweepState.INTERRUPTED
            out.stopped_reason = out.stopped_reason or f"{type(e).__name__}: {e}"
            self._finish(sweep_id, out, t0)
            raise
        self._finish(sweep_id, out, t0)
        return out

    def stop(self) -> None:
        """Ask a running sweep to stop after the retrievals in flight (it is then resumable)."""
        self._stop.set()

    # Steps -------------------------------------------------------------------------------------
    def _open_sweep(self, source: str, d_from: str, d_to: str, dry_run: bool) -> tuple[int, bool, bool]:
        with self.db.session() as s:
            prev = s.scalars(select(Sweep).where(
                Sweep.source == source, Sweep.date_from == d_from, Sweep.date_to == d_to,
                Sweep.dry_run == int(dry_run),
                Sweep.state.in_((SweepState.RUNNING, SweepState.INTERRUPTED, SweepState.FAILED)))
                .order_by(Sweep.id.desc())).first()
            if prev is not None:
                pid = int(prev.report.get("pid", 0) or 0)
                host = str(prev.report.get("host", ""))
                if prev.state == SweepState.RUNNING and pid and host == socket.gethostname() and pid != os.getpid() \
                        and _pid_alive(pid):
                    raise SweepError(f"sweep {prev.id} of {source} {d_from}-{d_to} is running in process {pid}")
                report = dict(prev.report)
                report.update(pid=os.getpid(), host=socket.gethostname(),
                              resumes=int(report.get("resumes", 0)) + 1)
                prev.report = report
                prev.state = SweepState.RUNNING.value
                prev.finished_at = None
                return prev.id, True, bool(report.get("plan_ready"))
            sw = Sweep(source=source, date_from=d_from, date_to=d_to, dry_run=int(dry_run),
                       state=SweepState.RUNNING.value, report={"pid": os.getpid(), "host": socket.gethostname(), "plan_ready": False})
            s.add(sw)
            s.flush()
            return sw.id, False, False

    def _associate(self, src: SourceConfig, ae: AE, ext_neg: list[Any] | None = None,
                   handlers: list[Any] | None = None) -> Association:
        ae.acse_timeout = self.config.node.network_timeout
        ae.dimse_timeout = self.config.node.network_timeout
        ae.network_timeout = self.config.node.network_timeout
        ae.maximum_pdu_size = self.config.node.max_pdu
        # over TLS where src.tls is enabled: its CA bundle, its host name checked (node.tls)
        opened = associate(ae, src, self.config.base_dir, ext_neg=ext_neg,
                           evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *(handlers or [])])
        if self.metrics is not None:
            self.metrics.record_association("out", "accepted" if opened.ok else "rejected")
        if not opened.ok or opened.assoc is None:
            raise SweepError(f"sweep: association with {src.name}: {opened.error}")
        return opened.assoc

    def find(self, src: SourceConfig, d_from: str, d_to: str) -> tuple[int, list[RemoteSeries]]:
        """C-FIND studies in the date range, then their series of ``[sweep].modality``.

        Every C-FIND request gets an association of its own.  pynetdicom (3.0.4) loses responses
        when one association carries C-FINDs back to back: once a request's final response is in,
        the association's reactor thread wakes up and can take the first pending response of the
        next request off the queue ("Received unexpected C-FIND service message") before the
        requester reads it, and the request then ends with Success minus that match (pynetdicom
        issue #875).  On a loaded machine that silently dropped whole series from a sweep's plan.
        The series list of a study is also checked against the study's NumberOfStudyRelatedSeries
        where the PACS gives it (:meth:`find_series`).
        """
        modality = self.config.sweep.modality
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyDate = f"{d_from}-{d_to}"
        q.StudyInstanceUID = ""
        q.ModalitiesInStudy = modality
        q.AccessionNumber = ""
        q.NumberOfStudyRelatedSeries = ""
        studies: list[tuple[str, str, int | None]] = []
        for ident in self._query(src, q):
            if not ident.get("StudyInstanceUID"):
                continue
            n = ident.get("NumberOfStudyRelatedSeries")
            try:
                announced = int(n) if n not in (None, "") else None
            except (TypeError, ValueError):
                announced = None
            studies.append((str(ident.StudyInstanceUID), str(ident.get("StudyDate", "")), announced))
        studies.sort(key=lambda x: (x[1], x[0]))
        found: list[RemoteSeries] = []
        for study_uid, study_date, announced in studies:
            found.extend(self.find_series(src, study_uid, study_date, announced))
        if self.audit is not None:
            self.audit.write("query", source=src.name, level="STUDY/SERIES", study_date=f"{d_from}-{d_to}",
                              modality=modality, studies=len(studies), series=len(found))
        return len(studies), found

    def find_series(self, src: SourceConfig, study_uid: str, study_date: str = "",
                    announced: int | None = None, attempts: int = 3) -> list[RemoteSeries]:
        """The series of one study that have a ``[sweep].modality`` (all of them when it is empty).

        The query asks for every series of the study and filters on Modality here, so that the
        number of answers can be checked against ``announced`` (the study's
        NumberOfStudyRelatedSeries).  Fewer answers than announced means responses were lost on
        the way: the query is repeated on a new association, up to ``attempts`` times; after that
        the sweep goes on with what it got and logs a warning naming the study.
        """
        wanted = {m for m in self.config.sweep.modality.split("\\") if m}
        got: list[Dataset] = []
        for attempt in range(1, attempts + 1):
            q = Dataset()
            q.QueryRetrieveLevel = "SERIES"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = ""
            q.Modality = ""
            q.SeriesDescription = ""
            q.NumberOfSeriesRelatedInstances = ""
            got = [ident for ident in self._query(src, q) if ident.get("SeriesInstanceUID")]
            if announced is None or len(got) >= announced:
                break
            log.warning("sweep: study %s: %d of %d series answered by %s (attempt %d of %d)%s", study_uid,
                        len(got), announced, src.ae_title, attempt, attempts,
                        ", querying again" if attempt < attempts else ", going on with those")
        found: list[RemoteSeries] = []
        for ident in got:
            modality = str(ident.get("Modality", "") or "")
            if wanted and modality not in wanted:
                continue
            n = ident.get("NumberOfSeriesRelatedInstances")
            found.append(RemoteSeries(study_uid, str(ident.SeriesInstanceUID), modality,
                                      int(n) if n not in (None, "") else None, study_date,
                                      str(ident.get("SeriesDescription", ""))))
        return found

    def _query(self, src: SourceConfig, query: Dataset) -> list[Dataset]:
        """One C-FIND request on an association of its own (see :meth:`find`); the matches."""
        ae = AE(ae_title=self.config.node.ae_title)
        ae.add_requested_context(STUDY_ROOT_FIND)
        assoc = self._associate(src, ae)
        try:
            return list(_find(assoc, query))
        finally:
            assoc.release()

    def _plan(self, sweep_id: int, src: SourceConfig, d_from: str, d_to: str) -> None:
        n_studies, found = self.find(src, d_from, d_to)
        with self.db.session() as s:
            for r in found:
                s.add(SweepItem(sweep_id=sweep_id, study_uid=r.study_uid, series_uid=r.series_uid,
                                instances=r.instances or 0, state=SweepItemState.PENDING.value))
            sw = s.get(Sweep, sweep_id)
            assert sw is not None
            report = dict(sw.report)
            report.update(plan_ready=True, studies=n_studies)
            sw.report = report
        self.progress(f"sweep {sweep_id}: found {n_studies} studies, {len(found)} series")

    def ledger_status(self, series_uid: str, remote_instances: int | None) -> str | None:
        """``processed`` / ``present`` when the ledger already has this series and content, else None."""
        with self.db.read() as s:
            series = s.get(Series, series_uid)
            jobs = s.scalar(select(func.count()).select_from(Job).where(Job.series_uid == series_uid)) or 0
            results = s.scalar(select(func.count()).select_from(Result)
                               .where(Result.source_series_uid == series_uid)) or 0
            local = series.instances if series is not None else 0
        if series is not None and remote_instances is not None and local >= remote_instances:
            return "processed" if (jobs or results) else "present"
        if remote_instances is None and (jobs or results):
            return "processed"
        return None

    def _execute(self, sweep_id: int, src: SourceConfig, dry_run: bool, out: SweepOutcome) -> None:
        with self.db.read() as s:
            sw = s.get(Sweep, sweep_id)
            assert sw is not None
            out.studies = int(sw.report.get("studies", 0))
            items = [(i.id, i.study_uid, i.series_uid, i.instances, i.state)
                     for i in s.scalars(select(SweepItem).where(SweepItem.sweep_id == sweep_id)
                                        .order_by(SweepItem.id))]
        out.series = len(items)
        todo: list[tuple[int, str, str, int]] = []
        for item_id, study, series, n, state in items:
            if state in (SweepItemState.RETRIEVED, SweepItemState.SKIPPED):
                out.already_done += 1
                continue
            why = self.ledger_status(series, n or None)
            if why is not None:
                self._set_item(item_id, SweepItemState.SKIPPED, why)
                out.skipped += 1
                out.items.append({"series_uid": series, "state": SweepItemState.SKIPPED, "reason": why})
                continue
            if dry_run:
                self._set_item(item_id, SweepItemState.PLANNED, "")
                out.planned += 1
                out.items.append({"series_uid": series, "study_uid": study, "state": SweepItemState.PLANNED,
                                  "instances": n})
                continue
            todo.append((item_id, study, series, n))
        self.progress(f"sweep {sweep_id}: {len(todo)} to retrieve, {out.skipped} skipped"
                      f"{f', {out.already_done} done earlier' if out.already_done else ''}"
                      f"{f', {out.planned} planned (dry run)' if dry_run else ''}")
        if not todo:
            return
        cfg = self.config.sweep
        lock = threading.Lock()
        counter = [0]
        with self._receiver_if_needed(src):
            retry: list[tuple[int, str, str, int]] = []

            def work(item: tuple[int, str, str, int], last_try: bool = False) -> None:
                item_id, study, series, n = item
                if self._stop.is_set():
                    return
                if not within_hours(self.hour(), cfg.allowed_hours):
                    out.stopped_reason = f"outside allowed hours {cfg.allowed_hours[0]}-{cfg.allowed_hours[1]}"
                    self._stop.set()
                    return
                t = time.monotonic()
                try:
                    got = self.retrieve(src, study, series)
                    local = self._local_count(series)
                    if n and local < n:
                        raise SweepError(f"retrieved {got}, index holds {local} of {n} instances")
                except Exception as e:  # noqa: BLE001 - one failed series does not stop the sweep
                    log.warning("sweep %d: retrieval of series %s failed%s: %s", sweep_id, series,
                                "" if last_try else " (will retry once)", e)
                    with lock:
                        if not last_try:
                            retry.append(item)
                            out.items.append({"series_uid": series, "state": "retry", "error": str(e)})
                            return
                        self._set_item(item_id, SweepItemState.FAILED, str(e)[:500])
                        out.failed += 1
                        counter[0] += 1
                        out.items.append({"series_uid": series, "state": SweepItemState.FAILED, "error": str(e)})
                        self.progress(f"[{counter[0]}/{len(todo)}] {series}: FAILED {e}")
                    return
                self._set_item(item_id, SweepItemState.RETRIEVED, "")
                if self.metrics is not None:
                    self.metrics.record_sweep_retrieval(src.retrieve)
                if self.audit is not None:
                    self.audit.write("retrieve", source=src.name, method=src.retrieve, study_uid=study,
                                     series_uid=series, instances=got, sweep_id=sweep_id)
                with lock:
                    out.retrieved += 1
                    out.instances_retrieved += got
                    counter[0] += 1
                    out.items.append({"series_uid": series, "study_uid": study, "state": SweepItemState.RETRIEVED,
                                      "instances": got})
                    self.progress(f"[{counter[0]}/{len(todo)}] {series}: {got} instances by "
                                  f"C-{src.retrieve.upper()} in {time.monotonic() - t:.2f}s")
                if cfg.pause_seconds > 0:
                    self._stop.wait(cfg.pause_seconds)

            with ThreadPoolExecutor(max_workers=cfg.max_concurrent, thread_name_prefix="sweep") as pool:
                list(pool.map(work, todo))
            # a series that failed (PACS busy, association dropped) gets one more, sequential try
            for item in retry:
                self._stop.wait(max(cfg.pause_seconds, 1.0))
                work(item, last_try=True)
        if self._stop.is_set() and not out.stopped_reason:
            out.stopped_reason = "stopped"

    @contextmanager
    def _receiver_if_needed(self, src: SourceConfig) -> Iterator[None]:
        node = self.config.node
        receiver = None
        if src.retrieve == "move" and not (src.move_destination and src.move_destination != node.ae_title) \
                and not _listening(node.host, node.port):
            receiver = Receiver(self.config, self.store_handler, self.audit, self.metrics)
        try:
            yield
        finally:
            if receiver is not None:
                receiver.stop()

    def retrieve(self, src: SourceConfig, study_uid: str, series_uid: str) -> int:
        """Retrieve one series; returns the completed sub-operations."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = series_uid
        ae = AE(ae_title=self.config.node.ae_title)
        if src.retrieve == "move":
            ae.add_requested_context(STUDY_ROOT_MOVE)
            assoc = self._associate(src, ae)
            dest = src.move_destination or self.config.node.ae_title
            responses = assoc.send_c_move(q, dest, STUDY_ROOT_MOVE)
        else:
            roles = _retrieve_contexts(ae, STUDY_ROOT_GET)
            assoc = self._associate(src, ae, ext_neg=roles, handlers=[(evt.EVT_C_STORE, self.store_handler)])
            responses = assoc.send_c_get(q, STUDY_ROOT_GET)
        try:
            completed, failed, status = _drain(responses)
        finally:
            assoc.release()
        if status not in (0x0000, 0xB000) or failed:
            raise SweepError(f"C-{src.retrieve.upper()} of series {series_uid}: status 0x{status:04X}, "
                             f"{failed} sub-operations failed")
        return completed

    def _local_count(self, series_uid: str) -> int:
        with self.db.read() as s:
            series = s.get(Series, series_uid)
            return series.instances if series is not None else 0

    def _set_item(self, item_id: int, state: SweepItemState, error: str) -> None:
        with self.db.session() as s:
            item = s.get(SweepItem, item_id)
            assert item is not None
            item.state = state.value
            item.error = error

    def _finish(self, sweep_id: int, out: SweepOutcome, t0: float) -> None:
        out.seconds = round(time.monotonic() - t0, 3)
        out.finished_at = _iso_now()
        report = asdict(out)
        report["studies_per_minute"] = round(out.studies_per_minute, 2)
        with self.db.session() as s:
            sw = s.get(Sweep, sweep_id)
            assert sw is not None
            counts = dict(s.execute(select(SweepItem.state, func.count()).where(SweepItem.sweep_id == sweep_id)
                                    .group_by(SweepItem.state)).all())
            merged = dict(sw.report)
            merged.update({k: v for k, v in report.items() if k != "items"})
            merged["item_states"] = counts
            sw.report = merged
            sw.state = out.state
            sw.finished_at = time.time()
        report["item_states"] = counts
        folder = self.config.storage_dir / "sweeps"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"sweep-{sweep_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, path)
        if self.audit is not None:
            self.audit.write("sweep", sweep_id=sweep_id, state=out.state, source=out.source,
                              retrieved=out.retrieved, skipped=out.skipped, failed=out.failed)
        self.progress(f"sweep {sweep_id}: {out.state}{f' ({out.stopped_reason})' if out.stopped_reason else ''}: "
                      f"{out.retrieved} series retrieved ({out.instances_retrieved} instances), "
                      f"{out.skipped} skipped, {out.failed} failed, {out.planned} planned, in {out.seconds:.1f}s; "
                      f"report {path}")


def _find(assoc: Association, query: Dataset) -> Iterator[Dataset]:
    for status, ident in assoc.send_c_find(query, STUDY_ROOT_FIND):
        # pynetdicom yields an empty status Dataset when no response came (timeout, abort, lost)
        if status is None or "Status" not in status:
            raise SweepError("C-FIND: no response (connection lost or timed out)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and ident is not None:
            yield ident
        elif code != 0x0000:
            raise SweepError(f"C-FIND failed with status 0x{code:04X}")


def _drain(responses: Any) -> tuple[int, int, int]:
    completed = failed = 0
    final = 0xFFFF
    for status, _ident in responses:
        if status is None or "Status" not in status:  # pynetdicom: an empty Dataset when no response came
            raise SweepError("retrieve: no response (connection lost or timed out)")
        final = int(status.Status)
        if "NumberOfCompletedSuboperations" in status:
            completed = int(status.NumberOfCompletedSuboperations)
        if "NumberOfFailedSuboperations" in status:
            failed = int(status.NumberOfFailedSuboperations)
    return completed, failed, final


def _iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# Wiring to the node ------------------------------------------------------------------------------


def default_store_handler(config: Config, db: Database, metrics: Metrics | None = None,
                          audit: AuditSink | None = None, storage: Storage | None = None) -> StoreHandler:
    """The node's own C-STORE path (``node.handlers.handle_store``: atomic write, then index), through
    ``storage`` or else the process's one :class:`Storage` of the folder (:meth:`Storage.shared`:
    inside ``prognode serve``, the node's own)."""
    if storage is None:
        storage = Storage.shared(config.storage_dir, fsync=config.node.fsync,
                                 min_free_bytes=config.node.min_free_bytes)
    index = Index(db, config.storage_dir)
    core_audit: Any = audit if audit is not None else AuditLog(None)  # handle_store is typed with AuditLog
    core = functools.partial(handle_store, store=storage, index=index, audit=core_audit)
    return core if metrics is None else functools.partial(_metered_store, core, metrics)


def _metered_store(handler: StoreHandler, metrics: Metrics, event: Any) -> Any:
    """Call the store handler, then count the instance and its bytes when it was stored."""
    status = handler(event)
    code = int(status.Status) if isinstance(status, Dataset) else int(status)
    if code == 0x0000:
        raw: Any = getattr(event.request, "DataSet", None)
        size = raw.getbuffer().nbytes if raw is not None and hasattr(raw, "getbuffer") else 0
        metrics.record_instance(int(size))
    return status


def run_sweep(config: Config, db: Database, date_from: dt.date, date_to: dt.date, dry_run: bool = False,
              source: str | None = None, metrics: Metrics | None = None, audit: AuditSink | None = None,
              progress: Progress | None = None) -> SweepOutcome:
    storage = Storage.shared(config.storage_dir, fsync=config.node.fsync, min_free_bytes=config.node.min_free_bytes)
    try:
        handler = default_store_handler(config, db, metrics, audit, storage)
        return Sweeper(config, db, handler, metrics, audit, progress).run(date_from, date_to, dry_run, source)
    finally:
        storage.close()  # the node's stays open: it holds the object too


def open_database(config: Config) -> Database:
    """The node's database; the storage folder (home of the default SQLite file) is created first."""
    config.storage_dir.mkdir(parents=True, exist_ok=True)
    return Database(config.database_url)


def scheduled_sweep(config_json: str) -> None:
    """The apscheduler job: sweep ``[sweep].lookback_days`` up to today (a top-level function, stored by reference)."""
    config = Config.model_validate_json(config_json)
    db = open_database(config)
    try:
        today = dt.date.today()
        audit = AuditLog(config.path(config.logging.audit_file))
        out = run_sweep(config, db, today - dt.timedelta(days=config.sweep.lookback_days), today,
                        audit=audit, progress=lambda line: log.info("%s", line))
        log.info("scheduled sweep %d: %s", out.sweep_id, out.state)
    except SweepError as e:
        log.error("scheduled sweep refused: %s", e)
    finally:
        db.dispose()


def start_scheduler(config: Config, db: Database) -> Any:
    """Start the cron schedule of ``[sweep]`` (returns the running ``BackgroundScheduler``).

    The job store lives in the node's database, the job has a fixed id and is replaced at each start,
    coalesces missed runs into one and never runs twice at once: restarts make no duplicate runs.
    """
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=db.url, tablename="apscheduler_jobs")},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 3600},
    )
    scheduler.add_job(scheduled_sweep, CronTrigger.from_crontab(config.sweep.cron), id=SCHEDULER_JOB_ID,
                      name="PACS sweep", kwargs={"config_json": config.model_dump_json()},
                      replace_existing=True, coalesce=True, max_instances=1)
    scheduler.start()
    log.info("sweep schedule %r started (job store %s)", config.sweep.cron, db.url.split("://")[0])
    return scheduler


# CLI ---------------------------------------------------------------------------------------------


def _cmd_sweep(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config, overrides=list(args.set or ()))
    db = open_database(config)
    try:
        audit = AuditLog(config.path(config.logging.audit_file))
        out = run_sweep(config, db, parse_date(args.date_from), parse_date(args.date_to), args.dry_run,
                        args.source, audit=audit, progress=lambda line: print(line, flush=True))
    except (SweepError, config_mod.ConfigError, ValueError) as e:
        print(f"prognode sweep: {e}", flush=True)
        return 2
    finally:
        db.dispose()
    if args.json:
        print(json.dumps({k: v for k, v in asdict(out).items() if k != "items"}, indent=1))
    return 0 if out.state == SweepState.DONE and not out.failed else 1


def register(subparsers: Any) -> None:
    """Add ``prognode sweep`` to the node CLI (loaded through ``node.cli.EXTENSIONS``)."""
    p = subparsers.add_parser("sweep", help="query a PACS for a date range and retrieve what is missing")
    p.add_argument("--config", required=True, type=Path, help="config.toml")
    p.add_argument("--from", dest="date_from", required=True, help="first study date, YYYY-MM-DD")
    p.add_argument("--to", dest="date_to", required=True, help="last study date, YYYY-MM-DD")
    p.add_argument("--dry-run", action="store_true", help="query and check the ledger, retrieve nothing")
    p.add_argument("--source", default=None, help="[[sources]] name (default: [sweep].source, else the first)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--json", action="store_true", help="print the report summary as JSON at the end")
    p.set_defaults(func=_cmd_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.sweep sweep ...`` (the same as ``prognode sweep``)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="prognode")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
