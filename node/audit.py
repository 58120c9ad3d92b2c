"""Audit log in JSON lines: who sent or queried what, what was exported where.

One JSON object per line, ``{"ts": "<UTC ISO 8601>", "event": "...", ...fields}``, written with one
``write`` per record (optionally fsynced) so that a hospital can keep, rotate and ship the file.  Safe to
share between threads; several processes may append to the same file (each record is a single
``write`` of one line on a file opened in append mode).

Events written by prognode (fields are keyword arguments): ``association_accepted`` /
``association_rejected`` / ``association_released`` / ``association_aborted`` (calling_ae, peer,
called_ae, reason), ``instance_stored`` / ``instance_refused`` (calling_ae, peer, SOP instance, series,
status), ``echo``, ``series_complete``, ``job_*``, ``export_sent`` / ``export_failed`` (job, destination,
SOP instance), ``resend`` (job_id, by), ``web_signin`` (client, ok, access) / ``web_signout``
(client, access) from the dashboard, and from sweeps ``query`` (source, date range, matches),
``retrieve`` (source, method, series, instances) and ``sweep`` (sweep_id, state, counts).

This is the only audit writer: ``node.logs.AuditLog`` is this class, re-exported for the node core.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol


class AuditSink(Protocol):
    """What writers of audit records need (:class:`AuditLog`, or any object with the same ``write``)."""

    def write(self, event: str, **fields: Any) -> None: ...


def utc_now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class AuditLog:
    """Append-only JSON-lines audit file.

    Parameters
    ----------
    path
        The audit file; its folder is created.  ``None`` disables auditing (records are dropped).
    fsync
        Also fsync after each record (the trail then survives power loss, at one more fsync per
        stored instance); default False: records survive a crash of the process.
    """

    def __init__(self, path: Path | None, fsync: bool = False) -> None:
        self.path = path
        self._fsync = fsync
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> None:
        """Append one record; values that JSON cannot encode are written as strings."""
        if self.path is None:
            return
        entry: dict[str, Any] = {"ts": utc_now_iso(), "event": event}
        entry.update(fields)
        line = json.dumps(entry, default=str, ensure_ascii=False) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    # The node core's handlers call ``write``; same record.
    write = record

    def read(self) -> list[dict[str, Any]]:
        """All records (for tests and the dashboard)."""
        if self.path is None or not self.path.exists():
            return []
        out: list[dict[str, Any]] = []
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.append(json.loads(line))
        return out
