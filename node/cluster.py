"""Several receivers sharing one database and storage folder (``prognode serve`` on each host or port).

What must hold for the whole cluster, and where it is decided:

- a series completes once: :meth:`node.completion.CompletionMonitor` locks the series row
  (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers) and
  re-reads its state, and :meth:`node.index.Index.record_instance` locks it too, so an instance
  recorded by one receiver and the completion decided by another never interleave;
- each job is created once (the unique ``(pipeline, input_key)`` in the same transaction as the
  completion) and claimed once (:meth:`node.jobs.JobQueue.claim`, ``FOR UPDATE SKIP LOCKED``);
- completion waits for associations still delivering the series on any receiver:
  :class:`Deliveries` publishes this receiver's open associations' series in the ``deliveries``
  table (a lease row per series and receiver) and reads the others'.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from sqlalchemy import delete, select

from node.db import Database, Delivery, now

logger = logging.getLogger(__name__)

LEASE_FLOOR_SECONDS = 2.0  # a delivery row lasts at least this long without being refreshed
PRUNE_AFTER_SECONDS = 60.0  # rows of receivers gone this long are removed by whoever publishes next


def receiver_name() -> str:
    """This receiver: ``host:pid`` (as :attr:`node.jobs.JobManager.worker_name`)."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


class Deliveries:
    """The series any receiver of the cluster is still receiving (:meth:`busy`, for
    :class:`node.completion.CompletionMonitor`).  This receiver's own come from ``local_busy``
    (its open associations); they are written only when they change or their lease needs renewing,
    so a receiver with nothing open costs one read per poll."""

    def __init__(self, db: Database, local_busy: Callable[[], set[str]], poll_seconds: float,
                 receiver: str | None = None) -> None:
        self.db = db
        self.local_busy = local_busy
        self.receiver = receiver or receiver_name()
        self.lease = max(LEASE_FLOOR_SECONDS, 8 * poll_seconds)
        self._published: set[str] = set()
        self._refreshed = 0.0

    def busy(self) -> set[str]:
        mine = self.local_busy()
        t = now()
        if mine != self._published or (mine and t - self._refreshed > self.lease / 2):
            try:
                self._publish(mine, t)
            except Exception:  # the next poll tries again; completion still sees this receiver's own
                logger.exception("could not publish the series this receiver is receiving")
        with self.db.read() as s:
            others = s.scalars(select(Delivery.series_uid).where(Delivery.receiver != self.receiver,
                                                                 Delivery.until > t)).all()
        return mine | set(others)

    def _publish(self, mine: set[str], t: float) -> None:
        with self.db.session() as s:
            s.execute(delete(Delivery).where(Delivery.receiver == self.receiver))
            s.execute(delete(Delivery).where(Delivery.until < t - PRUNE_AFTER_SECONDS))
            s.add_all(Delivery(series_uid=uid, receiver=self.receiver, until=t + self.lease) for uid in sorted(mine))
        self._published, self._refreshed = set(mine), t

    def close(self) -> None:
        """Remove this receiver's rows (a clean stop)."""
        with self.db.session() as s:
            s.execute(delete(Delivery).where(Delivery.receiver == self.receiver))
        self._published = set()
