"""Logging set-up and the audit trail: one JSON object per line, appended and flushed.

The audit file is what a hospital keeps: associations (accepted, rejected, released,
aborted), every instance stored or refused, every job transition and every export
attempt.  Each line has ``ts`` (UTC ISO 8601), ``event`` and the event's fields.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.config import LoggingConfig

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


class AuditLog:
    """Append-only JSON-lines audit file; safe to share between threads."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, default=str, ensure_ascii=False) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                os.write(fd, line.encode("utf-8"))
            finally:
                os.close(fd)
