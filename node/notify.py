"""Notifications (``[[notify]]``): a webhook or an HL7 v2 ORU^R01 to a RIS when a result is filed
or a job is dead.

Events
------
``filed``: every export of a done job's results has been sent (a done job with no destination is
filed when it is done); ``dead``: a job ran out of attempts; ``retracted``: a job's results were
retracted (:mod:`node.retract`).  :class:`Notifier` finds them by looking at what changed since its
last look (``exports.sent_at``, ``jobs.finished_at``, ``retractions.created_at``, all indexed), so
neither the job loop nor the export threads wait for it, and queues one row per (target, job,
event) in the ``notifications`` outbox (unique: an event is told once per target).  Its own
thread sends what is due, with back-off (``retry_seconds`` doubled per failure up to
``retry_max_seconds``; ``dead`` after ``max_attempts``, logged and audited).  The outbox is a
table, so a restart sends what was pending; the look-back starts from the last event queued.

What is sent
------------
The payload (:func:`payload_for`) is built when the event is queued: study and series UIDs, the
pipeline and the version that ran, evaluable or not and the reason, key values from the job's
summary (:func:`key_values`), the result objects, and links (the job on the dashboard; the study
in the viewer when ``[web] viewer_url`` is set).  The patient's name, ID, birth date and the
accession number are added only when the target says ``include_phi = true``; otherwise UIDs only.

- ``kind = "webhook"``: a JSON POST (Bearer token from ``token_file``); any 2xx is success.
- ``kind = "hl7"``: an HL7 v2.5 ORU^R01 over MLLP (the ``hl7`` library's :class:`hl7.client.MLLPClient`,
  with a timeout on its socket): MSH, PID (only with ``include_phi``), OBR, one OBX per value; the
  answer must be an ACK whose MSA-1 is AA (or CA); AE/AR (or CE/CR), a wrong control ID or no answer
  is a failed attempt.

Every socket has the target's ``timeout_seconds``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from node.audit import AuditSink
from node.config import Config, Hl7Notify, NotifyConfig, WebhookNotify
from node.db import (
    Database,
    Export,
    ExportState,
    Job,
    JobState,
    Notification,
    NotificationState,
    Result,
    Retraction,
    now,
)
from node.index import Index

logger = logging.getLogger(__name__)

FILED, DEAD, RETRACTED = "filed", "dead", "retracted"
OVERLAP_SECONDS = 5.0  # look back this much before the last look: a commit may land after its timestamp
MAX_KEY_VALUES = 40
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
LOCAL_CODING = "99PROGNODE"  # HL7 v2 local coding system of the OBX identifiers this node writes


def iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Payload ---------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """A value JSON and HL7 can carry: NaN and infinities become None (not evaluable)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def key_values(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The values a reader looks at first, from a job's summary: ``key_values`` when a pipeline
    gives them (a list of ``{name, value, unit}``); else the level, and the measured values of
    the ``areas_cm2``, ``derived``, ``sarcopenia`` and ``segments`` sections (a value that is not
    evaluable comes with ``value: null`` and its reason)."""
    given = summary.get("key_values")
    if isinstance(given, list):
        return [{**dict(v), "value": _finite(v.get("value"))} for v in given
                if isinstance(v, Mapping) and "name" in v][:MAX_KEY_VALUES]
    out: list[dict[str, Any]] = []
    if summary.get("level"):
        out.append({"name": "level", "value": str(summary["level"]), "unit": ""})
    units = {"areas_cm2": "cm2"}
    for section in ("areas_cm2", "derived", "sarcopenia", "segments"):
        items = summary.get(section)
        if not isinstance(items, Mapping):
            continue
        for name, v in items.items():
            if isinstance(v, Mapping) and "value" in v:
                item = {"name": f"{section}.{name}", "value": v.get("value"), "unit": str(v.get("unit") or
                                                                                     units.get(section, ""))}
                if v.get("value") is None and v.get("not_evaluable"):
                    item["not_evaluable"] = str(v["not_evaluable"])
                out.append(item)
            elif isinstance(v, Mapping):  # tissue-hu: {volume_ml, mean_hu, voxels}
                for k, unit in (("volume_ml", "mL"), ("mean_hu", "[hnsf'U]")):
                    if k in v:
                        out.append({"name": f"{section}.{name}.{k}", "value": v[k], "unit": unit})
            elif isinstance(v, (int, float, str, bool)) or v is None:
                out.append({"name": f"{section}.{name}", "value": v, "unit": ""})
    return [{**v, "value": _finite(v.get("value"))} for v in out[:MAX_KEY_VALUES]]


def dashboard_base(config: Config) -> str:
    """The dashboard's URL as this node serves it (``[web]`` host, port and TLS)."""
    scheme = "https" if config.web.tls_certificate is not None else "http"
    host = config.web.host if config.web.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    return f"{scheme}://{host}:{config.web.port}"


def links(config: Config, job_id: int, study_uid: str) -> dict[str, str]:
    out = {"dashboard": f"{dashboard_base(config)}/#jobs", "job": f"{dashboard_base(config)}/api/jobs/{job_id}"}
    viewer = str(getattr(config.web, "viewer_url", "") or "")  # [web] viewer_url, e.g. OHIF's ?StudyInstanceUIDs=
    if viewer:
        out["viewer"] = viewer.replace("{study_uid}", study_uid)
    return out


def patient_of(index: Index, series_uid: str) -> dict[str, str]:
    """Name, ID, birth date and accession number from the first stored image of the series."""
    import pydicom

    for f in index.series_files(series_uid)[:1]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(PHI_KEYWORDS))
        except Exception as e:
            logger.warning("notify: cannot read the patient of series %s from %s: %s", series_uid, f, e)
            return {}
        return {k: str(ds.get(k, "") or "") for k in PHI_KEYWORDS}
    return {}


def payload_for(config: Config, index: Index, job: Job, event: str, results: Sequence[Result],
                destinations: Sequence[str], target: NotifyConfig, extra: Mapping[str, Any] | None = None,
                patient: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a target is told of ``event`` on ``job`` (see the module's docstring)."""
    summary: dict[str, Any] = dict(job.summary or {})
    body: dict[str, Any] = {
        "event": event,
        "job_id": job.id,
        "pipeline": job.pipeline,
        "pipeline_version": str(summary.get("pipeline_version") or summary.get("version") or ""),
        "route": job.route,
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "evaluable": bool(summary.get("evaluable", True)) if job.state == JobState.DONE else None,
        "reason": str(summary.get("reason", "")) if job.state == JobState.DONE else job.error[:500],
        "key_values": key_values(summary) if job.state == JobState.DONE else [],
        "results": [{"sop_instance_uid": r.sop_instance_uid, "series_uid": r.series_uid, "modality": r.modality,
                     "sop_class_uid": r.sop_class_uid} for r in results],
        "destinations": list(destinations),
        "links": links(config, job.id, job.study_uid),
        "time": iso(now()),
        **dict(extra or {}),
    }
    if target.include_phi:
        body["patient"] = dict(patient if patient is not None else patient_of(index, job.series_uid))
    return body


# HL7 v2 ORU^R01 --------------------------------------------------------------------------------

_HL7_ESCAPER: Any = None


def hl7_escape(value: Any) -> str:
    """A field value with HL7's delimiters escaped (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) by the ``hl7`` library."""
    global _HL7_ESCAPER
    import hl7

    if _HL7_ESCAPER is None:
        _HL7_ESCAPER = hl7.parse("MSH|^~\\&|X")
    text = "" if value is None else str(value)
    return str(_HL7_ESCAPER.escape(text.replace("\r", " ").replace("\n", " ")))


def _hl7_time(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y%m%d%H%M%S+0000")


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return f"{value:.6g}"


def oru_r01(target: Hl7Notify, payload: Mapping[str, Any], control_id: str, t: float | None = None) -> str:
    """An HL7 v2.5 ORU^R01 (segments joined by CR) for one notification.

    MSH; PID (PID-3 patient ID, PID-5 name, PID-7 birth date) only when ``payload`` has the patient
    (``include_phi``); OBR (OBR-3 the job as filler order number, OBR-4 the pipeline, OBR-18 the
    accession number only with PHI, OBR-25 F for a filed result, X for a dead job, C for a
    retraction); OBX: study and series UIDs (DCM 110180, 112002), the pipeline version, evaluable
    (Y/N) with the reason, then one NM (or ST) OBX per key value with its UCUM unit."""
    e = hl7_escape
    t = now() if t is None else t
    stamp = _hl7_time(t)
    segments = ["|".join(["MSH", "^~\\&", e(target.sending_application), e(target.sending_facility),
                          e(target.receiving_application), e(target.receiving_facility), stamp, "",
                          "ORU^R01^ORU_R01", e(control_id), "P", "2.5"])]
    patient = payload.get("patient")
    if isinstance(patient, Mapping):
        name = str(patient.get("PatientName", "")).split("^")
        xpn = "^".join(e(x) for x in name)
        segments.append("|".join(["PID", "1", "", f"{e(patient.get('PatientID', ''))}^^^^MR", "", xpn, "",
                                  e(patient.get("PatientBirthDate", ""))]))
    event = str(payload.get("event", ""))
    status = {"filed": "F", "dead": "X", "retracted": "C"}.get(event, "F")
    pipeline = e(payload.get("pipeline", ""))
    obr = ["OBR", "1", "", f"{e(payload.get('job_id', ''))}^{e(target.sending_application)}",
           f"{pipeline}^{pipeline}^{LOCAL_CODING}", "", "", stamp] + [""] * 10
    accession = patient.get("AccessionNumber", "") if isinstance(patient, Mapping) else ""
    obr += [e(accession), "", "", "", "", "", "", status]  # OBR-18 .. OBR-25
    segments.append("|".join(obr))
    obx: list[tuple[str, str, str, str]] = [  # value type, identifier, value, units
        ("ST", "110180^Study Instance UID^DCM", e(payload.get("study_uid", "")), ""),
        ("ST", "112002^Series Instance UID^DCM", e(payload.get("series_uid", "")), ""),
        ("ST", f"pipeline-version^Pipeline version^{LOCAL_CODING}", e(payload.get("pipeline_version", "")), ""),
        ("ST", f"event^Event^{LOCAL_CODING}", e(event), ""),
    ]
    if payload.get("evaluable") is not None:
        obx.append(("ST", f"evaluable^Evaluable^{LOCAL_CODING}", "Y" if payload["evaluable"] else "N", ""))
    if payload.get("reason"):
        obx.append(("TX", f"reason^Reason^{LOCAL_CODING}", e(payload["reason"]), ""))
    for kv in payload.get("key_values", []) or []:
        label = e(kv.get("name", ""))
        unit = e(kv.get("unit", ""))
        units = f"{unit}^{unit}^UCUM" if unit else ""
        number = _number(kv.get("value"))
        if number is not None:
            obx.append(("NM", f"{label}^{label}^{LOCAL_CODING}", number, units))
        elif kv.get("value") is not None:
            obx.append(("ST", f"{label}^{label}^{LOCAL_CODING}", e(kv["value"]), units))
        elif kv.get("not_evaluable"):
            obx.append(("ST", f"{label}^{label}^{LOCAL_CODING}", e(f"not evaluable: {kv['not_evaluable']}"), ""))
    for i, (vt, ident, value, units) in enumerate(obx, start=1):
        segments.append("|".join(["OBX", str(i), vt, ident, "", value, units, "", "", "", "", status]))
    return "\r".join(segments) + "\r"


def _mllp_client(host: str, port: int, timeout: float) -> Any:
    """The ``hl7`` library's MLLP client on a socket with a timeout (its constructor sets none)."""
    from hl7.client import MLLPClient

    class _TimedMLLPClient(MLLPClient):  # type: ignore[misc]
        def __init__(self) -> None:  # noqa: D107 - the parent's, with a timeout and create_connection
            self.socket = socket.create_connection((host, port), timeout=timeout)
            self.socket.settimeout(timeout)
            self.encoding = "utf-8"

        def send(self, data: bytes) -> bytes:
            """Send the framed message and read the whole framed answer (up to <EB><CR>)."""
            self.socket.sendall(data)
            answer = b""
            while not answer.endswith(b"\x1c\x0d"):
                chunk = self.socket.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if len(answer) > 1 << 20:
                    raise ValueError("ACK longer than 1 MiB")
            return answer

    return _TimedMLLPClient()


def send_hl7(target: Hl7Notify, payload: Mapping[str, Any], control_id: str) -> str:
    """Send the ORU^R01; returns the ACK code (AA/CA); raises with the reason on AE/AR, a wrong control ID,
    no answer or a socket error."""
    import hl7

    message = oru_r01(target, payload, control_id)
    with _mllp_client(target.host, target.port, target.timeout_seconds) as client:
        raw = client.send_message(message)
    text = raw.decode("utf-8", "replace").strip("\x0b\x1c\r\n")
    if not text:
        raise ConnectionError("no ACK (the connection closed without an answer)")
    ack = hl7.parse(text)
    msa = ack.segment("MSA")
    code, acked = str(msa[1]), str(msa[2])
    if acked != control_id:
        raise ValueError(f"ACK for control ID {acked!r}, not {control_id!r}")
    if code not in ("AA", "CA"):
        why = str(msa[3]) if len(msa) > 3 else ""
        raise ValueError(f"ACK {code}{': ' + why if why else ''}")
    return code


def send_webhook(target: WebhookNotify, payload: Mapping[str, Any], token: str) -> int:
    """POST the JSON payload; returns the HTTP status (2xx), raises otherwise."""
    body = json.dumps(payload, default=str).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "prognode-notify"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=target.timeout_seconds) as rsp:  # noqa: S310 - http(s) only (config)
        status = int(rsp.status)
    if not 200 <= status < 300:
        raise ValueError(f"HTTP {status}")
    return status


# The notifier -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Due:
    id: int
    target: str
    job_id: int
    event: str
    payload: dict[str, Any]
    attempts: int


def retry_delay(target: NotifyConfig, attempts: int, rng: random.Random | None = None) -> float:
    """``retry_seconds`` doubled per failure up to ``retry_max_seconds``, lengthened by up to 20 %."""
    d = min(target.retry_max_seconds, target.retry_seconds * 2.0 ** min(max(0, attempts - 1), 60))
    return min(target.retry_max_seconds, d * (1.0 + 0.2 * (rng or random).random()))


class Notifier:
    """Queues notifications as events happen and sends them from its own thread."""

    def __init__(self, db: Database, config: Config, index: Index, audit: AuditSink | None,
                 poll_seconds: float = 0.25, rng: random.Random | None = None) -> None:
        self.db = db
        self.config = config
        self.index = index
        self.audit = audit
        self.poll_seconds = poll_seconds
        self.rng = rng or random.Random()
        self.targets = {t.name: t for t in config.notify}
        self.wake = threading.Event()
        self._since: float | None = None

    # finding events --------------------------------------------------------------------------
    def _start_since(self) -> float:
        with self.db.read() as s:
            last = s.scalar(select(func.max(Notification.event_at)))
        return float(last) if last is not None else now()

    def scan(self) -> int:
        """Queue the events since the last look; returns how many notifications were queued."""
        if not self.targets:
            return 0
        if self._since is None:
            self._since = self._start_since()
        since = self._since - OVERLAP_SECONDS
        t = now()
        events: list[tuple[int, str, float]] = []
        with self.db.read() as s:
            sent_jobs = s.execute(select(Export.job_id, func.max(Export.sent_at)).where(
                Export.state == ExportState.SENT, Export.sent_at > since).group_by(Export.job_id)).all()
            for job_id, at in sent_jobs:
                waiting = s.scalar(select(func.count()).select_from(Export).where(
                    Export.job_id == job_id, Export.state != ExportState.SENT))
                if not waiting:
                    events.append((int(job_id), FILED, float(at or t)))
            for job_id, state, at in s.execute(select(Job.id, Job.state, Job.finished_at).where(
                    Job.finished_at > since, Job.state.in_((JobState.DONE, JobState.DEAD)))).all():
                if state == JobState.DEAD:
                    events.append((int(job_id), DEAD, float(at or t)))
                elif not s.scalar(select(func.count()).select_from(Export).where(Export.job_id == job_id)):
                    events.append((int(job_id), FILED, float(at or t)))  # no destination: filed in the node
            for job_id, at in s.execute(select(Retraction.job_id, Retraction.created_at).where(
                    Retraction.created_at > since)).all():
                events.append((int(job_id), RETRACTED, float(at)))
        queued = sum(self.queue(job_id, event, at) for job_id, event, at in events)
        self._since = t
        if queued:
            self.wake.set()
        return queued

    def queue(self, job_id: int, event: str, event_at: float) -> int:
        """One outbox row per target that wants ``event`` (none twice); returns how many were added."""
        wanted = [tg for tg in self.targets.values() if event in tg.events]
        if not wanted:
            return 0
        with self.db.read() as s:
            have = set(s.scalars(select(Notification.target).where(Notification.job_id == job_id,
                                                                   Notification.event == event)).all())
            wanted = [tg for tg in wanted if tg.name not in have]
            if not wanted:
                return 0
            job = s.get(Job, job_id)
            if job is None or (event == FILED and s.get(Retraction, job_id) is not None):
                return 0  # a retraction's rejection note filed is not a result filed
            results = list(s.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.created_at)))
            destinations = sorted(set(s.scalars(select(Export.destination).where(
                Export.job_id == job_id, Export.state == ExportState.SENT)).all()))
            extra: dict[str, Any] = {}
            if event == RETRACTED:
                r = s.get(Retraction, job_id)
                if r is not None:
                    extra = {"retraction": {"reason": r.reason, "by": r.by, "kos_sop_instance_uid":
                                            r.kos_sop_instance_uid, "retracted": list(r.retracted)}}
            patient = patient_of(self.index, job.series_uid) if any(tg.include_phi for tg in wanted) else None
            rows = [(tg.name, payload_for(self.config, self.index, job, event, results, destinations, tg, extra,
                                          patient)) for tg in wanted]
        added = 0
        for name, payload in rows:
            try:
                with self.db.session() as s:
                    s.add(Notification(target=name, job_id=job_id, event=event, payload=payload,
                                       state=NotificationState.PENDING.value, attempts=0, next_attempt_at=0.0,
                                       event_at=event_at, created_at=now()))
                added += 1
            except IntegrityError:  # queued meanwhile (another scan): told once
                continue
            logger.info("notify %s: job %d %s queued", name, job_id, event)
        return added

    # sending ---------------------------------------------------------------------------------
    def due(self, target: str | None = None, limit: int = 32) -> list[Due]:
        q = select(Notification).where(Notification.state == NotificationState.PENDING,
                                       Notification.next_attempt_at <= now())
        if target is not None:
            q = q.where(Notification.target == target)
        with self.db.read() as s:
            rows = s.scalars(q.order_by(Notification.id).limit(limit)).all()
            return [Due(r.id, r.target, r.job_id, r.event, dict(r.payload or {}), r.attempts) for r in rows]

    def deliver(self, name: str | None = None) -> int:
        """Send what is due (to target ``name``, or to every target); returns how many were sent."""
        sent = 0
        for d in self.due(name):
            target = self.targets.get(d.target)
            if target is None:
                self._failed(d, None, f"notify target {d.target!r} is no longer configured")
                continue
            try:
                how = self.send(target, d)
            except Exception as e:
                self._failed(d, target, f"{type(e).__name__}: {e}")
                continue
            with self.db.session() as s:
                s.execute(update(Notification).where(Notification.id == d.id).values(
                    state=NotificationState.SENT.value, attempts=d.attempts + 1, sent_at=now(), last_error=""))
            sent += 1
            logger.info("notify %s: job %d %s sent (%s)", d.target, d.job_id, d.event, how)
            if self.audit is not None:
                self.audit.write("notification_sent", target=d.target, job_id=d.job_id, notify_event=d.event,
                                 attempt=d.attempts + 1, answer=how)
        return sent

    def send(self, target: NotifyConfig, d: Due) -> str:
        if isinstance(target, WebhookNotify):
            token = ""
            if target.token_file is not None:
                token = self.config.path(target.token_file).read_text(encoding="utf-8").strip()
            return f"HTTP {send_webhook(target, d.payload, token)}"
        control_id = f"PN{d.id}-{d.attempts + 1}"  # unique per attempt, so a late ACK is not mistaken
        return f"ACK {send_hl7(target, d.payload, control_id)}"

    def _failed(self, d: Due, target: NotifyConfig | None, error: str) -> None:
        attempts = d.attempts + 1
        dead = target is None or attempts >= target.max_attempts
        delay = 0.0 if dead or target is None else retry_delay(target, attempts, self.rng)
        with self.db.session() as s:
            s.execute(update(Notification).where(Notification.id == d.id).values(
                state=(NotificationState.DEAD if dead else NotificationState.PENDING).value, attempts=attempts,
                last_error=error[:2000], next_attempt_at=now() + delay))
        logger.warning("notify %s: job %d %s failed (attempt %d): %s%s", d.target, d.job_id, d.event, attempts,
                       error, "; given up" if dead else f"; next attempt in {delay:.1f} s")
        if self.audit is not None:
            self.audit.write("notification_dead" if dead else "notification_failed", target=d.target,
                             job_id=d.job_id, notify_event=d.event, attempt=attempts, error=error[:500])

    def tick(self) -> int:
        self.scan()
        return self.deliver()

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``: look for events every ``poll_seconds`` in this thread; each target sends from
        a thread of its own, so a slow or unreachable target never holds up the others."""
        wakes = {name: threading.Event() for name in self.targets}
        threads = [threading.Thread(target=self._run_target, args=(name, wakes[name], stop),
                                    name=f"prognode-notify-{name}", daemon=True) for name in self.targets]
        for t in threads:
            t.start()
        while not stop.is_set():
            try:
                if self.scan():
                    for w in wakes.values():
                        w.set()
                self.deliver_orphans()
            except Exception:
                logger.exception("notify pass failed")
            self.wake.wait(self.poll_seconds)
            self.wake.clear()
        for w in wakes.values():
            w.set()
        for t in threads:
            t.join()

    def _run_target(self, name: str, wake: threading.Event, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.deliver(name)
            except Exception:
                logger.exception("notify pass to %s failed", name)
            wake.wait(self.poll_seconds)
            wake.clear()

    def deliver_orphans(self) -> None:
        """Pending rows of targets no longer configured are dead."""
        with self.db.read() as s:
            rows = s.scalars(select(Notification).where(Notification.state == NotificationState.PENDING,
                                                        Notification.target.not_in(list(self.targets)))).all()
            orphans = [Due(r.id, r.target, r.job_id, r.event, {}, r.attempts) for r in rows]
        for d in orphans:
            self._failed(d, None, f"notify target {d.target!r} is no longer configured")
