"""Series completion: by the SOP classes' own rule, geometry first, quiet time as the fallback.

How a series completes depends on the SOP classes of its instances (:mod:`node.dicom_facts`,
never a UID prefix):

- single-frame images (CT): their slices form a contiguous, evenly spaced stack that agrees with any
  count the headers announce (ImagesInAcquisition) -- reason ``geometry`` or ``count``;
- multi-frame images (Enhanced CT, Legacy Converted Enhanced CT): each instance holds its volume --
  ``multiframe``;
- non-image objects (SEG, RTSTRUCT, SR, KOS): each instance is whole when it arrives -- ``object``;
  objects in a series of images are left out of the images' geometry;

and then nothing new arrived for ``settle_seconds`` and no association that delivered it is still
open.  A series whose images cannot decide completes after ``quiet_seconds`` (``quiet``).
An instance that arrives later reopens the series (see :meth:`node.index.Index.record_instance`).
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from node.audit import AuditLog
from node.config import CompletionConfig
from node.db import Database, Instance, Job, Series, now
from node.dicom_facts import Completion, CompletionReason, SeriesState, completion_of
from node.routing import Router

logger = logging.getLogger(__name__)

SPACING_REL_TOL = 0.01  # slice gaps may differ from their median by 1 % ...
SPACING_ABS_TOL = 0.02  # ... or 0.02 mm, whichever is larger
DUPLICATE_MM = 1e-3


@dataclass(frozen=True)
class SliceInfo:
    position: float | None
    frames: int
    completion: Completion = Completion.STACK  # the rule of the instance's SOP class


def geometry_reason(slices: Sequence[SliceInfo], expected: int | None) -> CompletionReason | None:
    """Why the series is complete by its own evidence, or None.

    Objects (SEG, RTSTRUCT, SR) are whole on arrival: a series of objects only is complete
    (``object``); in a series with images they are left out.  Multi-frame images each hold a volume
    (``multiframe``).  Single-frame images need a contiguous, evenly spaced stack (``geometry``)
    that agrees with ``expected`` when the headers announce a count (``count``).
    """
    if not slices:
        return None
    images = [s for s in slices if s.completion is not Completion.OBJECT]
    if not images:
        return CompletionReason.OBJECT
    if all(s.completion is Completion.MULTIFRAME or s.frames > 1 for s in images):
        return CompletionReason.MULTIFRAME
    positions = [s.position for s in images]
    if any(p is None for p in positions) or any(s.frames > 1 for s in images):
        return None
    ps = sorted(p for p in positions if p is not None)
    if expected is not None and len(ps) != expected:
        return None
    if len(ps) == 1:
        return CompletionReason.COUNT if expected == 1 else None
    gaps = [b - a for a, b in zip(ps, ps[1:], strict=False)]
    if min(gaps) < DUPLICATE_MM:
        return None
    d = statistics.median(gaps)
    tol = max(SPACING_REL_TOL * d, SPACING_ABS_TOL)
    if any(abs(g - d) > tol for g in gaps):
        return None
    return CompletionReason.COUNT if expected is not None else CompletionReason.GEOMETRY


def decide(slices: Sequence[SliceInfo], expected: int | None, idle: float, settle: float,
           quiet: float) -> CompletionReason | None:
    """The completion reason for a series idle for ``idle`` seconds, or None (keep waiting)."""
    reason = geometry_reason(slices, expected)
    if reason is not None and idle >= settle:
        return reason
    if idle >= quiet:
        return CompletionReason.QUIET
    return None


class CompletionMonitor:
    """Polls receiving series, completes them and queues their jobs in one transaction."""

    def __init__(self, db: Database, cfg: CompletionConfig, router: Router, audit: AuditLog,
                 on_jobs: Callable[[list[int]], None] | None = None,
                 busy: Callable[[], set[str]] | None = None,
                 on_complete: Callable[[str, str], list[int]] | None = None) -> None:
        self.db = db
        # after the completing transaction: (series UID, modality) -> jobs it queued (level markers)
        self.on_complete = on_complete
        self.busy = busy  # series an open association is still delivering (wait for its release)
        self.cfg = cfg
        self.router = router
        self.audit = audit
        self.on_jobs = on_jobs

    def scan(self, t: float | None = None) -> list[str]:
        """Complete every series that is ready now; returns their UIDs."""
        t = now() if t is None else t
        with self.db.read() as s:
            candidates = s.execute(select(Series.series_uid, Series.last_received).where(
                Series.state == SeriesState.RECEIVING, Series.last_received <= t - self.cfg.settle_seconds)).all()
        done: list[str] = []
        busy = self.busy() if self.busy is not None else set()
        for uid, last in candidates:
            if uid in busy and t - last < self.cfg.quiet_seconds:
                continue
            if self._try_complete(uid, last, t):
                done.append(uid)
        return done

    def _try_complete(self, uid: str, last: float, t: float) -> bool:
        with self.db.session() as s:
            series = s.get(Series, uid, with_for_update=True)  # PostgreSQL: one receiver decides, the others wait
            if series is None or series.state != SeriesState.RECEIVING or series.last_received != last:
                return False
            rows = s.execute(select(Instance.position, Instance.frames, Instance.sop_class_uid)
                             .where(Instance.series_uid == uid)).all()
            slices = [SliceInfo(p, f or 1, completion_of(c)) for p, f, c in rows]
            reason = decide(slices, series.expected, t - last, self.cfg.settle_seconds, self.cfg.quiet_seconds)
            if reason is None:
                return False
            series.state = SeriesState.COMPLETE.value
            series.completed_at = t
            series.completion_reason = reason.value
            jobs: list[Job] = self.router.on_series_complete(s, series)
            job_ids = [j.id for j in jobs]
            modality = series.modality
            info = dict(series_uid=uid, study_uid=series.study_uid, generation=series.generation,
                        instances=series.instances, reason=reason.value,
                        latency_s=round(t - last, 3), jobs=job_ids)
        logger.info("series %s complete (%s, %d instances, generation %d, %.2f s after last image): jobs %s",
                    uid, reason, info["instances"], info["generation"], t - last, job_ids or "none")
        self.audit.write("series_complete", **info)
        for j in job_ids:
            self.audit.write("job_pending", job_id=j, series_uid=uid)
        if self.on_complete is not None:
            try:
                job_ids = job_ids + self.on_complete(uid, modality)
            except Exception:  # a marker that cannot be read never stops completion
                logger.exception("series %s: after-completion hook failed", uid)
        if self.on_jobs and job_ids:
            self.on_jobs(job_ids)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.scan()
            except Exception:
                logger.exception("completion scan failed")
            stop.wait(self.cfg.poll_seconds)
