"""The node's index and durable state, through SQLAlchemy (SQLite by default, PostgreSQL-ready).

Tables
------
instances   every stored instance (one row per SOP Instance UID), written before C-STORE success
series      one row per series: routing attributes, completion state and generation
jobs        the durable job queue: pending -> running -> done | failed -> (retry) | dead
exports     one row per (job result file, destination): C-STORE SCU attempts and dead letters
results     the ledger of objects prognode produced, with supersession links
sweeps      one row per PACS sweep, with its items in sweep_items (resumable)
notifications  the outbox of [[notify]] messages (node.notify): one row per (target, job, event)
retractions one row per retracted job: its IOCM rejection KOS, the reason, who (node.retract)
state_counts  counts by state and totals kept by triggers as rows change (node.counters)
deliveries  series each receiver is still receiving, for the others sharing the database (node.cluster)

All timestamps are UTC epoch seconds (float).  :func:`connect` brings the schema to the newest
migration (:mod:`node.schema`, ``node/migrations``): a change here ships with its migration.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from node import counters, schema

# the states stored in the tables below (re-exported: node.db.JobState is node.dicom_facts.JobState)
from node.dicom_facts import CompletionReason as CompletionReason
from node.dicom_facts import ExportState as ExportState
from node.dicom_facts import JobState as JobState
from node.dicom_facts import NotificationState as NotificationState
from node.dicom_facts import SeriesState as SeriesState
from node.dicom_facts import SweepItemState as SweepItemState
from node.dicom_facts import SweepState as SweepState
from node.lanes import Priority


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    pass


class Instance(Base):
    __tablename__ = "instances"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to the storage folder
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    position: Mapped[float | None] = mapped_column(Float, nullable=True)  # IPP projected on the slice normal (mm)
    received_at: Mapped[float] = mapped_column(Float, default=now)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    peer: Mapped[str] = mapped_column(String(64), default="")
    generation: Mapped[int] = mapped_column(Integer, default=0)  # series generation it arrived in
    frames: Mapped[int] = mapped_column(Integer, default=1)  # NumberOfFrames (multi-frame: Enhanced CT, SEG)
    expected: Mapped[int | None] = mapped_column(Integer, nullable=True)  # ImagesInAcquisition, if sent


class Series(Base):
    __tablename__ = "series"
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # routing keywords -> str
    # receiving -> complete (jobs queued) ; a late instance reopens: complete -> receiving, generation += 1
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING.value, index=True)  # SeriesState
    generation: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    expected: Mapped[int | None] = mapped_column(Integer, nullable=True)  # count announced by headers
    first_received: Mapped[float] = mapped_column(Float, default=now)
    last_received: Mapped[float] = mapped_column(Float, default=now)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    completion_reason: Mapped[str] = mapped_column(String(32), default="")  # CompletionReason
    source: Mapped[str] = mapped_column(String(16), default="")  # calling AE of the first instance


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("pipeline", "input_key", name="uq_job_input"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    series_uid: Mapped[str] = mapped_column(String(64), index=True)  # primary series of the job
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    route: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64))
    # series uids (with generations) the job reads: {"series": [{"uid":..,"generation":..,"role":..}]}
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    input_key: Mapped[str] = mapped_column(String(128))  # hash of inputs: never complete twice
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value, index=True)  # JobState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)  # retry back-off
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    worker: Mapped[str] = mapped_column(String(64), default="")
    last_image_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # for time-to-result
    result_dir: Mapped[str] = mapped_column(Text, default="")
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # lane (node.lanes.Priority): urgent jobs are claimed first, batch ones last and only in [jobs].batch_hours
    priority: Mapped[str] = mapped_column(String(16), default=Priority.NORMAL.value,
                                          server_default=Priority.NORMAL.value)
    purged_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # work folder deleted (node.retention)


class Export(Base):
    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid", name="uq_export"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=ExportState.PENDING.value, index=True)  # ExportState
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Result(Base):
    __tablename__ = "results"
    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64))  # the result's own series
    source_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    modality: Mapped[str] = mapped_column(String(16))  # SEG | SR | ...
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64))
    supersedes: Mapped[str] = mapped_column(String(64), default="")  # SOP Instance UID it replaces
    created_at: Mapped[float] = mapped_column(Float, default=now)
    in_pacs_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # first successful export


class Sweep(Base):
    __tablename__ = "sweeps"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(64))
    date_from: Mapped[str] = mapped_column(String(8))
    date_to: Mapped[str] = mapped_column(String(8))
    state: Mapped[str] = mapped_column(String(16), default=SweepState.RUNNING.value)  # SweepState
    dry_run: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class SweepItem(Base):
    __tablename__ = "sweep_items"
    __table_args__ = (UniqueConstraint("sweep_id", "series_uid", name="uq_sweep_item"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sweep_id: Mapped[int] = mapped_column(ForeignKey("sweeps.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SweepItemState.PENDING.value)  # SweepItemState
    error: Mapped[str] = mapped_column(Text, default="")


class Notification(Base):
    """One message of the [[notify]] outbox (node.notify), built when the event happens and sent
    by the notifier's thread with back-off; never blocks the job loop."""

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("target", "job_id", "event", name="uq_notification"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(String(64))  # [[notify]] name
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    event: Mapped[str] = mapped_column(String(16))  # "filed" | "dead" | "retracted"
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # what is sent (PHI only if the target asks)
    state: Mapped[str] = mapped_column(String(16), default=NotificationState.PENDING.value, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    event_at: Mapped[float] = mapped_column(Float, default=now)  # when the event happened
    created_at: Mapped[float] = mapped_column(Float, default=now)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Retraction(Base):
    """A retracted job (node.retract): its results are rejected by an IOCM Key Object Selection
    ("Rejected for Quality Reasons") sent to every destination that received them."""

    __tablename__ = "retractions"
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    kos_sop_instance_uid: Mapped[str] = mapped_column(String(64))
    kos_path: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    by: Mapped[str] = mapped_column(String(64))
    retracted: Mapped[list[str]] = mapped_column(JSON, default=list)  # SOP Instance UIDs of the rejected results
    destinations: Mapped[list[str]] = mapped_column(JSON, default=list)  # those that get the KOS
    created_at: Mapped[float] = mapped_column(Float, default=now)


class StateCount(Base):
    """A count kept by the database's triggers (:mod:`node.counters`): ``jobs.pending``, ``instances``..."""

    __tablename__ = "state_counts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)  # rows counted
    total: Mapped[int] = mapped_column(BigInteger, default=0)  # sum of the figure's total over them (bytes...)


class Delivery(Base):
    """A series that one receiver's open association is still delivering (:mod:`node.cluster`):
    the other receivers sharing the database wait for it before completing the series."""

    __tablename__ = "deliveries"
    series_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    receiver: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid
    until: Mapped[float] = mapped_column(Float)  # lease: ignored after this (a receiver that died)


Index("ix_jobs_state_not_before", Job.state, Job.not_before)
# time windows of the metrics' histograms
WINDOW_INDEXES = (Index("ix_series_completed_at", Series.completed_at), Index("ix_jobs_finished_at", Job.finished_at),
                  Index("ix_results_in_pacs_at", Result.in_pacs_at),
                  Index("ix_exports_sent_at", Export.sent_at))  # node.notify: results filed since its last look


class Database:
    """Engine plus session factory; pass it explicitly to whoever needs the index."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # isolation_level=None + BEGIN IMMEDIATE: writers queue on busy_timeout instead of
            # failing with "database is locked" when a read transaction tries to upgrade.
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_S, "check_same_thread": False, "isolation_level": None}
        else:  # a server: connections that died with it (a restart) are replaced, not handed out
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin_immediate)
        # the schema: Alembic migrations up to the newest (node.schema, node/migrations), then the
        # counters' triggers (made by the baseline; again here for a database adopted without them)
        schema.migrate(self.engine)
        counters.install(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._readers = sessionmaker(self.engine.execution_options(prognode_read_only=True),
                                     expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction: on SQLite a deferred BEGIN, so polling never holds the write lock."""
        with self._readers() as s, s.begin():
            yield s

    def dispose(self) -> None:
        self.engine.dispose()


SQLITE_BUSY_S = 30.0  # how long a connection waits for another's lock (busy_timeout, and the WAL switch below)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_S * 1000)}")
    _sqlite_wal(cur)
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable against process crashes
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_wal(cur: Any) -> None:
    """``PRAGMA journal_mode=WAL``, retried while SQLite answers "database is locked".

    Switching a new database file to WAL needs it to itself, and SQLite answers the switch at once, without its
    busy handler, while another connection opens the same file: four receivers starting together on a new index
    failed 7 times in 100 that way.  The mode is stored in the file, so once one connection has switched it the
    others find WAL already set."""
    deadline = time.monotonic() + SQLITE_BUSY_S
    delay = 0.005
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(2.0 * delay, 0.25)


def _sqlite_begin_immediate(conn: Any) -> None:
    read_only = conn.get_execution_options().get("prognode_read_only", False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def connect(url: str) -> Database:
    return Database(url)
