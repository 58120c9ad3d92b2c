"""STOW-RS receiver: ``POST /dicom-web/studies`` on the node's web server (PS3.18 10.5, Store Instances).

Each part of the ``multipart/related; type="application/dicom"`` body is a DICOM Part 10 file.  It goes
through the same door as a C-STORE (:class:`node.handlers.Door`: the header checks, the image checks,
``node.max_dataset_bytes``, the atomic write into the one :class:`~node.storage.Storage`, the index with
the route keywords, one log line and one audit record), so completion, routing and jobs see it exactly as
an instance received by C-STORE.  Only SOP classes and transfer syntaxes the SCP accepts are taken
(:mod:`node.dicom_facts`).

The request body is spooled to a temporary file next to the storage (never held in memory), at most
``[web] stow_max_request_bytes`` (413 beyond).  The answer is ``application/dicom+json`` (PS3.18 10.5.3):
ReferencedSOPSequence for the stored instances, FailedSOPSequence with a FailureReason (the C-STORE status
the door gave, or 0122 / C122 for a SOP class or transfer syntax not accepted) for the others, and one
``Warning: 299`` header per refused part with the reason in words; 200 when every instance was stored,
202 when some were, 409 when none was; 400 for a body that is not multipart, 415 for another media type.
The write token is required (node.web.auth, as every write of the web app).

Metrics (node.metrics): every part counts in ``prognode_instances_received_total`` and its bytes (the Part 10
file as received) in ``prognode_bytes_received_total``, as each C-STORE request does, refused ones included;
each request answered counts in ``prognode_stow_requests_total{outcome}`` (:data:`OUTCOMES`)."""

from __future__ import annotations

import logging
import mmap
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import IO, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from node.audit import AuditSink
from node.config import Config
from node.db import Database
from node.dicom_facts import STORAGE_CLASS_UIDS, TRANSFER_SYNTAX_UIDS
from node.handlers import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PREAMBLE, Door, Receipt
from node.header import file_meta_bytes
from node.index import Index
from node.metrics import Metrics
from node.server import route_keywords
from node.storage import Storage

logger = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom"
RESPONSE_TYPE = "application/dicom+json"
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.18 Table 10.5.3-2: Referenced SOP Class not supported
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # PS3.18 Table 10.5.3-2: Referenced Transfer Syntax not supported
META_MAX_BYTES = 64 * 1024  # a File Meta Information group longer than this is not one
MAX_WARNINGS = 20  # Warning headers per response
_ACCEPTED_CLASSES = frozenset(str(u) for u in STORAGE_CLASS_UIDS)
_ACCEPTED_SYNTAXES = frozenset(str(u) for u in TRANSFER_SYNTAX_UIDS)
# the outcome label of prognode_stow_requests_total for each HTTP status a STOW-RS request is answered with
OUTCOMES = {200: "stored", 202: "partial", 409: "refused", 400: "malformed", 413: "too_large",
            415: "unsupported_media_type", 503: "unavailable"}
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^;,\s"]{1,200}))', re.IGNORECASE)


class StowError(Exception):
    """The request as a whole is refused: ``status`` (400, 413, 415) and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class StowResult:
    """The answer: HTTP status, the PS3.18 response data set (DICOM JSON), Warning headers."""

    status: int
    body: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` content type; StowError 415 or 400."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/related":
        raise StowError(415, f"Content-Type {media.strip() or '(none)'!r}: send multipart/related; "
                             f'type="{MEDIA_TYPE}"')
    kind = re.search(r'type="?([^";]+)"?', params, re.IGNORECASE)
    if kind is not None and kind.group(1).strip().lower() != MEDIA_TYPE:
        raise StowError(415, f"multipart/related of {kind.group(1).strip()!r}: only {MEDIA_TYPE} parts "
                             "(DICOM Part 10 files) are accepted")
    m = _BOUNDARY.search(params)
    if m is None:
        raise StowError(400, "multipart/related without a boundary")
    return (m.group(1) or m.group(2)).encode("latin-1")


def split_parts(buf: Any, boundary: bytes) -> Iterator[tuple[dict[str, str], int, int]]:
    """(headers, start, end) of each part of the multipart body ``buf`` (bytes or mmap); StowError 400
    when the body is not one."""
    dash = b"--" + boundary
    pos = buf.find(dash)
    if pos < 0:
        raise StowError(400, "multipart body without its boundary")
    while True:
        pos += len(dash)
        if buf[pos:pos + 2] == b"--":
            return
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise StowError(400, "multipart body ends inside a boundary line")
        head_end = buf.find(b"\r\n\r\n", eol)
        if head_end < 0:
            raise StowError(400, "multipart part without the blank line after its headers")
        headers: dict[str, str] = {}
        for line in bytes(buf[eol + 2:head_end]).split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
        start = head_end + 4
        end = buf.find(b"\r\n" + dash, start)
        if end < 0:
            raise StowError(400, "multipart part without a closing boundary")
        yield headers, start, end
        pos = end + 2


def _meta(part: memoryview) -> tuple[str, str, str, int]:
    """(SOP class, SOP instance, transfer syntax, offset of the data set) from a Part 10 file's File Meta
    Information; ValueError with the reason when it is not one."""
    if len(part) < 144 or bytes(part[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix after the 128-byte preamble)")
    tag, vr, length = struct.unpack("<I2sH", part[132:140])
    if tag != 0x00000002 or vr != b"UL" or length != 4:
        raise ValueError("File Meta Information without its group length (0002,0000)")
    end = 144 + struct.unpack("<I", part[140:144])[0]
    if end > len(part) or end - 144 > META_MAX_BYTES:
        raise ValueError("File Meta Information group length beyond the part")
    meta = pydicom.dcmread(BytesIO(bytes(part[:end]))).file_meta  # the meta group alone: no data set follows
    sop_class = str(meta.get("MediaStorageSOPClassUID", "")).strip()
    sop = str(meta.get("MediaStorageSOPInstanceUID", "")).strip()
    syntax = str(meta.get("TransferSyntaxUID", "")).strip()
    if not (sop_class and sop and syntax):
        raise ValueError("File Meta Information without Media Storage SOP Class/Instance UID or Transfer Syntax UID")
    return sop_class, sop, syntax, end


def _item(sop_class: str, sop: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or ""
    item.ReferencedSOPInstanceUID = sop or ""
    if reason is not None:
        item.FailureReason = reason
    return item


def warning(text: str) -> str:
    """An HTTP Warning header value (RFC 7234 5.5, PS3.18 8.3.5.1): ``299 prognode "text"``."""
    clean = text.encode("latin-1", "replace").decode("latin-1").replace("\\", "/").replace('"', "'")
    return f'299 prognode "{"".join(c if c.isprintable() else " " for c in clean)[:300]}"'


class StowReceiver:
    """Stores the parts of STOW-RS requests through the node's door (:class:`node.handlers.Door`)."""

    def __init__(self, config: Config, db: Database, audit: AuditSink, metrics: Metrics | None = None) -> None:
        self.config = config
        self.db = db
        self.audit = audit
        self.metrics = metrics
        self.max_request_bytes = config.web.stow_max_request_bytes
        self._door: Door | None = None

    @property
    def door(self) -> Door:
        if self._door is None:  # the process's one Storage of the folder, shared with the SCP
            cfg = self.config
            store = Storage.shared(cfg.storage_dir, cfg.node.fsync, cfg.node.min_free_bytes)
            self._door = Door(store, Index(self.db, cfg.storage_dir), self.audit, route_keywords(cfg),
                              cfg.node.max_dataset_bytes, via="STOW-RS")
        return self._door

    def count(self, status: int) -> None:
        """Count a request answered with HTTP ``status`` (also those the web app answers before :meth:`receive`)."""
        if self.metrics is not None:
            self.metrics.record_stow_request(OUTCOMES.get(status, "other"))

    def spool(self) -> IO[bytes]:
        """A temporary file for a request body, on the storage's file system, gone when closed."""
        folder = self.config.storage_dir
        folder.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryFile(dir=folder, prefix="stow-", suffix=".tmp")

    def receive(self, body: IO[bytes], size: int, content_type: str, peer: str) -> StowResult:
        """Store every part of the spooled request ``body`` (``size`` bytes); the PS3.18 answer."""
        try:
            boundary = boundary_of(content_type)
            if size == 0:
                raise StowError(400, "empty request body")
            with mmap.mmap(body.fileno(), size, access=mmap.ACCESS_READ) as mm:
                receipts = self._parts(mm, boundary, peer)
        except StowError as e:
            logger.warning("STOW-RS from %s refused: HTTP %d %s", peer, e.status, e.reason)
            self.audit.write("stow_refused", peer=peer, status=e.status, reason=e.reason)
            self.count(e.status)
            return StowResult(e.status, {}, [warning(e.reason)])
        stored = [r for r in receipts if r.ok]
        failed = [r for r in receipts if not r.ok]
        answer = Dataset()
        if stored:
            answer.ReferencedSOPSequence = [_item(r.sop_class_uid, r.sop_instance_uid) for r in stored]
        if failed:
            answer.FailedSOPSequence = [_item(r.sop_class_uid, r.sop_instance_uid, r.status) for r in failed]
        status = 200 if not failed else (202 if stored else 409)
        warnings = [warning(f"{r.sop_instance_uid or 'part'}: {r.reason}") for r in failed[:MAX_WARNINGS]]
        logger.info("STOW-RS from %s: %d stored, %d refused (HTTP %d)", peer, len(stored), len(failed), status)
        self.count(status)
        return StowResult(status, answer.to_json_dict(), warnings)

    def _parts(self, mm: mmap.mmap, boundary: bytes, peer: str) -> list[Receipt]:
        receipts: list[Receipt] = []
        view = memoryview(mm)
        try:
            for headers, start, end in split_parts(mm, boundary):
                part = view[start:end]
                if self.metrics is not None:  # as a C-STORE request is counted on arrival (node.metrics)
                    self.metrics.record_instance(len(part))
                try:
                    receipts.append(self._one(part, headers, peer))
                finally:
                    part.release()
        finally:
            view.release()
        if not receipts:
            raise StowError(400, "multipart body without parts")
        return receipts

    def _one(self, part: memoryview, headers: dict[str, str], peer: str) -> Receipt:
        door = self.door
        media = headers.get("content-type", MEDIA_TYPE).split(";")[0].strip().lower()
        if media != MEDIA_TYPE:
            return door.outcome(CANNOT_UNDERSTAND, f"part of type {media!r}: only {MEDIA_TYPE} is accepted", "", "",
                                peer)
        cap = door.max_dataset_bytes  # the SCP's cap on one data set (node.max_dataset_bytes)
        if len(part) > cap + META_MAX_BYTES + len(PREAMBLE):  # checked before reading anything
            return door.outcome(OUT_OF_RESOURCES, f"part of {len(part)} bytes over node.max_dataset_bytes ({cap})",
                                "", "", peer)
        try:
            sop_class, sop, syntax, offset = _meta(part)
        except Exception as e:
            return door.outcome(CANNOT_UNDERSTAND, f"unreadable part: {e}", "", "", peer)
        if len(part) - offset > cap:
            return door.outcome(OUT_OF_RESOURCES, f"data set of {len(part) - offset} bytes over "
                                                  f"node.max_dataset_bytes ({cap})", sop, "", peer, sop_class)
        if sop_class not in _ACCEPTED_CLASSES:
            return door.outcome(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {sop_class[:64]} not accepted", sop, "",
                                peer, sop_class)
        if syntax not in _ACCEPTED_SYNTAXES:
            return door.outcome(TRANSFER_SYNTAX_NOT_SUPPORTED, f"Transfer Syntax {syntax[:64]} not accepted", sop,
                                "", peer, sop_class)
        head = PREAMBLE + file_meta_bytes(sop_class, sop, syntax, PYNETDICOM_IMPLEMENTATION_UID,
                                          PYNETDICOM_IMPLEMENTATION_VERSION)
        body = part[offset:]
        try:
            return door.receive(head, body, UID(syntax), sop, sop_class, "", peer,
                                decode=lambda: pydicom.dcmread(BytesIO(bytes(part)), force=True))
        finally:
            body.release()
