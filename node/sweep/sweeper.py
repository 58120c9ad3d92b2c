"""The sweep: plan (:mod:`node.sweep.plan`), skip what the ledger has, retrieve the rest (:mod:`node.sweep.retrieve`).

Throttled: ``max_concurrent`` retrievals at once, ``pause_seconds`` between retrievals of a worker,
retrieval only within ``allowed_hours`` (outside them the sweep stops as ``interrupted`` and the next
run resumes it).  Resumable: a sweep of the same source and range that is ``running`` (its process gone),
``interrupted`` or ``failed`` is resumed: the plan is reused, retrieved and skipped items are not redone.
A series whose retrieval fails is tried once more at the end.  Progress lines go to the ``progress``
callback (the CLI prints them); the report is written to ``<storage>/sweeps/sweep-<id>.json`` and kept in
``sweeps.report``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import func, select

from node.audit import AuditSink
from node.config import Config, DicomwebSourceConfig, SourceConfig
from node.db import Database, Sweep, SweepItem
from node.dicom_facts import SweepItemState, SweepState
from node.metrics import Metrics
from node.storage import Storage
from node.sweep import dicomweb, plan
from node.sweep.plan import (
    Progress,
    Query,
    RemoteSeries,
    SweepError,
    SweepOutcome,
    iso_now,
    local_hour,
    within_hours,
)
from node.sweep.retrieve import (
    Source,
    StoreHandler,
    check_move_destination,
    default_store_handler,
    describe,
    method_label,
    method_of,
    retrieve_dimse,
    retrieve_wado,
)
from node.tls import associate

log = logging.getLogger(__name__)


def _nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY, so small DIMSE PDUs are not held back by Nagle's algorithm."""
    import socket

    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:  # not TCP (tests may use other transports)
            log.debug("TCP_NODELAY not set: %s", e)


class Sweeper:
    """Runs sweeps of one source; dependencies passed explicitly.

    Parameters
    ----------
    config, db
        The node's configuration and database.
    store_handler
        ``EVT_C_STORE`` handler for C-GET sub-operations and WADO-RS instances (C-MOVE delivers to the
        running node's SCP). :func:`node.sweep.retrieve.default_store_handler` gives the node's.
    metrics, audit
        Optional recorders.
    progress
        Called with one human-readable line per step (the CLI prints them).
    hour
        Returns the local hour (tests pass a fixed one).
    """

    def __init__(self, config: Config, db: Database, store_handler: StoreHandler,
                 metrics: Metrics | None = None, audit: AuditSink | None = None,
                 progress: Progress | None = None, hour: Callable[[], int] = local_hour) -> None:
        self.config = config
        self.db = db
        self.store_handler = store_handler
        self.metrics = metrics
        self.audit = audit
        self.progress = progress or (lambda _line: None)
        self.hour = hour
        self._stop = threading.Event()
        self._clients: dict[str, Any] = {}  # DICOMweb clients by thread and source name
        self._clients_lock = threading.Lock()

    # Public ------------------------------------------------------------------------------------
    def source_config(self, name: str | None = None) -> Source:
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
        sweep_id, resumed, planned_already = plan.open_sweep(self.db, src.name, d_from, d_to, dry_run)
        out = SweepOutcome(sweep_id, src.name, method_of(src), d_from, d_to, dry_run, resumed=resumed,
                           started_at=iso_now())
        self.progress(f"sweep {sweep_id}: {src.name} ({describe(src)}) "
                      f"{d_from}-{d_to} by {method_label(src)}{' (dry run)' if dry_run else ''}"
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

    def query(self, src: Source) -> Query:
        """The source's :class:`node.sweep.plan.Query`: C-FIND or QIDO-RS."""
        if isinstance(src, DicomwebSourceConfig):
            return dicomweb.DicomwebQuery(self.client(src), src)
        return plan.DimseQuery(self.config.node.ae_title, lambda ae: self._associate(src, ae))

    def client(self, src: DicomwebSourceConfig) -> Any:
        """The source's DICOMweb client, one per source and thread (a requests session is not shared between
        the sweep's concurrent retrievals)."""
        key = f"{threading.get_ident()}:{src.name}"
        with self._clients_lock:
            c = self._clients.get(key)
            if c is None:
                try:
                    c = self._clients[key] = dicomweb.client(src, self.config.base_dir)
                except dicomweb.DicomwebError as e:
                    raise SweepError(str(e)) from e
            return c

    def find(self, src: Source, d_from: str, d_to: str) -> tuple[int, list[RemoteSeries]]:
        """Studies in the date range with ``[sweep].modality``, then their series of that modality (see
        :mod:`node.sweep.plan`)."""
        modality = self.config.sweep.modality
        studies = plan.remote_studies(self.query(src).studies({"StudyDate": f"{d_from}-{d_to}",
                                                                "ModalitiesInStudy": modality}))
        found: list[RemoteSeries] = []
        for st in studies:
            found.extend(self.find_series(src, st.study_uid, st.study_date, st.announced_series))
        if self.audit is not None:
            self.audit.write("query", source=src.name, level="STUDY/SERIES", study_date=f"{d_from}-{d_to}",
                             modality=modality, studies=len(studies), series=len(found))
        return len(studies), found

    def find_series(self, src: Source, study_uid: str, study_date: str = "", announced: int | None = None,
                    attempts: int = 3, modalities: set[str] | None = None) -> list[RemoteSeries]:
        """The series of one study of ``modalities`` (default ``[sweep].modality``; empty: all), checked against
        ``announced`` (:func:`node.sweep.plan.find_series`)."""
        wanted = modalities if modalities is not None else {m for m in self.config.sweep.modality.split("\\") if m}
        return plan.find_series(self.query(src), describe(src), study_uid, wanted, study_date, announced, attempts)

    def _plan(self, sweep_id: int, src: Source, d_from: str, d_to: str) -> None:
        n_studies, found = self.find(src, d_from, d_to)
        plan.save_plan(self.db, sweep_id, n_studies, found)
        self.progress(f"sweep {sweep_id}: found {n_studies} studies, {len(found)} series")

    def ledger_status(self, series_uid: str, remote_instances: int | None) -> str | None:
        """``processed`` / ``present`` when the ledger already has this series and content, else None."""
        return plan.ledger_status(self.db, series_uid, remote_instances)

    def _execute(self, sweep_id: int, src: Source, dry_run: bool, out: SweepOutcome) -> None:
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
                plan.set_item(self.db, item_id, SweepItemState.SKIPPED, why)
                out.skipped += 1
                out.items.append({"series_uid": series, "state": SweepItemState.SKIPPED, "reason": why})
                continue
            if dry_run:
                plan.set_item(self.db, item_id, SweepItemState.PLANNED, "")
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
        check_move_destination(self.config, src)  # C-MOVE: the node's SCP must be listening
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
                local = plan.local_count(self.db, series)
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
                    plan.set_item(self.db, item_id, SweepItemState.FAILED, str(e)[:500])
                    out.failed += 1
                    counter[0] += 1
                    out.items.append({"series_uid": series, "state": SweepItemState.FAILED, "error": str(e)})
                    self.progress(f"[{counter[0]}/{len(todo)}] {series}: FAILED {e}")
                return
            plan.set_item(self.db, item_id, SweepItemState.RETRIEVED, "")
            if self.metrics is not None:
                self.metrics.record_sweep_retrieval(method_of(src))
            if self.audit is not None:
                self.audit.write("retrieve", source=src.name, method=method_of(src), study_uid=study,
                                 series_uid=series, instances=got, sweep_id=sweep_id)
            with lock:
                out.retrieved += 1
                out.instances_retrieved += got
                counter[0] += 1
                out.items.append({"series_uid": series, "study_uid": study, "state": SweepItemState.RETRIEVED,
                                  "instances": got})
                self.progress(f"[{counter[0]}/{len(todo)}] {series}: {got} instances by "
                              f"{method_label(src)} in {time.monotonic() - t:.2f}s")
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

    def retrieve(self, src: Source, study_uid: str, series_uid: str = "") -> int:
        """Retrieve one series (C-MOVE and C-GET: or a whole study without ``series_uid``); the instances
        retrieved (C-MOVE: the PACS's completed sub-operations)."""
        if isinstance(src, DicomwebSourceConfig):
            if not series_uid:
                raise SweepError("WADO-RS retrieval goes series by series")
            return retrieve_wado(self.config, src, self.client(src), self.store_handler, study_uid, series_uid,
                                 self.audit)
        return retrieve_dimse(self.config, src, self._associate, self.store_handler, study_uid, series_uid)

    def _finish(self, sweep_id: int, out: SweepOutcome, t0: float) -> None:
        out.seconds = round(time.monotonic() - t0, 3)
        out.finished_at = iso_now()
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
