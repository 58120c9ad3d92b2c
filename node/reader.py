"""A reader-confirmed level: a radiologist names the L3 (or C3) slice, prognode recomputes from it.

Three ways in, one job queue:

- the REST API, ``POST /api/series/{uid}/level`` (:func:`request_level`, ``source="api"``);
- a level marker from the viewer: a TID 1500 SR (as OHIF 3.13 saves it through dcmjs) whose
  measurement labelled "L3" or "C3" is drawn on one image of a CT series that prognode holds.
  :class:`LevelMarkers` reads every SR series once it is complete (the completion thread, never
  the C-STORE handler) whatever route it matches, and queues a job per marker
  (``source="ohif-sr"``);
- ``prognode run body-composition DIR --level L3=SLICE`` needs no node (see :mod:`node.cli`).

A reader-confirmed level is a **new job for the same inputs**: its ``input_key`` adds the level,
the image and the source (the marker SR's SOP Instance UID, or the request time) to the route and
series, so the unique ``(pipeline, input_key)`` rule does not block it, while the same marker SR
sent twice queues one job.  The job carries the override in ``inputs["level_override"]`` (the
worker passes it to the pipeline as the option ``level_override``), keeps the route and
destinations of the series' earlier body-composition job (so its results go where the earlier
ones went and supersede them: see :meth:`node.jobs.JobQueue.predecessors`), and no schema change
was needed (``jobs.inputs`` is JSON).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit import AuditSink
from node.db import Database, Instance, Job, JobState, Series, SeriesState, now
from node.index import Index
from node.routing import Router, series_attributes

logger = logging.getLogger(__name__)

PIPELINE = "body-composition"
LEVELS = ("L3", "C3")
ACTIVE_STATES = (JobState.PENDING, JobState.RUNNING, JobState.FAILED)  # failed: waiting for its retry
READER_ROUTE = "reader-level"  # route name of a job for a series no route sends to body-composition
PN_MAX = 64 * 5  # five components of at most 64 characters (PS3.5 6.2, PN)


class LevelRequestError(Exception):
    """A refused level request; ``status`` is the HTTP status the REST API answers."""

    status = 422


class UnknownSeries(LevelRequestError):
    status = 404


class SliceNotInSeries(LevelRequestError):
    status = 422


class JobActive(LevelRequestError):
    status = 409


@dataclass(frozen=True)
class Queued:
    job_id: int
    created: bool  # False: the same request (same marker SR) had already queued this job
    sop_instance_uid: str


def now_iso(t: float | None = None) -> str:
    return _dt.datetime.fromtimestamp(now() if t is None else t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_reader(reader: str) -> str:
    """A reader's name as a DICOM person name (``Family^Given``); ValueError when it cannot be one."""
    reader = reader.strip()
    if len(reader) > PN_MAX or "\\" in reader or any(ord(c) < 32 for c in reader):
        raise ValueError(f"reader {reader[:40]!r}: not a person name (Family^Given, no backslash or control "
                         "characters, components of at most 64 characters)")
    if any(len(part) > 64 for part in reader.split("^")):
        raise ValueError(f"reader {reader[:40]!r}: a name component is longer than 64 characters")
    return reader


def _resolve(s: Session, series_uid: str, sop_instance_uid: str | None, instance_number: int | None) -> str:
    if (sop_instance_uid is None) == (instance_number is None):
        raise SliceNotInSeries("give exactly one of sop_instance_uid and instance_number")
    if sop_instance_uid is not None:
        row = s.get(Instance, sop_instance_uid)
        if row is None or row.series_uid != series_uid:
            raise SliceNotInSeries(f"image {sop_instance_uid} is not in series {series_uid}")
        return sop_instance_uid
    rows = s.scalars(select(Instance.sop_instance_uid).where(Instance.series_uid == series_uid,
                                                             Instance.instance_number == instance_number)).all()
    if not rows:
        raise SliceNotInSeries(f"series {series_uid} has no image with instance number {instance_number}")
    if len(rows) > 1:
        raise SliceNotInSeries(f"series {series_uid} has {len(rows)} images with instance number "
                               f"{instance_number}: give the SOP Instance UID")
    return str(rows[0])


def _route_for(s: Session, router: Router, series: Series) -> tuple[str, list[str]]:
    """The route and destinations of the series' latest body-composition job, else of a route that
    sends it to body-composition, else (``reader-level``, none)."""
    last = s.scalars(select(Job).where(Job.series_uid == series.series_uid, Job.pipeline == PIPELINE)
                     .order_by(Job.id.desc()).limit(1)).first()
    if last is not None:
        return last.route, [str(d) for d in (last.inputs or {}).get("send_to", [])]
    for route in router.matching_series_routes(series_attributes(series)):
        if PIPELINE in route.pipelines:
            return route.name, list(route.send_to)
    return READER_ROUTE, []


def _key(route: str, series_uid: str, generation: int, override: dict[str, str]) -> str:
    """The route and series (as :func:`node.routing.input_key`) plus the level, its image and its source."""
    canon = json.dumps({"route": route, "series": [[series_uid, generation]],
                        "level": {k: override[k] for k in ("level", "sop_instance_uid", "source")},
                        "request": override.get("marker_sop_instance_uid") or override["time"]}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:40]


def request_level(db: Database, router: Router, audit: AuditSink | None, series_uid: str, level: str, *,
                  sop_instance_uid: str | None = None, instance_number: int | None = None, reader: str = "",
                  source: str = "api", marker_sop_instance_uid: str = "", refuse_active: bool = True,
                  unless_current: bool = False) -> Queued:
    """Queue a body-composition job measuring ``series_uid`` at the reader's ``level`` and image.

    Raises :class:`UnknownSeries` (404), :class:`SliceNotInSeries` (422: bad level, image not in the
    series, an absent or repeated instance number) or, with ``refuse_active``, :class:`JobActive`
    (409: a body-composition job on the series is pending, running or waiting for a retry, or the
    series is still receiving).
    ``unless_current``: queue nothing when the series' latest body-composition job already measures
    at this level on this image (a viewer SR saved again with an earlier marker in it).
    """
    if level not in LEVELS:
        raise SliceNotInSeries(f"level {level!r}: a reader may confirm {' or '.join(LEVELS)}")
    try:
        reader = check_reader(reader)
    except ValueError as e:
        raise SliceNotInSeries(str(e)) from None
    t = now()
    with db.session() as s:
        series = s.get(Series, series_uid)
        if series is None:
            raise UnknownSeries(f"series {series_uid} not found")
        sop = _resolve(s, series_uid, sop_instance_uid, instance_number)
        if refuse_active and series.state != SeriesState.COMPLETE:
            raise JobActive(f"series {series_uid} is still receiving instances: ask again once it is complete")
        if refuse_active:
            active = s.scalar(select(Job.id).where(Job.series_uid == series_uid, Job.pipeline == PIPELINE,
                                                   Job.state.in_(ACTIVE_STATES)).limit(1))
            if active is not None:
                raise JobActive(f"job {active} ({PIPELINE}) on series {series_uid} is queued or running: "
                                "ask again when it is done")
        if unless_current:
            last = s.scalars(select(Job).where(Job.series_uid == series_uid, Job.pipeline == PIPELINE)
                             .order_by(Job.id.desc()).limit(1)).first()
            current = (last.inputs or {}).get("level_override") or {} if last is not None else {}
            if last is not None and current.get("level") == level and current.get("sop_instance_uid") == sop:
                return Queued(int(last.id), False, sop)
        route, send_to = _route_for(s, router, series)
        override = {"level": level, "sop_instance_uid": sop, "reader": reader, "source": source,
                    "time": now_iso(t), "marker_sop_instance_uid": marker_sop_instance_uid}
        key = _key(route, series_uid, series.generation, override)
        existing = s.scalar(select(Job.id).where(Job.pipeline == PIPELINE, Job.input_key == key))
        if existing is not None:
            return Queued(int(existing), False, sop)
        job = Job(series_uid=series_uid, study_uid=series.study_uid, route=route, pipeline=PIPELINE,
                  inputs={"series": [{"uid": series_uid, "generation": series.generation, "role": ""}],
                          "send_to": send_to, "level": "series", "level_override": override},
                  input_key=key, state=JobState.PENDING.value, attempts=0, created_at=t, updated_at=t, not_before=0.0,
                  last_image_at=series.last_received)
        s.add(job)
        s.flush()
        job_id = int(job.id)
    logger.info("job %d queued: %s on series %s at the reader-confirmed level %s (image %s, reader %s, from %s)",
                job_id, PIPELINE, series_uid, level, sop, reader or "not named", source)
    if audit is not None:
        audit.write("level_confirmed", job_id=job_id, series_uid=series_uid, level=level, sop_instance_uid=sop,
                    reader=reader, source=source, marker_sop_instance_uid=marker_sop_instance_uid)
        audit.write("job_pending", job_id=job_id, series_uid=series_uid)
    return Queued(job_id, True, sop)


# Level markers from the viewer ------------------------------------------------------------------

CORNERSTONE_FREE_TEXT = "CORNERSTONEFREETEXT"  # how OHIF/dcmjs code a measurement's free-text label
FINDING = ("DCM", "121071")
COMMENT = ("DCM", "121106")  # OHIF 3.13 writes a measurement's label as a TEXT "Comment" in its group
FINDING_SITES = (("SCT", "363698007"), ("SRT", "G-C0E3"))
MEASUREMENT_GROUP = "125007"
ALGORITHM_NAME = "111001"
PERSON_OBSERVER_NAME = "121008"
UNNAMED_PERSONS = ("", "unknown^unknown", "unknown")  # dcmjs writes "unknown^unknown" when no user is named
_LABEL = re.compile(r"\s*(L3|C3)(?:\s+(?:vertebra|vertebral\s+body|level))?\s*", re.IGNORECASE)


def level_of_label(label: str) -> str | None:
    """"L3", "l3", "L3 vertebra", "C3 level" -> "L3"/"C3"; anything else None."""
    m = _LABEL.fullmatch(label)
    return m.group(1).upper() if m else None


def _vertebra_codes() -> dict[tuple[str, str], str]:
    from dicom_templates.codes import concept  # the code table: L3 and C3 vertebra (SCT)

    out = {}
    for level, key in (("L3", "l3-vertebra"), ("C3", "c3-vertebra")):
        c = concept(key)
        out[(str(c.scheme_designator), str(c.value))] = level
    return out


@dataclass(frozen=True)
class Marker:
    """One measurement group of a viewer SR that names a level on one image."""

    level: str
    image_sop_instance_uid: str
    reader: str  # Person Observer Name of the SR, "" when not named
    marker_sop_instance_uid: str
    label: str  # the label as written ("L3", or the coded finding site's meaning)


def _walk(items: Any) -> Iterator[Any]:
    for it in items or ():
        yield it
        if "ContentSequence" in it:
            yield from _walk(it.ContentSequence)


def _code(seq_item: Any, name: str) -> tuple[str, str, str] | None:
    if name not in seq_item or not seq_item[name].value:
        return None
    c = seq_item[name].value[0]
    # dcmjs writes CORNERSTONEFREETEXT (19 characters) as a Code Value; a conformant writer (highdicom)
    # uses Long Code Value for a code longer than 16 characters (PS3.3 8.8)
    value = c.get("CodeValue", "") or c.get("LongCodeValue", "") or c.get("URNCodeValue", "")
    return (str(c.get("CodingSchemeDesignator", "")), str(value), str(c.get("CodeMeaning", "")))


def markers_of(ds: Any, own_devices: Sequence[tuple[str, str]] = ()) -> tuple[list[Marker], list[str]]:
    """Level markers in an SR dataset, and why groups that look like one were not taken.

    A marker is a TID 1500 measurement group with no algorithm identification (a reader's, not a
    machine's) whose label is "L3" or "C3" -- OHIF 3.13 writes the label as a TEXT "Comment"
    (DCM 121106) of the group (seen in an SR it saved); OHIF's older adapters write it as a free-text
    code (``CORNERSTONEJS``/``CORNERSTONEFREETEXT``) in the group's Finding Site, or in its Finding
    for an arrow -- or, without any free-text label, whose Finding Site (or Finding) is the L3 or C3
    vertebra (SCT) and which names no other finding (a muscle measured *at* L3 is not a marker: OHIF
    saves prognode's groups that way, without their algorithm, when a reader re-saves them), and
    whose spatial coordinates are selected from exactly one image.
    SRs written by this node (manufacturer and device serial in ``own_devices``) are skipped.
    """
    sop = str(ds.get("SOPInstanceUID", ""))
    if (str(ds.get("Manufacturer", "")), str(ds.get("DeviceSerialNumber", ""))) in set(own_devices):
        return [], []
    reader = ""
    for it in ds.get("ContentSequence", []):
        name = _code(it, "ConceptNameCodeSequence")
        if it.get("ValueType") == "PNAME" and name is not None and name[1] == PERSON_OBSERVER_NAME:
            person = str(it.get("PersonName", "") or "").strip()
            reader = "" if person.lower() in UNNAMED_PERSONS else person
    vertebrae = _vertebra_codes()
    found: list[Marker] = []
    skipped: list[str] = []
    for group in _walk(ds.get("ContentSequence", [])):
        name = _code(group, "ConceptNameCodeSequence")
        if group.get("ValueType") != "CONTAINER" or name is None or name[1] != MEASUREMENT_GROUP:
            continue
        free: list[str] = []
        coded: list[tuple[str, str]] = []
        findings: list[str] = []  # coded findings other than a level: the group measures a structure
        images: set[str] = set()
        automatic = False
        for it in _walk(group.get("ContentSequence", [])):
            cn = _code(it, "ConceptNameCodeSequence")
            vt = it.get("ValueType")
            if cn is not None and vt == "TEXT" and cn[1] == ALGORITHM_NAME:
                automatic = True
            elif cn is not None and vt == "CODE" and (cn[:2] == FINDING or cn[:2] in FINDING_SITES):
                code = _code(it, "ConceptCodeSequence")
                if code is None:
                    continue
                if code[1] == CORNERSTONE_FREE_TEXT:
                    free.append(code[2])
                elif code[:2] in vertebrae:
                    coded.append((vertebrae[code[:2]], code[2]))
                elif cn[:2] == FINDING:
                    findings.append(code[2])
            elif cn is not None and vt == "TEXT" and cn[:2] in (FINDING, COMMENT):
                free.append(str(it.get("TextValue", "")))
            elif vt == "IMAGE" and "ReferencedSOPSequence" in it:
                images.add(str(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        if automatic:
            continue  # a machine's measurement (it names its algorithm), e.g. prognode's own SR re-sent
        if free:  # a free-text label decides: a coded finding site beside it came from elsewhere
            levels = {lv for lv in (level_of_label(x) for x in free) if lv}
            label = next((x for x in free if level_of_label(x)), "")
        elif findings:  # e.g. "Skeletal muscle" at finding site L3 vertebra (prognode's own groups, which
            continue    # OHIF saves again without their algorithm when a reader re-saves the measurements)
        else:
            levels = {lv for lv, _ in coded}
            label = coded[0][1] if coded else ""
        if not levels:
            continue
        if len(levels) > 1:
            skipped.append(f"a group of SR {sop} names several levels ({', '.join(sorted(levels))})")
            continue
        if len(images) != 1:
            skipped.append(f"the {label!r} group of SR {sop} is drawn on {len(images)} images, not one "
                           "(3D coordinates or several images): no slice to measure on")
            continue
        found.append(Marker(levels.pop(), images.pop(), reader, sop, label))
    return found, skipped


class LevelMarkers:
    """Finds level markers in SR series as they complete and queues the reader-confirmed jobs."""

    def __init__(self, db: Database, index: Index, router: Router, audit: AuditSink | None,
                 own_devices: Sequence[tuple[str, str]] = ()) -> None:
        self.db = db
        self.index = index
        self.router = router
        self.audit = audit
        self.own_devices = tuple(own_devices)

    def on_series_complete(self, series_uid: str, modality: str) -> list[int]:
        """Queue a job per level marker in the SR series ``series_uid`` that has just completed."""
        if modality != "SR":
            return []
        import pydicom  # the completion thread, not the C-STORE handler

        markers: list[Marker] = []
        for f in self.index.series_files(series_uid):
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception as e:
                logger.warning("level markers: cannot read %s: %s", f, e)
                continue
            found, skipped = markers_of(ds, self.own_devices)
            markers += found
            for why in skipped:
                self._ignored(series_uid, why)
        jobs: list[int] = []
        by_target: dict[tuple[str, str], list[Marker]] = {}
        for m in markers:
            with self.db.read() as s:
                row = s.get(Instance, m.image_sop_instance_uid)
                target = row.series_uid if row is not None else ""
            if not target:
                self._ignored(series_uid, f"{m.level} marker of SR {m.marker_sop_instance_uid}: image "
                                          f"{m.image_sop_instance_uid} is not held by this node")
                continue
            by_target.setdefault((target, m.level), []).append(m)
        for (target, level), ms in by_target.items():
            if len({m.image_sop_instance_uid for m in ms}) > 1:
                self._ignored(series_uid, f"{len(ms)} {level} markers on different images of series {target}: "
                                          "the reader's slice is ambiguous")
                continue
            m = ms[-1]
            try:
                q = request_level(self.db, self.router, self.audit, target, level,
                                  sop_instance_uid=m.image_sop_instance_uid, reader=m.reader, source="ohif-sr",
                                  marker_sop_instance_uid=m.marker_sop_instance_uid, refuse_active=False,
                                  unless_current=True)
            except LevelRequestError as e:
                self._ignored(series_uid, f"{level} marker of SR {m.marker_sop_instance_uid}: {e}")
                continue
            if q.created:
                jobs.append(q.job_id)
        return jobs

    def _ignored(self, series_uid: str, why: str) -> None:
        logger.warning("level marker in SR series %s ignored: %s", series_uid, why)
        if self.audit is not None:
            self.audit.write("level_marker_ignored", series_uid=series_uid, reason=why)
