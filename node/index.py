"""Index operations over :mod:`node.db`: instances, series, and what the other modules ask of them.

The C-STORE handler calls :meth:`Index.record_instance` after the file is on disk and
before it answers success.  An instance arriving for a series that is already complete
reopens it and bumps its generation, so the series is completed (and routed) again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import select, text
from sqlalchemy.engine import Dialect

from node import counters
from node.db import Database, Instance, Series, SeriesState, now

logger = logging.getLogger(__name__)

# Attributes kept per series for routing (`[[routes]] when`), besides any keyword a route names.
ROUTING_KEYWORDS = (
    "Modality", "SOPClassUID", "SeriesDescription", "StudyDescription", "BodyPartExamined", "ProtocolName",
    "Manufacturer", "ManufacturerModelName", "StationName", "InstitutionName", "ConvolutionKernel",
    "ContrastBolusAgent", "ImageType", "SliceThickness", "SeriesNumber", "PatientID", "AccessionNumber",
)


# What InstanceMeta reads besides the routing keywords.
META_KEYWORDS = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality",
    "SeriesDescription", "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames",
    "ImagesInAcquisition",
)

class _Statement:
    """A plain SQL statement compiled once per dialect and run on the transaction's DB-API cursor.

    ``record_instance`` runs on every received instance; SQLAlchemy's per-execute work (result
    objects, events, parameter processing) cost several times the SQL itself there.  The
    statement still goes through SQLAlchemy's compiler, so the paramstyle is the dialect's own
    (qmark for SQLite, pyformat for psycopg)."""

    def __init__(self, sql: str) -> None:
        self.clause = text(sql)
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def run(self, dialect: Dialect, cur: Any, params: dict[str, Any]) -> Any:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            c = self.clause.compile(dialect=dialect)
            positions = tuple(c.positiontup) if c.positional and c.positiontup is not None else None
            compiled = self._compiled[dialect.name] = (c.string, positions)
        sql, positions = compiled
        cur.execute(sql, [params[k] for k in positions] if positions is not None else params)
        return cur


# The statements of Index.record_instance, built once (plain SQL that SQLite and PostgreSQL share).
_SELECT_SERIES = _Statement("SELECT state, generation FROM series WHERE series_uid = :uid")
# PostgreSQL: the series row stays locked until commit, so completion (node.completion, which locks
# it too) never decides while another receiver records an instance of the series
_LOCK_SERIES = _Statement("SELECT state, generation FROM series WHERE series_uid = :uid FOR UPDATE")
_SELECT_INSTANCE = _Statement("SELECT sha256, series_uid, generation FROM instances WHERE sop_instance_uid = :sop")
_DELETE_INSTANCE = _Statement("DELETE FROM instances WHERE sop_instance_uid = :sop")
_INSTANCE_COLUMNS = ("sop_instance_uid", "series_uid", "study_uid", "sop_class_uid", "transfer_syntax", "path",
                     "size", "sha256", "instance_number", "position", "received_at", "calling_ae", "peer",
                     "generation", "frames", "expected")
_INSTANCE_UPDATED = ("transfer_syntax", "path", "size", "sha256", "instance_number", "position", "received_at",
                     "calling_ae", "peer", "generation", "frames")
_UPSERT_INSTANCE = _Statement(
    f"INSERT INTO instances ({', '.join(_INSTANCE_COLUMNS)}) VALUES ({', '.join(':' + c for c in _INSTANCE_COLUMNS)})"
    f" ON CONFLICT (sop_instance_uid) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _INSTANCE_UPDATED)}")
_SERIES_COLUMNS = ("series_uid", "study_uid", "patient_id", "modality", "description", "attributes", "state",
                   "generation", "instances", "expected", "first_received", "last_received", "completed_at",
                   "completion_reason", "source")
_INSERT_SERIES = _Statement(  # attributes: JSON text, as SQLAlchemy's JSON type writes it
    f"INSERT INTO series ({', '.join(_SERIES_COLUMNS)}) VALUES ({', '.join(':' + c for c in _SERIES_COLUMNS)})"
    " ON CONFLICT (series_uid) DO NOTHING")
_UPDATE_SERIES = _Statement("UPDATE series SET instances = instances + :inc, last_received = COALESCE(:t, last_received),"
                      " expected = COALESCE(:expected, expected) WHERE series_uid = :uid")
_REOPEN_SERIES = _Statement("UPDATE series SET state = :state, generation = :generation, completed_at = NULL,"
                      " completion_reason = '' WHERE series_uid = :uid")


class InvalidInstance(ValueError):
    """The dataset cannot be stored: the message says why (fits an ErrorComment)."""


def _uid(values: Mapping[str, str], keyword: str) -> str:
    value = values.get(keyword, "").strip()
    if not value:
        raise InvalidInstance(f"empty {keyword}")
    if not UID(value).is_valid:
        raise InvalidInstance(f"invalid {keyword} {value[:40]!r}")
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class InstanceMeta:
    """What the index needs from one instance, read once in the handler."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    patient_id: str = ""
    modality: str = ""
    description: str = ""
    instance_number: int | None = None
    position: float | None = None
    frames: int = 1
    expected: int | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dataset(cls, ds: Dataset, extra_keywords: Iterable[str] = ()) -> InstanceMeta:
        """Read and validate; raises :class:`InvalidInstance` naming what is wrong."""
        return cls.from_text(cls.text_of(ds, extra_keywords), extra_keywords)

    @staticmethod
    def text_of(ds: Dataset, extra_keywords: Iterable[str] = ()) -> dict[str, str]:
        """The text of each attribute :meth:`from_text` reads that ``ds`` has."""
        return {kw: _text(ds.get(kw)) for kw in (*META_KEYWORDS, *ROUTING_KEYWORDS, *extra_keywords) if kw in ds}

    @classmethod
    def from_text(cls, values: Mapping[str, str], extra_keywords: Iterable[str] = ()) -> InstanceMeta:
        """From the text of each attribute present (multiple values joined by backslashes), as
        :class:`node.header.HeaderReader` reads it; raises :class:`InvalidInstance`."""
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                   if not values.get(k, "").strip()]
        if missing:
            raise InvalidInstance("empty " + ", ".join(missing))
        sop = _uid(values, "SOPInstanceUID")
        sop_class = _uid(values, "SOPClassUID")
        study = _uid(values, "StudyInstanceUID")
        series = _uid(values, "SeriesInstanceUID")
        expected = _int(values.get("ImagesInAcquisition"))
        attributes = {kw: values[kw][:256] for kw in (*ROUTING_KEYWORDS, *extra_keywords) if kw in values}
        return cls(
            sop_instance_uid=sop, sop_class_uid=sop_class, study_uid=study, series_uid=series,
            patient_id=values.get("PatientID", "")[:64], modality=values.get("Modality", "")[:16],
            description=values.get("SeriesDescription", ""), instance_number=_int(values.get("InstanceNumber")),
            position=_position(values.get("ImagePositionPatient"), values.get("ImageOrientationPatient")),
            frames=max(1, _int(values.get("NumberOfFrames")) or 1),
            expected=expected if expected is not None and expected > 0 else None, attributes=attributes,
        )


def _int(text: str | None) -> int | None:
    """An IS value as an int (None when absent, empty or not a number)."""
    if text is None or not text.strip():
        return None
    try:
        return int(text.strip())
    except ValueError:
        try:
            return int(float(text))  # IS written as '1.0' by some writers
        except ValueError:
            return None


def slice_position(ds: Dataset) -> float | None:
    """ImagePositionPatient projected on the slice normal (mm), or None (no or odd geometry)."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    return _position(None if ipp is None else _text(ipp), None if iop is None else _text(iop))


def _position(ipp_text: str | None, iop_text: str | None) -> float | None:
    if not ipp_text or not iop_text:
        return None
    ipp, iop = ipp_text.split("\\"), iop_text.split("\\")
    if len(ipp) != 3 or len(iop) != 6:
        return None
    try:
        r = [float(v) for v in iop[:3]]
        c = [float(v) for v in iop[3:]]
        p = [float(v) for v in ipp]
    except ValueError:
        return None
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return n[0] * p[0] + n[1] * p[1] + n[2] * p[2]


@dataclass(frozen=True)
class Recorded:
    series_uid: str
    generation: int
    reopened: bool
    duplicate: bool  # same SOP Instance UID and same bytes as before


@dataclass(frozen=True)
class SeriesView:
    series_uid: str
    study_uid: str
    modality: str
    state: str
    generation: int
    instances: int
    last_received: float
    completed_at: float | None
    completion_reason: str


class Index:
    """Index operations; every method is one transaction."""

    def __init__(self, db: Database, storage_root: Path) -> None:
        self.db = db
        self.root = storage_root

    def record_instance(self, meta: InstanceMeta, path: str, size: int, sha256: str, transfer_syntax: str,
                        calling_ae: str = "", peer: str = "") -> Recorded:
        """Index one stored instance in one short transaction of plain SQL statements.

        The common case (an instance new to a series that is receiving) is four statements built
        once: read the series' state, look the SOP Instance UID up, ``INSERT ... ON CONFLICT`` the
        instance (SQLite and PostgreSQL), and bump the series' counter in place.  No ORM unit of
        work: that cost more than the SQL itself on every instance.
        """
        t = now()
        engine = self.db.engine
        dialect = engine.dialect
        raw = engine.raw_connection()  # a pooled DB-API connection: no Connection/Transaction objects
        try:
            cur = raw.cursor()
            try:
                if dialect.name == "sqlite":
                    cur.execute("BEGIN IMMEDIATE")  # as Database's begin hook: take the write lock now
                rec = self._record(dialect, cur, meta, path, size, sha256, transfer_syntax, calling_ae, peer, t)
                raw.commit()
                return rec
            except BaseException:
                raw.rollback()
                raise
            finally:
                cur.close()
        finally:
            raw.close()  # back to the pool

    def _record(self, dialect: Dialect, cur: Any, meta: InstanceMeta, path: str, size: int, sha256: str,
                transfer_syntax: str, calling_ae: str, peer: str, t: Any) -> Recorded:
        select_series = _LOCK_SERIES if dialect.name == "postgresql" else _SELECT_SERIES
        row = select_series.run(dialect, cur, {"uid": meta.series_uid}).fetchone()
        if row is None:
            _INSERT_SERIES.run(dialect, cur, {
                "series_uid": meta.series_uid, "study_uid": meta.study_uid, "patient_id": meta.patient_id,
                "modality": meta.modality, "description": meta.description,
                "attributes": json.dumps(dict(meta.attributes)), "state": SeriesState.RECEIVING.value, "generation": 0,
                "instances": 0, "expected": meta.expected, "first_received": t, "last_received": t,
                "completed_at": None, "completion_reason": "", "source": calling_ae})
            row = select_series.run(dialect, cur, {"uid": meta.series_uid}).fetchone()
        state, generation = str(row[0]), int(row[1])
        old = _SELECT_INSTANCE.run(dialect, cur, {"sop": meta.sop_instance_uid}).fetchone()
        duplicate = old is not None and old[0] == sha256 and old[1] == meta.series_uid
        reopened = state != SeriesState.RECEIVING and not duplicate
        if reopened:
            generation += 1
            _REOPEN_SERIES.run(dialect, cur, {"uid": meta.series_uid, "generation": generation,
                                                "state": SeriesState.RECEIVING.value})
        if old is not None and old[1] != meta.series_uid:
            # moved to another series: the old row goes (as before, the old series keeps its count)
            _DELETE_INSTANCE.run(dialect, cur, {"sop": meta.sop_instance_uid})
            old = None
        _UPSERT_INSTANCE.run(dialect, cur, {
            "sop_instance_uid": meta.sop_instance_uid, "series_uid": meta.series_uid,
            "study_uid": meta.study_uid, "sop_class_uid": meta.sop_class_uid,
            "transfer_syntax": transfer_syntax, "path": path, "size": size, "sha256": sha256,
            "instance_number": meta.instance_number, "position": meta.position, "received_at": t,
            "calling_ae": calling_ae, "peer": peer,
            "generation": int(old[2]) if duplicate and old is not None else generation,
            "frames": meta.frames, "expected": meta.expected})
        _UPDATE_SERIES.run(dialect, cur, {"uid": meta.series_uid, "inc": 1 if old is None else 0,
                                    "t": None if duplicate else t, "expected": meta.expected})
        return Recorded(meta.series_uid, generation, reopened, duplicate)

    def reindex_from_disk(self, since: float = 0.0, extra_keywords: Iterable[str] = ()) -> int:
        """Index the instance files that the index lacks; returns how many.

        The files are the source of truth: each was fsynced before its C-STORE success, while the
        SQLite index (WAL, ``synchronous=NORMAL``) may lose its last commits on power loss.  Files
        last modified before ``since`` (epoch seconds) are skipped, so a recovery can look at the
        recent ones only.  A series that gains instances here is reopened as on any late arrival.
        """
        import pydicom  # only here: the handler never reads files back

        added = 0
        for path in self._files_since(since):
            if path.stat().st_mtime < since or self.has_instance(path.stem):
                continue
            try:
                data = path.read_bytes()
                ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
                meta = InstanceMeta.from_dataset(ds, extra_keywords)
            except Exception as e:
                logger.warning("re-index: skipping %s: %s: %s", path, type(e).__name__, e)
                continue
            self.record_instance(meta, str(path.relative_to(self.root)), len(data), hashlib.sha256(data).hexdigest(),
                                 str(ds.file_meta.get("TransferSyntaxUID", "")),
                                 str(ds.file_meta.get("SourceApplicationEntityTitle", "") or ""))
            added += 1
        if added:
            logger.info("re-index: %d instance files were missing from the index", added)
        return added

    def _files_since(self, since: float) -> Iterator[Path]:
        """Instance files in series folders changed at or after ``since`` (a rename into a folder
        updates its mtime), so that a recovery does not stat every file of a large archive."""
        for study in sorted(p for p in (self.root / "instances").iterdir() if p.is_dir() and not p.name.startswith(".")):
            for series in sorted(p for p in study.iterdir() if p.is_dir()):
                if series.stat().st_mtime >= since:
                    yield from sorted(series.glob("*.dcm"))

    # Queries -----------------------------------------------------------------------
    def series_files(self, series_uid: str) -> list[Path]:
        with self.db.read() as s:
            rows = s.scalars(select(Instance.path).where(Instance.series_uid == series_uid)
                             .order_by(Instance.position, Instance.instance_number)).all()
        return [self.root / r for r in rows]

    def study_files(self, study_uid: str, exclude_series: Iterable[str] = (),
                    modalities: Iterable[str] = ("SEG", "RTSTRUCT", "SR")) -> list[Path]:
        excluded = set(exclude_series)
        with self.db.read() as s:
            rows = s.execute(select(Instance.path, Instance.series_uid).join(
                Series, Series.series_uid == Instance.series_uid).where(
                Instance.study_uid == study_uid, Series.modality.in_(list(modalities)))).all()
        return [self.root / p for p, uid in rows if uid not in excluded]

    def series(self, series_uid: str) -> SeriesView | None:
        with self.db.read() as s:
            row = s.get(Series, series_uid)
            return _view(row) if row is not None else None

    def all_series(self, limit: int = 1000) -> list[SeriesView]:
        with self.db.read() as s:
            rows = s.scalars(select(Series).order_by(Series.last_received.desc()).limit(limit)).all()
            return [_view(r) for r in rows]

    def instance_count(self) -> int:
        """Instances in the index (the counter the database keeps, :mod:`node.counters`)."""
        with self.db.read() as s:
            return counters.read_counters(s.connection())["instances:count"]

    def has_instance(self, sop_instance_uid: str) -> bool:
        with self.db.read() as s:
            return s.get(Instance, sop_instance_uid) is not None

    def has_instance_safely(self, sop_instance_uid: str) -> bool:
        """Like :meth:`has_instance`, but False when the index cannot be read."""
        try:
            return self.has_instance(sop_instance_uid)
        except Exception:
            return False


def _view(r: Series) -> SeriesView:
    return SeriesView(r.series_uid, r.study_uid, r.modality, r.state, r.generation, r.instances,
                      r.last_received, r.completed_at, r.completion_reason)
