"""Index operations over :mod:`node.db`: instances, series, and what the other modules ask of them.

The C-STORE handler calls :meth:`Index.record_instance` after the file is on disk and
before it answers success.  An instance arriving for a series that is already complete
reopens it and bumps its generation, so the series is completed (and routed) again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import func, select

from node.db import Database, Instance, Series, now

logger = logging.getLogger(__name__)

# Attributes kept per series for routing (`[[routes]] when`), besides any keyword a route names.
ROUTING_KEYWORDS = (
    "Modality", "SOPClassUID", "SeriesDescription", "StudyDescription", "BodyPartExamined", "ProtocolName",
    "Manufacturer", "ManufacturerModelName", "StationName", "InstitutionName", "ConvolutionKernel",
    "ContrastBolusAgent", "ImageType", "SliceThickness", "SeriesNumber", "PatientID", "AccessionNumber",
)


class InvalidInstance(ValueError):
    """The dataset cannot be stored: the message says why (fits an ErrorComment)."""


def _uid(ds: Dataset, keyword: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
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
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                   if not str(ds.get(k, "") or "").strip()]
        if missing:
            raise InvalidInstance("empty " + ", ".join(missing))
        sop = _uid(ds, "SOPInstanceUID")
        sop_class = _uid(ds, "SOPClassUID")
        study = _uid(ds, "StudyInstanceUID")
        series = _uid(ds, "SeriesInstanceUID")
        number = ds.get("InstanceNumber")
        try:
            instance_number = int(number) if number not in (None, "") else None
        except (TypeError, ValueError):
            instance_number = None
        frames = 1
        try:
            frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        except (TypeError, ValueError):
            frames = 1
        expected = None
        try:
            raw = ds.get("ImagesInAcquisition")
            expected = int(raw) if raw not in (None, "") and int(raw) > 0 else None
        except (TypeError, ValueError):
            expected = None
        attributes: dict[str, str] = {}
        for kw in (*ROUTING_KEYWORDS, *extra_keywords):
            if kw in ds:
                attributes[kw] = _text(ds.get(kw))[:256]
        return cls(
            sop_instance_uid=sop, sop_class_uid=sop_class, study_uid=study, series_uid=series,
            patient_id=_text(ds.get("PatientID", ""))[:64], modality=_text(ds.get("Modality", ""))[:16],
            description=_text(ds.get("SeriesDescription", "")), instance_number=instance_number,
            position=slice_position(ds), frames=frames, expected=expected, attributes=attributes,
        )


def slice_position(ds: Dataset) -> float | None:
    """ImagePositionPatient projected on the slice normal (mm), or None (no or odd geometry)."""
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    try:
        r = [float(v) for v in iop[:3]]
        c = [float(v) for v in iop[3:]]
        p = [float(v) for v in ipp]
    except (TypeError, ValueError):
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
        t = now()
        with self.db.session() as s:
            series = s.get(Series, meta.series_uid)
            reopened = False
            if series is None:
                series = Series(series_uid=meta.series_uid, study_uid=meta.study_uid, patient_id=meta.patient_id,
                                modality=meta.modality, description=meta.description,
                                attributes=dict(meta.attributes), state="receiving", generation=0, instances=0,
                                expected=meta.expected, first_received=t, last_received=t, source=calling_ae)
                s.add(series)
                s.flush()
            old = s.get(Instance, meta.sop_instance_uid)
            duplicate = old is not None and old.sha256 == sha256 and old.series_uid == meta.series_uid
            if series.state != "receiving" and not duplicate:
                series.state = "receiving"
                series.generation += 1
                series.completed_at = None
                series.completion_reason = ""
                reopened = True
            if old is not None and old.series_uid != meta.series_uid:
                s.delete(old)
                s.flush()
                old = None
            if old is None:
                s.add(Instance(sop_instance_uid=meta.sop_instance_uid, series_uid=meta.series_uid,
                               study_uid=meta.study_uid, sop_class_uid=meta.sop_class_uid,
                               transfer_syntax=transfer_syntax, path=path, size=size, sha256=sha256,
                               instance_number=meta.instance_number, position=meta.position, received_at=t,
                               calling_ae=calling_ae, peer=peer, generation=series.generation,
                               frames=meta.frames, expected=meta.expected))
                series.instances += 1
            else:
                old.transfer_syntax, old.path, old.size, old.sha256 = transfer_syntax, path, size, sha256
                old.instance_number, old.position, old.frames = meta.instance_number, meta.position, meta.frames
                old.received_at, old.calling_ae, old.peer = t, calling_ae, peer
                if not duplicate:
                    old.generation = series.generation
            if meta.expected is not None:
                series.expected = meta.expected
            if not duplicate:
                series.last_received = t
            return Recorded(meta.series_uid, series.generation, reopened, duplicate)

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
        with self.db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

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
