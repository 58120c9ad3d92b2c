"""Export of results: C-STORE SCU to each destination, with retries and dead letters.

Each (result file, destination) is one row in ``exports``.  A pending row whose
``next_attempt_at`` has come is sent; a failure schedules the next attempt after the
destination's ``retry_seconds`` until ``max_attempts``, then the row is ``dead``
(``prognode resend JOB_ID`` queues it again).  A destination that is down when a job
finishes thus gets the results once it is back.  The first successful send of a result
sets ``results.in_pacs_at``.  A destination with ``tls.enabled`` gets its results over DICOM TLS
(:func:`node.tls.associate`: its CA bundle, its host name checked, our client certificate where it wants one).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context
from sqlalchemy import select, update

from node import tls
from node.audit import AuditLog
from node.config import Config, DestinationConfig
from node.db import Database, Export, Result, now

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class Pending:
    id: int
    job_id: int
    destination: str
    path: str
    sop_instance_uid: str
    attempts: int


def _store_status_ok(status: int) -> bool:
    return status == 0x0000 or (status & 0xF000) == 0xB000  # success or warning


class Exporter:
    """Sends due exports; :meth:`tick` is one pass, :meth:`run` loops."""

    def __init__(self, db: Database, config: Config, audit: AuditLog, poll_seconds: float = 0.25) -> None:
        self.db = db
        self.config = config
        self.audit = audit
        self.poll_seconds = poll_seconds
        self.wake = threading.Event()

    def due(self, t: float) -> list[Pending]:
        with self.db.read() as s:
            rows = s.scalars(select(Export).where(Export.state == "pending", Export.next_attempt_at <= t)
                             .order_by(Export.id)).all()
            return [Pending(r.id, r.job_id, r.destination, r.path, r.sop_instance_uid, r.attempts) for r in rows]

    def tick(self) -> int:
        """Send everything due; returns how many were sent."""
        by_dest: dict[str, list[Pending]] = defaultdict(list)
        for p in self.due(now()):
            by_dest[p.destination].append(p)
        sent = 0
        for name, items in by_dest.items():
            try:
                dest = self.config.destination(name)
            except KeyError:
                self._failed(items, None, f"destination {name!r} is no longer configured")
                continue
            sent += self._send(dest, items)
        return sent

    def _send(self, dest: DestinationConfig, items: Sequence[Pending]) -> int:
        datasets: list[tuple[Pending, pydicom.Dataset]] = []
        for p in items:
            try:
                datasets.append((p, pydicom.dcmread(p.path)))
            except Exception as e:
                self._failed([p], dest, f"cannot read {Path(p.path).name}: {type(e).__name__}: {e}", final=True)
        if not datasets:
            return 0
        ae = AE(ae_title=self.config.node.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
        for sop_class, ts in sorted(contexts)[:MAX_CONTEXTS]:
            ae.requested_contexts = [*ae.requested_contexts, build_context(sop_class, [ts])]
        opened = tls.associate(ae, dest, self.config.base_dir)  # over TLS where dest.tls is enabled
        if not opened.ok or opened.assoc is None:
            self._failed([p for p, _ in datasets], dest, opened.error)
            return 0
        assoc = opened.assoc
        sent = 0
        try:
            for p, ds in datasets:
                try:
                    rsp = assoc.send_c_store(ds)
                    status = int(getattr(rsp, "Status", -1)) if rsp is not None and "Status" in rsp else -1
                except Exception as e:
                    self._failed([p], dest, f"C-STORE error: {type(e).__name__}: {e}")
                    continue
                if status >= 0 and _store_status_ok(status):
                    self._sent(p, dest, status)
                    sent += 1
                else:
                    comment = str(rsp.get("ErrorComment", "")) if rsp is not None else ""
                    self._failed([p], dest, f"C-STORE status 0x{status & 0xFFFF:04X} {comment}".strip())
        finally:
            if assoc.is_established:
                assoc.release()
        return sent

    def _sent(self, p: Pending, dest: DestinationConfig, status: int) -> None:
        t = now()
        with self.db.session() as s:
            s.execute(update(Export).where(Export.id == p.id).values(state="sent", sent_at=t,
                                                                      attempts=p.attempts + 1, last_error=""))
            s.execute(update(Result).where(Result.sop_instance_uid == p.sop_instance_uid,
                                           Result.in_pacs_at.is_(None)).values(in_pacs_at=t))
        logger.info("export job %d: %s sent to %s (status 0x%04X, attempt %d)", p.job_id, p.sop_instance_uid,
                    dest.name, status, p.attempts + 1)
        self.audit.write("export_sent", job_id=p.job_id, destination=dest.name, sop_instance_uid=p.sop_instance_uid,
                         attempt=p.attempts + 1, status=f"0x{status:04X}")

    def _failed(self, items: Sequence[Pending], dest: DestinationConfig | None, error: str,
                final: bool = False) -> None:
        t = now()
        retry = dest.retry_seconds if dest is not None else 0.0
        limit = dest.max_attempts if dest is not None else 1
        for p in items:
            attempts = p.attempts + 1
            state = "dead" if final or dest is None or attempts >= limit else "pending"
            with self.db.session() as s:
                s.execute(update(Export).where(Export.id == p.id).values(
                    state=state, attempts=attempts, last_error=error[:2000], next_attempt_at=t + retry))
            logger.warning("export job %d: %s to %s failed (attempt %d/%d): %s%s", p.job_id, p.sop_instance_uid,
                           p.destination, attempts, limit, error, "; dead letter" if state == "dead" else "")
            self.audit.write("export_failed" if state == "pending" else "export_dead", job_id=p.job_id,
                             destination=p.destination, sop_instance_uid=p.sop_instance_uid, attempt=attempts,
                             error=error[:500])

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                logger.exception("export pass failed")
            self.wake.wait(self.poll_seconds)
            self.wake.clear()
