"""Operations services the node runs beside its SCP: web dashboard/REST/metrics and the sweep schedule.

The node service calls, once its database and audit log exist::

    ops = Operations(config, db, audit)
    server = DicomServer(..., extra_handlers=ops.metrics.scp_handlers())
    ops.start()                                   # web if [web].enabled, cron if [sweep].enabled
    ...
    ops.stop()

``ops.metrics`` is the process's :class:`node.metrics.Metrics`; pass it to whoever records events.
"""

from __future__ import annotations

import logging
from typing import Any

from node.audit import AuditSink
from node.config import Config
from node.db import Database
from node.metrics import Metrics
from node.sweep import start_scheduler
from node.web.app import WebServer, serve_web

log = logging.getLogger(__name__)


class Operations:
    def __init__(self, config: Config, db: Database, audit: AuditSink | None = None, metrics: Metrics | None = None) -> None:
        self.config = config
        self.db = db
        self.audit: AuditSink | None = audit
        self.metrics = metrics if metrics is not None else Metrics(db)
        self.web: WebServer | None = None
        self.scheduler: Any = None

    def start(self) -> Operations:
        """Start what is enabled; a web port that cannot be bound is logged, not fatal to the DICOM node."""
        if self.config.web.enabled:
            try:
                self.web = serve_web(self.config, self.db, self.metrics, self.audit)
            except (RuntimeError, OSError) as e:
                log.error("web dashboard not started on %s:%d: %s", self.config.web.host, self.config.web.port, e)
        if self.config.sweep.enabled:
            self.scheduler = start_scheduler(self.config, self.db)
        return self

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
            self.scheduler = None
        if self.web is not None:
            self.web.stop()
            self.web = None
