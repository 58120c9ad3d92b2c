"""Lanes of the job queue: ``urgent``, ``normal`` and ``batch``, and the hours a lane may run.

A route's ``priority`` (``[[routes]] priority``, default ``normal``; a series a sweep retrieved gets
``[sweep] priority``, default ``batch``, unless its route names one) is stored on each job
(``jobs.priority``).  :meth:`node.jobs.JobQueue.claim` takes the runnable job of the first lane in
:data:`LANE_ORDER` (urgent, then normal, then batch; the oldest first within a lane), and a batch job
only within ``[jobs] batch_hours`` (local time of the node).  So a batch job starts only when no urgent
or normal job is ready to run; a batch job already running is not interrupted.

This module imports the standard library only (``node.config`` uses it).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from enum import StrEnum


class Priority(StrEnum):
    """``jobs.priority``: the lane of a job (the string stored)."""

    URGENT = "urgent"
    NORMAL = "normal"
    BATCH = "batch"


LANE_ORDER: tuple[Priority, ...] = (Priority.URGENT, Priority.NORMAL, Priority.BATCH)  # claimed in this order
RANK: dict[str, int] = {p.value: i for i, p in enumerate(LANE_ORDER)}

_HHMM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class HoursWindow:
    """A daily window of local time, ``"HH:MM-HH:MM"``; it wraps past midnight when the end is earlier
    than the start (``"19:00-07:00"``); ``"00:00-24:00"`` is all day; equal ends are refused."""

    start: int  # minutes after midnight, 0..1439
    end: int  # minutes after midnight, 1..1440

    @classmethod
    def parse(cls, text: str) -> HoursWindow:
        m = _HHMM.match(text)
        if m is None:
            raise ValueError(f"{text!r}: expected HH:MM-HH:MM in local time, e.g. 19:00-07:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if h1 > 23 or m1 > 59 or m2 > 59 or end > 24 * 60 or (h2 == 24 and m2):
            raise ValueError(f"{text!r}: not a time of day (00:00 to 24:00)")
        if start == end % (24 * 60) and not (start == 0 and end == 24 * 60):
            raise ValueError(f"{text!r}: empty window (use 00:00-24:00 for all day)")
        return cls(start, end)

    def contains(self, when: dt.datetime | None = None) -> bool:
        """Whether ``when`` (default: now, local time of the node) is inside the window."""
        t = when if when is not None else dt.datetime.now()
        minute = t.hour * 60 + t.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


def check_hours(text: str) -> str:
    """Validator for config fields holding an :class:`HoursWindow`."""
    HoursWindow.parse(text)
    return text


def claimable(batch_hours: HoursWindow, when: dt.datetime | None = None) -> tuple[str, ...]:
    """The lanes a worker may take a job from now: all of them inside ``batch_hours``, else urgent and normal."""
    lanes = LANE_ORDER if batch_hours.contains(when) else LANE_ORDER[:-1]
    return tuple(p.value for p in lanes)
