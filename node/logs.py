"""Logging set-up for command-line processes, and the audit trail's writer re-exported.

The audit file is what a hospital keeps: associations (accepted, rejected, released,
aborted), every instance stored or refused, every job transition and every export
attempt.  Each line has ``ts`` (UTC ISO 8601), ``event`` and the event's fields; the
writer is ``node.audit.AuditLog``.
"""

from __future__ import annotations

import logging
from pathlib import Path

# The one audit writer lives in node.audit; it is re-exported here because the node core
# (node.handlers, node.server, ...) imports ``node.logs.AuditLog``.
from node.audit import AuditLog
from node.config import LoggingConfig

__all__ = ["FORMAT", "AuditLog", "setup_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(cfg: LoggingConfig, file: Path | None = None) -> None:
    """Configure the root logger once for a command-line process."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    logging.basicConfig(level=cfg.level.upper(), format=FORMAT, handlers=handlers, force=True)
    for noisy in ("pynetdicom", "pynetdicom.events", "pynetdicom.acse", "pynetdicom.dul", "pynetdicom.assoc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
