"""Interim C-STORE adapter used by sweeps (C-GET, and the receiver for C-MOVE) until the node core lands.

The node core owns ``node.storage`` / ``node.index`` / ``node.handlers.handle_store``; once they are on
main, :func:`node.sweep.default_store_handler` should bind the core's store handler instead and this
module can go.  It follows the same contract so that swapping is invisible to the sweep:

``handler(event) -> int``: write ``event.encoded_dataset()`` atomically (temp file, fsync, rename) to
``<storage>/instances/<Study>/<Series>/<SOP>.dcm``, upsert the ``instances`` and ``series`` rows, then
return ``0x0000``; a missing UID answers ``0xC210`` (cannot understand), an OS error ``0xA700``.
A series that was complete and receives a new instance is reopened (generation + 1).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select

from node.audit import AuditSink
from node.db import Database, Instance, Series
from node.metrics import Metrics

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

ROUTING_KEYWORDS = ("Modality", "SeriesDescription", "BodyPartExamined", "ProtocolName", "Manufacturer",
                    "ImageType", "ContrastBolusAgent", "SliceThickness", "StudyDescription")


@dataclass
class InterimStore:
    """Storage folder + index; call :meth:`handle_store` from a pynetdicom ``EVT_C_STORE``."""

    storage_dir: Path
    db: Database
    metrics: Metrics | None = None
    audit: AuditSink | None = None
    fsync: bool = True

    def handle_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        peer = str(event.assoc.requestor.address)
        data: bytes = bytes(event.encoded_dataset())
        return self.store_bytes(data, calling, peer)

    def store_bytes(self, data: bytes, calling_ae: str, peer: str) -> int:
        try:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            sop = str(ds.get("SOPInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
        except (InvalidDicomError, ValueError, EOFError) as e:
            log.warning("store refused: unreadable dataset from %s@%s: %s", calling_ae, peer, e)
            return STATUS_CANNOT_UNDERSTAND
        if not (sop and series_uid and study_uid):
            log.warning("store refused: missing UIDs (sop=%r series=%r study=%r) from %s@%s",
                        sop, series_uid, study_uid, calling_ae, peer)
            return STATUS_CANNOT_UNDERSTAND
        rel = Path("instances") / study_uid / series_uid / f"{sop}.dcm"
        dest = self.storage_dir / rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".dcm")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            log.error("store failed: %s series=%s: %s", sop, series_uid, e)
            return STATUS_OUT_OF_RESOURCES
        self._index(ds, rel, data, calling_ae, peer)
        if self.metrics is not None:
            self.metrics.record_instance(len(data))
        if self.audit is not None:
            self.audit.write("store", calling_ae=calling_ae, peer=peer, sop_instance_uid=sop,
                              series_uid=series_uid, study_uid=study_uid, status=0)
        log.info("stored calling_ae=%s peer=%s sop=%s status=0x0000", calling_ae, peer, sop)
        return STATUS_SUCCESS

    def _index(self, ds: Any, rel: Path, data: bytes, calling_ae: str, peer: str) -> None:
        sop = str(ds.SOPInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
        t = time.time()
        attrs = {k: str(ds.get(k, "")) for k in ROUTING_KEYWORDS if k in ds}
        with self.db.session() as s:
            series = s.get(Series, series_uid)
            if series is None:
                series = Series(series_uid=series_uid, study_uid=str(ds.StudyInstanceUID),
                                patient_id=str(ds.get("PatientID", "")), modality=str(ds.get("Modality", "")),
                                description=str(ds.get("SeriesDescription", "")), attributes=attrs,
                                state="receiving", generation=0, instances=0, first_received=t,
                                last_received=t, source=calling_ae)
                s.add(series)
                s.flush()
            existing = s.get(Instance, sop)
            if existing is None:
                if series.state == "complete":
                    series.state = "receiving"
                    series.generation += 1
                s.add(Instance(sop_instance_uid=sop, series_uid=series_uid, study_uid=str(ds.StudyInstanceUID),
                               sop_class_uid=str(ds.get("SOPClassUID", "")),
                               transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
                               path=str(rel), size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                               instance_number=int(ds.InstanceNumber) if "InstanceNumber" in ds else None,
                               received_at=t, calling_ae=calling_ae, peer=peer, generation=series.generation))
                s.flush()
                series.instances = int(s.scalar(select(func.count()).select_from(Instance)
                                                 .where(Instance.series_uid == series_uid)) or 0)
            else:
                existing.size = len(data)
                existing.sha256 = hashlib.sha256(data).hexdigest()
                existing.received_at = t
            series.last_received = t
