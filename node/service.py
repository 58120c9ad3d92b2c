"""Wiring for ``prognode serve``: storage, index, SCP, completion, jobs and export.

:class:`Node` owns one thread per loop (completion, jobs, export) plus the SCP's
acceptor; :meth:`Node.stop` stops accepting, lets in-flight associations finish, then
stops the loops and the worker pool.  Interrupted jobs resume on the next start.
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading
from collections.abc import Mapping
from types import FrameType

from node.audit import AuditLog
from node.completion import CompletionMonitor
from node.config import Config, TlsConfig
from node.db import Database
from node.export import Exporter
from node.index import Index
from node.jobs import JobManager, JobQueue, LocalProcessRunner, Runner, pipeline_modules
from node.ops import Operations
from node.routing import Router
from node.server import DicomServer
from node.storage import Storage
from node.tls import server_context

logger = logging.getLogger(__name__)

# Foreground server only: a short GIL switch interval lets the thread that finished an fsync or a
# SQLite commit get back to answering the C-STORE sooner (the default 5 ms adds up per instance).
SERVE_SWITCH_INTERVAL = 0.0005


def server_ssl_context(tls: TlsConfig, base: Config) -> ssl.SSLContext | None:
    """TLS for the SCP when ``[node.tls] enabled`` (built by :func:`node.tls.server_context`)."""
    if not tls.enabled:
        return None
    return server_context(tls, base.base_dir)


class Node:
    """The running node; ``start()`` then ``stop()``, or ``serve()`` in the foreground."""

    def __init__(self, config: Config, runner: Runner | None = None,
                 factories: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.storage = Storage(config.storage_dir, config.node.fsync, config.node.min_free_bytes)
        self.db = Database(config.database_url)
        self.index = Index(self.db, config.storage_dir)
        self.audit = AuditLog(config.path(config.logging.audit_file))
        self.router = Router(config.routes)
        self.queue = JobQueue(self.db, self.audit, config.jobs.max_attempts, config.jobs.retry_seconds,
                              config.jobs.lease_seconds)
        self.runner: Runner | None = runner
        self._factories = dict(factories or {})
        self.exporter = Exporter(self.db, config, self.audit, config.completion.poll_seconds)
        # operations (issue 6): metrics on the SCP's events, web dashboard/REST/metrics, sweep schedule
        self.ops = Operations(config, self.db, self.audit)
        self.server = DicomServer(config, self.storage, self.index, self.audit,
                                  server_ssl_context(config.node.tls, config),
                                  extra_handlers=self.ops.metrics.scp_handlers())
        self.jobs: JobManager | None = None
        self.completion: CompletionMonitor | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> Node:
        self.storage.sweep_temporaries()
        self.queue.recover()
        if self.runner is None:
            names = [p for r in self.config.routes for p in r.pipelines]
            self.runner = LocalProcessRunner(self.config.jobs.workers,
                                             preload=pipeline_modules(names, self._factories),
                                             log_level=self.config.logging.level)
        self.jobs = JobManager(self.config, self.queue, self.index, self.storage, self.runner, self._factories,
                               on_done=lambda _id: self.exporter.wake.set())
        jobs = self.jobs
        self.completion = CompletionMonitor(self.db, self.config.completion, self.router, self.audit,
                                            on_jobs=lambda _ids: jobs.wake.set(),
                                            busy=self.server.open_associations.busy)
        self.server.start()
        for name, target in (("completion", self.completion.run), ("jobs", self.jobs.run),
                             ("export", self.exporter.run)):
            t = threading.Thread(target=target, args=(self._stop,), name=f"prognode-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.ops.start()
        self.audit.write("node_started", ae_title=self.config.node.ae_title, port=self.port)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("stopping: no new associations; waiting for in-flight ones")
        self.server.stop(timeout)
        self.ops.stop()
        self._stop.set()
        if self.jobs is not None:
            self.jobs.wake.set()
        self.exporter.wake.set()
        for t in self._threads:
            t.join(timeout)
        if self.runner is not None:
            # running jobs are not waited for: they are pending again at the next start
            self.runner.shutdown(wait=False)
        self.ops.stop()
        self.storage.close()  # after the SCP and the jobs: removes the temporary files made ahead of time
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
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()
