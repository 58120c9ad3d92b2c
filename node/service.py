"""Wiring for ``prognode serve``: storage, index, SCP, completion, jobs and export.

:class:`Node` owns one thread per loop (completion, jobs, export) plus the SCP's
acceptor; :meth:`Node.stop` stops accepting, lets in-flight associations finish, then
stops the loops and the worker pool.  Interrupted jobs resume on the next start.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from node.audit import AuditLog
from node.cluster import Deliveries
from node.completion import CompletionMonitor
from node.config import Config, TlsConfig
from node.db import Database
from node.export import Exporter
from node.index import Index
from node.jobs import JobManager, JobQueue, Runner
from node.lanes import HoursWindow
from node.notify import Notifier
from node.ops import Operations
from node.reader import LevelMarkers
from node.retention import Retention
from node.retention import start_scheduler as start_retention
from node.routing import Router
from node.runners import build_runner
from node.server import DicomServer, route_keywords
from node.storage import Storage
from node.sweep.retrieve import in_flight as sweep_in_flight
from node.tls import client_identity_handlers, server_context
from node.watermark import association_handlers, attach, detach, for_node

logger = logging.getLogger(__name__)

# Foreground server only: a short GIL switch interval lets the thread that finished an fsync or a
# SQLite commit get back to answering the C-STORE sooner (the default 5 ms adds up per instance).
SERVE_SWITCH_INTERVAL = 0.0005


def server_ssl_context(tls: TlsConfig, base: Config) -> ssl.SSLContext | None:
    """TLS for the SCP when ``[node.tls] enabled`` (built by :func:`node.tls.server_context`)."""
    if not tls.enabled:
        return None
    return server_context(tls, base.base_dir)


RUNNING_MARK = "node.running"  # in the storage folder while a node runs; left behind by an unclean stop
RECOVERY_SLACK_SECONDS = 60.0  # files this much older than the last start are looked at too (clock steps)


class Node:
    """The running node; ``start()`` then ``stop()``, or ``serve()`` in the foreground."""

    def __init__(self, config: Config, runner: Runner | None = None,
                 factories: Mapping[str, str] | None = None) -> None:
        self.config = config
        # the process's one Storage of the folder: a sweep inside serve (C-GET) writes through it too
        self.storage = Storage.shared(config.storage_dir, config.node.fsync, config.node.min_free_bytes)
        self.db = Database(config.database_url)
        self.index = Index(self.db, config.storage_dir)
        self.audit = AuditLog(config.path(config.logging.audit_file))
        self.router = Router(config.routes, sweep_priority=config.sweep.priority)
        self.queue = JobQueue(self.db, self.audit, config.jobs.max_attempts, config.jobs.retry_seconds,
                              config.jobs.lease_seconds, batch_hours=HoursWindow.parse(config.jobs.batch_hours))
        self.runner: Runner | None = runner
        self._factories = dict(factories or {})
        self.exporter = Exporter(self.db, config, self.audit, config.completion.poll_seconds)
        self.notifier = Notifier(self.db, config, self.index, self.audit, config.completion.poll_seconds)
        # operations (issue 6): metrics on the SCP's events, web dashboard/REST/metrics, sweep schedule
        self.ops = Operations(config, self.db, self.audit)
        # retention and the disk watermarks (issue 14): purge on the schedule and below the first mark
        self.retention = Retention(config, self.db, self.audit)
        self.watermark = for_node(config, self.audit, self.retention)
        attach(self.storage, self.watermark)
        self._retention_scheduler: Any = None
        self.server = DicomServer(config, self.storage, self.index, self.audit,
                                  server_ssl_context(config.node.tls, config),
                                  extra_handlers=[*self.ops.metrics.scp_handlers(),  # calling AE <-> client cert:
                                                  *client_identity_handlers(config.node.tls, self.audit),
                                                  *association_handlers(self.watermark, self.audit)])
        self.jobs: JobManager | None = None
        self.completion: CompletionMonitor | None = None
        self.markers: LevelMarkers | None = None
        self.deliveries: Deliveries | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> Node:
        self._recover_index()
        self.storage.sweep_temporaries()
        self.queue.recover()
        if self.runner is None:  # [runner] kind: a local process pool, or a Ray cluster
            self.runner = build_runner(self.config, self._factories)
        self.jobs = JobManager(self.config, self.queue, self.index, self.storage, self.runner, self._factories,
                               on_done=lambda _id: self.exporter.wake.set())
        jobs = self.jobs
        own = (self.jobs.identity.manufacturer, self.jobs.identity.device_serial_number)
        self.markers = LevelMarkers(self.db, self.index, self.router, self.audit, own_devices=[own])
        # series this receiver or another sharing the database is still receiving (node.cluster)
        self.deliveries = Deliveries(self.db, lambda: self.server.open_associations.busy() | sweep_in_flight(),
                                     self.config.completion.poll_seconds)
        self.completion = CompletionMonitor(self.db, self.config.completion, self.router, self.audit,
                                            on_jobs=lambda _ids: jobs.wake.set(),
                                            busy=self.deliveries.busy,
                                            on_complete=self.markers.on_series_complete)
        self.server.start()
        loops = [("completion", self.completion.run), ("jobs", self.jobs.run), ("export", self.exporter.run),
                 ("watermark", self.watermark.run)]
        if self.config.notify:  # [[notify]] targets: their own thread (node.notify), never the job loop's
            loops.append(("notify", self.notifier.run))
        for name, target in loops:
            t = threading.Thread(target=target, args=(self._stop,), name=f"prognode-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.ops.start()
        if self.config.retention.enabled:
            self._retention_scheduler = start_retention(self.retention)
        self._running_mark.write_text(f"{os.getpid()}\n")
        self.audit.write("node_started", ae_title=self.config.node.ae_title, port=self.port)
        return self

    @property
    def _running_mark(self) -> Path:
        return self.config.storage_dir / RUNNING_MARK

    def _recover_index(self) -> None:
        """After a stop that was not clean (the mark of the last run is still there: kill -9, a crash,
        power loss), index the instance files the index lacks: the files were fsynced before
        their success status, the index's last commits may be gone (WAL, ``synchronous=NORMAL``)."""
        mark = self._running_mark
        if not mark.exists():
            return
        since = mark.stat().st_mtime - RECOVERY_SLACK_SECONDS
        added = self.index.reindex_from_disk(since, route_keywords(self.config))
        logger.warning("the last run did not stop cleanly: %d instance files received since it started "
                       "were missing from the index and are indexed again", added)
        self.audit.write("index_recovered", instances=added, since=since)

    def stop(self, timeout: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("stopping: no new associations; waiting for in-flight ones")
        self.server.stop(timeout)
        self.ops.stop()
        if self._retention_scheduler is not None:
            self._retention_scheduler.shutdown(wait=False)
            self._retention_scheduler = None
        self._stop.set()
        if self.jobs is not None:
            self.jobs.wake.set()
        self.exporter.wake.set()
        self.notifier.wake.set()
        for t in self._threads:
            t.join(timeout)
        if self.deliveries is not None:
            try:
                self.deliveries.close()
            except Exception:  # the database is gone: the rows' leases run out by themselves
                logger.exception("could not remove this receiver's delivery rows")
        if self.runner is not None:
            # running jobs are not waited for: they are pending again at the next start
            self.runner.shutdown(wait=False)
        self.ops.stop()
        detach(self.storage, self.watermark)
        self.storage.close()  # after the SCP and the jobs: removes the temporary files made ahead of time
        self._running_mark.unlink(missing_ok=True)  # a clean stop: no recovery at the next start
        self.audit.write("node_stopped")
        self.db.dispose()
        logger.info("stopped")

    def serve(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT."""
        done = threading.Event()

        def _signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        sys.setswitchinterval(SERVE_SWITCH_INTERVAL)
        self.start()
        # What start-up built (modules, config, pydicom's dictionaries, SQLAlchemy's metadata) lives
        # as long as the process: out of the collector's way, a full collection takes milliseconds,
        # not the ~100 ms that would stall one C-STORE in a few hundred.
        gc.collect()
        gc.freeze()
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
