"""Export of results to each destination, whatever its kind, with back-off, dead letters and probes.

How a file travels is the destination's sender (:mod:`node.transports`: C-STORE for ``kind = "dimse"``,
STOW-RS for ``kind = "dicomweb"``); everything below (when to send, retry, give up, probe) is here, once,
for every kind.  A failure the sender calls permanent (e.g. an HTTP 4xx but 408/429, a STOW-RS
FailedSOPSequence reason that is not a lack of resources) is a dead letter at once, and a probe does
not requeue it.

Each (result file, destination) is one row in ``exports`` (states: :class:`node.db.ExportState`).
A pending row whose ``next_attempt_at`` has come is sent.  A failed attempt is retried with
exponential back-off (see :func:`retry_delay`: ``retry_seconds`` doubled at each failure, capped
at ``retry_max_seconds``, lengthened at random by up to ``retry_jitter``); once the nominal delays
add up to the destination's ``dead_letter_after_seconds`` (default 24 h), or after
``max_attempts`` when set, the row is ``dead`` (``prognode resend JOB_ID`` queues it again).
A DIMSE destination with ``tls.enabled`` gets its results (and its probes) over DICOM TLS
(:func:`node.tls.associate`: its CA bundle, its host name checked, our client certificate where it wants one);
a DICOMweb one with an ``https`` URL is verified with the same ``tls`` table.

A destination that cannot be reached (the association fails, the HTTP request gets no answer) is
probed (C-ECHO, or a QIDO-RS request) every
``probe_seconds`` while it has results waiting or dead letters; when it answers, the waiting
results are due at once and its dead letters are pending again (attempts reset), so a PACS that
was down for days gets everything once it is back, without anyone resending.  A dead letter
whose file cannot be read is not requeued by a probe.

Each destination has its own thread (:meth:`Exporter.run`): a slow or unreachable destination
never holds up the others.  The first successful send of a result sets ``results.in_pacs_at``.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import func, select, update

from node import transports
from node.audit import AuditLog
from node.config import Config, DestinationBase
from node.db import Database, Export, ExportState, Result, now
from node.transports import Destination

logger = logging.getLogger(__name__)

BATCH = 64  # results read and sent per association: a backlog after an outage is sent in bounded memory
UNREADABLE = "cannot read "  # start of the error of a result file that cannot be read (never requeued by a probe)
REFUSED = "refused for good: "  # start of the error of a permanent failure (never requeued by a probe)


def nominal_delay(dest: DestinationBase, attempts: int) -> float:
    """The delay after the ``attempts``-th failed attempt before jitter: ``retry_seconds`` doubled
    at each failure, at most ``retry_max_seconds``."""
    if attempts >= 64:  # 2**63 * anything positive is past any cap
        return dest.retry_max_seconds
    return float(min(dest.retry_max_seconds, dest.retry_seconds * 2.0 ** max(0, attempts - 1)))


def retry_delay(dest: DestinationBase, attempts: int, rng: random.Random | None = None) -> float:
    """The delay after the ``attempts``-th failed attempt: the nominal one lengthened at random by up
    to ``retry_jitter`` of itself (senders that failed together do not retry together), never
    beyond ``retry_max_seconds``; so it is at least the nominal delay and at most the cap."""
    d = nominal_delay(dest, attempts)
    u = (rng or random).random()
    return min(dest.retry_max_seconds, d * (1.0 + dest.retry_jitter * u))


def backed_off(dest: DestinationBase, attempts: int) -> float:
    """The nominal delays after the first ``attempts`` failures, added up: at most the time from the
    first failure to the attempt that follows the ``attempts``-th one (the delays are never shorter
    than nominal)."""
    total = 0.0
    for n in range(1, attempts + 1):
        d = nominal_delay(dest, n)
        total += d
        if d >= dest.retry_max_seconds:  # the rest are all at the cap
            total += d * (attempts - n)
            break
    return total


def is_dead_letter(dest: DestinationBase, attempts: int) -> bool:
    """After ``attempts`` failed attempts: out of back-off (the nominal delays waited so far reach
    ``dead_letter_after_seconds``) or of ``max_attempts`` (when set)?"""
    if dest.max_attempts and attempts >= dest.max_attempts:
        return True
    return backed_off(dest, attempts - 1) >= dest.dead_letter_after_seconds


@dataclass(frozen=True)
class Pending:
    id: int
    job_id: int
    destination: str
    path: str
    sop_instance_uid: str
    attempts: int


class _WakeAll:
    """``set()`` wakes every destination's thread (a job is done: results to send)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[threading.Event] = []

    def event(self) -> threading.Event:
        e = threading.Event()
        with self._lock:
            self._events.append(e)
        return e

    def set(self) -> None:
        with self._lock:
            for e in self._events:
                e.set()


@dataclass
class _Reachability:
    """What this process knows of one destination (not stored: a restart probes again)."""

    down: bool | None = None  # None: not tried since the start
    next_probe: float = 0.0


class Exporter:
    """Sends due exports; :meth:`tick` is one pass over every destination, :meth:`run` runs one
    thread per destination until stopped."""

    def __init__(self, db: Database, config: Config, audit: AuditLog, poll_seconds: float = 0.25,
                 rng: random.Random | None = None) -> None:
        self.db = db
        self.config = config
        self.audit = audit
        self.poll_seconds = poll_seconds
        self.wake = _WakeAll()
        self.rng = rng or random.Random()
        self._reach: dict[str, _Reachability] = {d.name: _Reachability() for d in config.destinations}

    def due(self, t: float, destination: str | None = None, limit: int | None = None) -> list[Pending]:
        q = select(Export).where(Export.state == ExportState.PENDING, Export.next_attempt_at <= t)
        if destination is not None:
            q = q.where(Export.destination == destination)
        with self.db.read() as s:
            rows = s.scalars(q.order_by(Export.id).limit(limit)).all()
            return [Pending(r.id, r.job_id, r.destination, r.path, r.sop_instance_uid, r.attempts) for r in rows]

    def tick(self) -> int:
        """One pass: every destination in turn (probe when due, then send at most :data:`BATCH` of
        what is due); returns how many were sent."""
        self._unconfigured()
        return sum(self.tick_destination(dest) for dest in self.config.destinations)

    def tick_destination(self, dest: Destination) -> int:
        """Probe ``dest`` when that is due, then send its due exports (at most :data:`BATCH`);
        returns how many were sent."""
        self._probe_if_due(dest)
        items = self.claim(dest, now(), BATCH)
        return self._send(dest, items) if items else 0

    def claim(self, dest: Destination, t: float, limit: int) -> list[Pending]:
        """Take the due exports of ``dest`` for this process: their next attempt moves past the
        longest the send can take, so another receiver sharing the database does not send them
        too (PostgreSQL: rows another receiver is taking are skipped); one that dies mid-send
        leaves them due again after that."""
        if not self.due(t, dest.name, 1):  # a read first: no write transaction at every idle poll
            return []
        with self.db.session() as s:
            rows = s.scalars(select(Export).where(Export.state == ExportState.PENDING, Export.next_attempt_at <= t,
                                                  Export.destination == dest.name)
                             .order_by(Export.id).limit(limit).with_for_update(skip_locked=True)).all()
            hold = t + dest.timeout_seconds * (len(rows) + 2)  # opening, every C-STORE, releasing
            out = [Pending(r.id, r.job_id, r.destination, r.path, r.sop_instance_uid, r.attempts) for r in rows]
            for r in rows:
                r.next_attempt_at = hold
        return out

    def _unconfigured(self) -> None:
        """Pending exports to a destination no longer in the configuration are dead letters."""
        names = [d.name for d in self.config.destinations]
        with self.db.read() as s:
            rows = s.scalars(select(Export).where(Export.state == ExportState.PENDING,
                                                  Export.destination.not_in(names))).all()
            items = [Pending(r.id, r.job_id, r.destination, r.path, r.sop_instance_uid, r.attempts) for r in rows]
        for p in items:
            self._failed([p], None, f"destination {p.destination!r} is no longer configured")

    # C-ECHO probes -----------------------------------------------------------------------------
    def _probe_if_due(self, dest: Destination) -> None:
        reach = self._reach.setdefault(dest.name, _Reachability())
        if reach.down is False or now() < reach.next_probe:
            return
        reach.next_probe = now() + dest.probe_seconds  # also the pace of the look-up below
        # unknown since the start: only dead letters are a reason to probe (pending ones are simply tried)
        waiting = self._undelivered(dest.name, include_pending=reach.down is True)
        if not waiting:
            return
        sender = transports.sender_for(dest, self.config)
        ok, why = sender.echo()
        if not ok:
            reach.down = True
            logger.info("export: %s (%s) still unreachable: %s; %d results wait", dest.name, sender.describe(),
                        why, waiting)
            return
        reach.down = False
        requeued, hastened = self._requeue(dest.name)
        logger.warning("export: %s answers again (%s): %d dead letters queued again, %d waiting results due now",
                       dest.name, why, requeued, hastened)
        self.audit.write("export_destination_up", destination=dest.name, dead_letters_requeued=requeued,
                         pending_hastened=hastened)

    def _undelivered(self, destination: str, include_pending: bool) -> int:
        states = [ExportState.DEAD, ExportState.PENDING] if include_pending else [ExportState.DEAD]
        with self.db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Export).where(
                Export.destination == destination, Export.state.in_(states),
                ~Export.last_error.startswith(UNREADABLE), ~Export.last_error.startswith(REFUSED))) or 0)

    def _requeue(self, destination: str) -> tuple[int, int]:
        """The destination answers again: its dead letters go back to pending (attempts reset) and
        its waiting results are due now; returns (requeued, hastened)."""
        with self.db.session() as s:
            dead = s.execute(update(Export).where(
                Export.destination == destination, Export.state == ExportState.DEAD,
                ~Export.last_error.startswith(UNREADABLE), ~Export.last_error.startswith(REFUSED)).values(
                state=ExportState.PENDING.value, attempts=0, next_attempt_at=0.0))
            hastened = s.execute(update(Export).where(
                Export.destination == destination, Export.state == ExportState.PENDING,
                Export.attempts > 0, Export.next_attempt_at > 0.0).values(next_attempt_at=0.0))
        self.wake.set()
        return int(getattr(dead, "rowcount", 0)), int(getattr(hastened, "rowcount", 0))

    def _send(self, dest: Destination, items: Sequence[Pending]) -> int:
        datasets: list[tuple[Pending, pydicom.Dataset]] = []
        for p in items:
            try:
                datasets.append((p, pydicom.dcmread(p.path)))
            except Exception as e:
                self._failed([p], dest, f"{UNREADABLE}{Path(p.path).name}: {type(e).__name__}: {e}", final=True)
        if not datasets:
            return 0
        reach = self._reach.setdefault(dest.name, _Reachability())
        sender = transports.sender_for(dest, self.config)
        why = sender.open([ds for _, ds in datasets])
        if why:
            reach.down = True  # probed from now on
            self._failed([p for p, _ in datasets], dest, why)
            return 0
        try:
            outcomes = sender.send_all([ds for _, ds in datasets])
        finally:
            sender.close()
        reach.down = any(o.unreachable for o in outcomes)
        sent = 0
        for (p, _), outcome in zip(datasets, outcomes, strict=True):
            if outcome.ok:
                self._sent(p, dest, outcome.status)
                sent += 1
            elif outcome.permanent:
                self._failed([p], dest, f"{REFUSED}{outcome.error}", final=True)
            else:
                self._failed([p], dest, outcome.error)
        return sent

    def _sent(self, p: Pending, dest: Destination, status: str) -> None:
        t = now()
        with self.db.session() as s:
            s.execute(update(Export).where(Export.id == p.id).values(state=ExportState.SENT.value, sent_at=t,
                                                                      attempts=p.attempts + 1, last_error=""))
            s.execute(update(Result).where(Result.sop_instance_uid == p.sop_instance_uid,
                                           Result.in_pacs_at.is_(None)).values(in_pacs_at=t))
        logger.info("export job %d: %s sent to %s (status %s, attempt %d)", p.job_id, p.sop_instance_uid,
                    dest.name, status, p.attempts + 1)
        self.audit.write("export_sent", job_id=p.job_id, destination=dest.name, sop_instance_uid=p.sop_instance_uid,
                         attempt=p.attempts + 1, status=status)

    def _failed(self, items: Sequence[Pending], dest: Destination | None, error: str,
                final: bool = False) -> None:
        t = now()
        for p in items:
            attempts = p.attempts + 1
            dead = final or dest is None or is_dead_letter(dest, attempts)
            state = ExportState.DEAD if dead else ExportState.PENDING
            delay = 0.0 if dest is None or dead else retry_delay(dest, attempts, self.rng)
            with self.db.session() as s:
                s.execute(update(Export).where(Export.id == p.id).values(
                    state=state.value, attempts=attempts, last_error=error[:2000], next_attempt_at=t + delay))
            logger.warning("export job %d: %s to %s failed (attempt %d): %s%s", p.job_id, p.sop_instance_uid,
                           p.destination, attempts, error,
                           "; dead letter" if dead else f"; next attempt in {delay:.1f} s")
            self.audit.write("export_failed" if not dead else "export_dead", job_id=p.job_id,
                             destination=p.destination, sop_instance_uid=p.sop_instance_uid, attempt=attempts,
                             error=error[:500], **({} if dead else {"retry_in_s": round(delay, 3)}))

    def run(self, stop: threading.Event) -> None:
        """One thread per destination (each sends and probes its own), this one for exports to
        destinations no longer configured; returns once ``stop`` is set and the threads are done."""
        threads = [threading.Thread(target=self._run_destination, args=(dest, stop),
                                    name=f"prognode-export-{dest.name}", daemon=True)
                   for dest in self.config.destinations]
        for t in threads:
            t.start()
        wake = self.wake.event()
        while not stop.is_set():
            try:
                self._unconfigured()
            except Exception:
                logger.exception("export pass failed")
            wake.wait(max(self.poll_seconds, 1.0))
            wake.clear()
        for t in threads:
            t.join()

    def _run_destination(self, dest: Destination, stop: threading.Event) -> None:
        wake = self.wake.event()
        while not stop.is_set():
            sent = 0
            try:
                sent = self.tick_destination(dest)
            except Exception:
                logger.exception("export pass to %s failed", dest.name)
            if sent < BATCH:  # a full batch went: the next one at once
                wake.wait(self.poll_seconds)
                wake.clear()
