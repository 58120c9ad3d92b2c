"""A sweep's plan: the query (C-FIND or QIDO-RS) and the ledger (``sweeps``, ``sweep_items``, what the node has).

The query asks for the studies of a date range (STUDY level: ``StudyDate``, ``ModalitiesInStudy``), then for
the series of each study (SERIES level: ``Modality``, ``NumberOfSeriesRelatedInstances``); a study's answers
are checked against its ``NumberOfStudyRelatedSeries`` and asked again when some are missing.  A DIMSE source
gets one association per C-FIND request (pynetdicom issue #875, see :meth:`DimseQuery.find`); a DICOMweb
source the same questions as QIDO-RS searches.  The series found become ``sweep_items`` (state ``pending``)
of a ``sweeps`` row: the sweep's durable plan, which a resumed sweep reuses.

:func:`ledger_status` says whether the node already has a series with at least the remote instance count
(``present``) and whether a job or a result exists for it (``processed``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from node.db import Database, Job, Result, Series, Sweep, SweepItem
from node.dicom_facts import STUDY_ROOT_FIND, SweepItemState, SweepState

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class SweepError(RuntimeError):
    """A sweep cannot run (unknown source, PACS unreachable, another live sweep holds the range)."""


@dataclass(frozen=True)
class RemoteSeries:
    study_uid: str
    series_uid: str
    modality: str
    instances: int | None
    study_date: str = ""
    description: str = ""


@dataclass(frozen=True)
class RemoteStudy:
    study_uid: str
    study_date: str
    announced_series: int | None  # NumberOfStudyRelatedSeries, where the PACS gives it
    accession: str = ""


@dataclass
class SweepOutcome:
    """What one run of a sweep did (also the JSON report)."""

    sweep_id: int
    source: str
    method: str
    date_from: str
    date_to: str
    dry_run: bool
    state: str = SweepState.RUNNING
    resumed: bool = False
    studies: int = 0
    series: int = 0
    retrieved: int = 0  # series retrieved in this run
    instances_retrieved: int = 0
    skipped: int = 0
    planned: int = 0
    failed: int = 0
    already_done: int = 0  # items finished by an earlier run of this sweep (resume)
    stopped_reason: str = ""
    started_at: str = ""
    finished_at: str = ""
    seconds: float = 0.0
    items: list[dict[str, Any]] = field(default_factory=list)

    @property
    def studies_per_minute(self) -> float:
        return 60.0 * self.studies / self.seconds if self.seconds > 0 else 0.0


# Dates and hours ---------------------------------------------------------------------------------


def parse_date(text: str) -> dt.date:
    """``YYYY-MM-DD`` or ``YYYYMMDD``."""
    t = text.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(t, fmt).date()
        except ValueError:
            continue
    raise ValueError(f"not a date (YYYY-MM-DD): {text!r}")


def within_hours(hour: int, allowed: tuple[int, int]) -> bool:
    """``[start, end)`` local hours; ``start > end`` wraps midnight (e.g. 20-6)."""
    start, end = allowed
    if start == end or (start, end) == (0, 24):
        return True
    if start < end:
        return start <= hour < end
    return hour >= start or hour < end


def local_hour() -> int:
    return dt.datetime.now().hour


def iso_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# Queries -----------------------------------------------------------------------------------------


class Query(Protocol):
    """The two questions a sweep asks a source; matches as pydicom Datasets (C-FIND identifiers' shape)."""

    def studies(self, filters: dict[str, str]) -> list[Dataset]: ...

    def series(self, study_uid: str) -> list[Dataset]: ...


STUDY_RETURN_KEYS = ("StudyInstanceUID", "StudyDate", "AccessionNumber", "NumberOfStudyRelatedSeries")
SERIES_RETURN_KEYS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances")


class DimseQuery:
    """C-FIND (Study Root), each request on an association of its own.

    pynetdicom (3.0.4) loses responses when one association carries C-FINDs back to back: once a
    request's final response is in, the association's reactor thread wakes up and can take the first
    pending response of the next request off the queue ("Received unexpected C-FIND service message")
    before the requester reads it, and the request then ends with Success minus that match (pynetdicom
    issue #875).  On a loaded machine that silently dropped whole series from a sweep's plan.
    """

    def __init__(self, ae_title: str, associate: Callable[[AE], Association]) -> None:
        self.ae_title = ae_title
        self.associate = associate

    def _query(self, query: Dataset) -> list[Dataset]:
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(STUDY_ROOT_FIND)
        assoc = self.associate(ae)
        try:
            return list(_find(assoc, query))
        finally:
            assoc.release()

    def studies(self, filters: dict[str, str]) -> list[Dataset]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        for kw in STUDY_RETURN_KEYS:
            setattr(q, kw, "")
        for kw, value in filters.items():
            setattr(q, kw, value)
        return self._query(q)

    def series(self, study_uid: str) -> list[Dataset]:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        for kw in SERIES_RETURN_KEYS:
            setattr(q, kw, "")
        return self._query(q)


def _find(assoc: Association, query: Dataset) -> Iterator[Dataset]:
    for status, ident in assoc.send_c_find(query, STUDY_ROOT_FIND):
        # pynetdicom yields an empty status Dataset when no response came (timeout, abort, lost)
        if status is None or "Status" not in status:
            raise SweepError("C-FIND: no response (connection lost or timed out)")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and ident is not None:
            yield ident
        elif code != 0x0000:
            raise SweepError(f"C-FIND failed with status 0x{code:04X}")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def remote_studies(matches: list[Dataset]) -> list[RemoteStudy]:
    """Study matches with a StudyInstanceUID, by date then UID."""
    found = [RemoteStudy(str(m.StudyInstanceUID), str(m.get("StudyDate", "") or ""),
                         _int_or_none(m.get("NumberOfStudyRelatedSeries")), str(m.get("AccessionNumber", "") or ""))
             for m in matches if m.get("StudyInstanceUID")]
    return sorted(found, key=lambda s: (s.study_date, s.study_uid))


def find_series(query: Query, where: str, study_uid: str, modalities: set[str], study_date: str = "",
                announced: int | None = None, attempts: int = 3) -> list[RemoteSeries]:
    """The series of one study that have one of ``modalities`` (all of them when it is empty).

    The query asks for every series of the study and filters on Modality here, so that the number of
    answers can be checked against ``announced`` (the study's NumberOfStudyRelatedSeries).  Fewer answers
    than announced means responses were lost on the way: the query is repeated (on a new association),
    up to ``attempts`` times; after that the sweep goes on with what it got and logs a warning naming the
    study and ``where`` (the source)."""
    got: list[Dataset] = []
    for attempt in range(1, attempts + 1):
        got = [m for m in query.series(study_uid) if m.get("SeriesInstanceUID")]
        if announced is None or len(got) >= announced:
            break
        log.warning("sweep: study %s: %d of %d series answered by %s (attempt %d of %d)%s", study_uid,
                    len(got), announced, where, attempt, attempts,
                    ", querying again" if attempt < attempts else ", going on with those")
    found: list[RemoteSeries] = []
    for m in got:
        modality = str(m.get("Modality", "") or "")
        if modalities and modality not in modalities:
            continue
        found.append(RemoteSeries(study_uid, str(m.SeriesInstanceUID), modality,
                                  _int_or_none(m.get("NumberOfSeriesRelatedInstances")), study_date,
                                  str(m.get("SeriesDescription", "") or "")))
    return found


# The ledger --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_sweep(db: Database, source: str, d_from: str, d_to: str, dry_run: bool) -> tuple[int, bool, bool]:
    """(sweep id, resumed, plan ready): a new ``sweeps`` row, or the unfinished one of the same source and range
    (``running`` with its process gone, ``interrupted`` or ``failed``), which is resumed."""
    with db.session() as s:
        prev = s.scalars(select(Sweep).where(
            Sweep.source == source, Sweep.date_from == d_from, Sweep.date_to == d_to,
            Sweep.dry_run == int(dry_run),
            Sweep.state.in_((SweepState.RUNNING, SweepState.INTERRUPTED, SweepState.FAILED)))
            .order_by(Sweep.id.desc())).first()
        if prev is not None:
            pid = int(prev.report.get("pid", 0) or 0)
            host = str(prev.report.get("host", ""))
            if prev.state == SweepState.RUNNING and pid and host == socket.gethostname() and pid != os.getpid() \
                    and _pid_alive(pid):
                raise SweepError(f"sweep {prev.id} of {source} {d_from}-{d_to} is running in process {pid}")
            report = dict(prev.report)
            report.update(pid=os.getpid(), host=socket.gethostname(), resumes=int(report.get("resumes", 0)) + 1)
            prev.report = report
            prev.state = SweepState.RUNNING.value
            prev.finished_at = None
            return prev.id, True, bool(report.get("plan_ready"))
        sw = Sweep(source=source, date_from=d_from, date_to=d_to, dry_run=int(dry_run),
                   state=SweepState.RUNNING.value,
                   report={"pid": os.getpid(), "host": socket.gethostname(), "plan_ready": False})
        s.add(sw)
        s.flush()
        return sw.id, False, False


def save_plan(db: Database, sweep_id: int, n_studies: int, found: list[RemoteSeries]) -> None:
    with db.session() as s:
        for r in found:
            s.add(SweepItem(sweep_id=sweep_id, study_uid=r.study_uid, series_uid=r.series_uid,
                            instances=r.instances or 0, state=SweepItemState.PENDING.value))
        sw = s.get(Sweep, sweep_id)
        assert sw is not None
        report = dict(sw.report)
        report.update(plan_ready=True, studies=n_studies)
        sw.report = report


def ledger_status(db: Database, series_uid: str, remote_instances: int | None) -> str | None:
    """``processed`` / ``present`` when the ledger already has this series and content, else None."""
    with db.read() as s:
        series = s.get(Series, series_uid)
        jobs = s.scalar(select(func.count()).select_from(Job).where(Job.series_uid == series_uid)) or 0
        results = s.scalar(select(func.count()).select_from(Result)
                           .where(Result.source_series_uid == series_uid)) or 0
        local = series.instances if series is not None else 0
    if series is not None and remote_instances is not None and local >= remote_instances:
        return "processed" if (jobs or results) else "present"
    if remote_instances is None and (jobs or results):
        return "processed"
    return None


def local_count(db: Database, series_uid: str) -> int:
    with db.read() as s:
        series = s.get(Series, series_uid)
        return series.instances if series is not None else 0


def set_item(db: Database, item_id: int, state: SweepItemState, error: str) -> None:
    with db.session() as s:
        item = s.get(SweepItem, item_id)
        assert item is not None
        item.state = state.value
        item.error = error
