"""Typed DIMSE and association event handlers, bound with explicit dependencies.

C-STORE does cheap durable work only: validate, write the encoded dataset atomically,
index it, then answer.  Every failure answers a named DIMSE status with the reason in
ErrorComment, writes one log line and one audit record, and leaves nothing partial.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.status import Status

from node.audit import AuditSink
from node.header import (
    HeaderError,
    HeaderReader,
    ImageError,
    ImageFacts,
    VRMismatch,
    check_image,
    file_meta_bytes,
    readable_here,
)
from node.index import META_KEYWORDS, ROUTING_KEYWORDS, Index, InstanceMeta, InvalidInstance
from node.logs import AuditLog
from node.storage import OutOfSpace, Storage

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 Table B.2-1), named here rather than as bare numbers at call sites.
SUCCESS = int(Status.SUCCESS)
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk full, write error, index unavailable)
DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class (missing or invalid UIDs)
CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (unreadable dataset)

ERROR_COMMENT_MAX = 64  # ErrorComment is LO
PREAMBLE = b"\x00" * 128 + b"DICM"  # PS3.10 7.1: preamble and prefix before the File Meta Information


class OpenAssociations:
    """Series that an association still open has delivered instances of.

    While the sender's association is open more slices may come, so completion waits for
    its release (or for ``quiet_seconds``) even when the stack already looks complete.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[int, set[str]] = {}

    def add(self, assoc_id: int, series_uid: str) -> None:
        with self._lock:
            self._series.setdefault(assoc_id, set()).add(series_uid)

    def close(self, assoc_id: int) -> None:
        with self._lock:
            self._series.pop(assoc_id, None)

    def busy(self) -> set[str]:
        with self._lock:
            return set().union(*self._series.values()) if self._series else set()


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return ds


def peer_of(event: Event) -> tuple[str, str]:
    """(calling AE title, 'host:port') of the association's requestor."""
    req = event.assoc.requestor
    return str(req.ae_title).strip(), f"{req.address}:{req.port}"


def handle_store(event: Event, store: Storage, index: Index, audit: AuditLog,
                 extra_keywords: Sequence[str] = (), open_associations: OpenAssociations | None = None) -> Dataset:
    """EVT_C_STORE: validate, write atomically, index, then answer (:func:`receive_instance`)."""
    calling, peer = peer_of(event)
    rq_sop = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
    dropped = int(getattr(event.request, "dropped_bytes", 0) or 0)
    door = Door(store, index, audit, extra_keywords, _max_dataset_bytes(event))
    if dropped:  # node.transport dropped the data set as it arrived: over node.max_dataset_bytes
        return _status_of(door.outcome(OUT_OF_RESOURCES, f"data set of {dropped} bytes over "
                                                         f"node.max_dataset_bytes ({door.max_dataset_bytes})",
                                       rq_sop, calling, peer))
    try:
        request = cast(C_STORE, event.request)
        syntax = event.context.transfer_syntax
        rq_class = str(request.AffectedSOPClassUID or "")
        head = PREAMBLE + file_meta_bytes(rq_class, rq_sop, str(syntax),
                                          event.assoc.acceptor.implementation_class_uid or "",
                                          event.assoc.acceptor.implementation_version_name or "")
        stream = _encoded_dataset(event)
    except Exception as e:
        return _status_of(door.outcome(CANNOT_UNDERSTAND, f"unreadable request: {type(e).__name__}: {e}", rq_sop,
                                       calling, peer))
    with stream.getbuffer() as body:  # the encoded dataset, not copied
        receipt = door.receive(head, body, syntax, rq_sop, rq_class, calling, peer, decode=lambda: event.dataset)
    if receipt.ok and open_associations is not None:
        open_associations.add(id(event.assoc), receipt.series_uid)
    return _status_of(receipt)


@dataclass(frozen=True)
class Receipt:
    """What became of one received instance: ``status`` is a C-STORE status (PS3.4 Table B.2-1), also the
    FailureReason of a STOW-RS response; ``reason`` says why it was refused."""

    status: int
    reason: str
    sop_instance_uid: str
    sop_class_uid: str = ""
    series_uid: str = ""
    study_uid: str = ""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def _status_of(receipt: Receipt) -> Dataset:
    return _status(receipt.status, "" if receipt.ok else receipt.reason)


@dataclass(frozen=True)
class Door:
    """The checks at the door, the write and the index of one received instance, whatever brought it
    (C-STORE here, STOW-RS in node.stow): one log line and one audit record per instance."""

    store: Storage
    index: Index
    audit: AuditSink
    extra_keywords: Sequence[str] = ()
    max_dataset_bytes: int = 1 << 30
    via: str = "C-STORE"

    def outcome(self, code: int, reason: str, sop: str, calling: str, peer: str, sop_class: str = "",
                series_uid: str = "", study_uid: str = "", **extra: Any) -> Receipt:
        ok = code == SUCCESS
        logger.log(logging.INFO if ok else logging.WARNING,
                   "%s %s from %s: SOP Instance %s status 0x%04X%s", self.via, "stored" if ok else "refused",
                   f"{calling} at {peer}" if calling else peer, sop or "?", code, f" ({reason})" if reason else "")
        if self.via != "C-STORE":
            extra["via"] = self.via
        if series_uid:
            extra.update(series_uid=series_uid, study_uid=study_uid)
        self.audit.write("instance_stored" if ok else "instance_refused", calling_ae=calling, peer=peer,
                         sop_instance_uid=sop, status=f"0x{code:04X}", reason=reason, **extra)
        return Receipt(code, reason, sop, sop_class, series_uid, study_uid)

    def receive(self, head: bytes, body: memoryview, syntax: UID, rq_sop: str, rq_class: str, calling: str,
                peer: str, decode: Callable[[], Dataset]) -> Receipt:
        """Validate the encoded data set ``body`` (in ``syntax``; ``rq_sop`` and ``rq_class`` are what the
        sender said it is), write ``head`` + ``body`` atomically, index it.  ``decode`` gives pydicom's
        decoding, for the syntaxes node.header does not read (big endian)."""

        def outcome(code: int, reason: str, sop: str = rq_sop, **extra: Any) -> Receipt:
            return self.outcome(code, reason, sop, calling, peer, rq_class, **extra)

        # The header is read first (a fraction of a millisecond, see node.header), so that a refused
        # instance is never written; then the file is written durably and indexed.
        t0 = time.perf_counter()
        try:
            texts, facts = _header(syntax, body, self.extra_keywords, self.max_dataset_bytes, decode)
            meta = InstanceMeta.from_text(texts, self.extra_keywords)
        except TooLarge as e:
            return outcome(OUT_OF_RESOURCES, str(e))
        except VRMismatch as e:  # named as it is: the peer encodes in another syntax than it proposed
            return outcome(CANNOT_UNDERSTAND, str(e))
        except HeaderError as e:
            return outcome(CANNOT_UNDERSTAND, f"unreadable dataset: {e}")
        except InvalidInstance as e:
            return outcome(DATASET_MISMATCH, f"{e}; assign valid UIDs before sending")
        except Exception as e:  # pydicom raises many types on malformed data
            return outcome(CANNOT_UNDERSTAND, f"unreadable dataset: {type(e).__name__}: {e}")
        if rq_sop and meta.sop_instance_uid != rq_sop:
            return outcome(DATASET_MISMATCH, "SOPInstanceUID differs from Affected SOP Instance UID",
                           sop=meta.sop_instance_uid)
        if rq_class and meta.sop_class_uid != rq_class:
            return outcome(DATASET_MISMATCH, "data set's SOP Class UID differs from Affected SOP Class UID",
                           sop=meta.sop_instance_uid, sop_class_uid=meta.sop_class_uid[:64])
        if facts is not None:
            try:
                check_image(facts, meta.sop_class_uid, bool(syntax.is_implicit_VR))
            except ImageError as e:
                return outcome(DATASET_MISMATCH, str(e), sop=meta.sop_instance_uid)
        store, index = self.store, self.index
        try:
            stored = store.stage_instance(meta.study_uid, meta.series_uid, meta.sop_instance_uid, (head, body))
        except OutOfSpace as e:
            return outcome(OUT_OF_RESOURCES, f"out of disk space: {e.strerror}", sop=meta.sop_instance_uid)
        except (OSError, ValueError) as e:
            return outcome(OUT_OF_RESOURCES, f"write error: {getattr(e, 'strerror', None) or e}",
                           sop=meta.sop_instance_uid)
        t1 = time.perf_counter()
        try:
            rec = index.record_instance(meta, stored.path, stored.size, stored.sha256, str(syntax), calling, peer)
        except Exception as e:
            logger.exception("index write failed for %s", meta.sop_instance_uid)
            # a staged copy goes and an earlier acknowledged file of the instance stays as it was
            if stored.staged or not index.has_instance_safely(meta.sop_instance_uid):
                store.discard(stored)
            return outcome(OUT_OF_RESOURCES, f"index write failed: {type(e).__name__}", sop=meta.sop_instance_uid)
        try:
            store.commit(stored)  # a new copy of an instance already here replaces it now that it is indexed
        except OSError as e:
            return outcome(OUT_OF_RESOURCES, f"write error: {e.strerror or e}", sop=meta.sop_instance_uid)
        return outcome(SUCCESS, "", sop=meta.sop_instance_uid, series_uid=meta.series_uid, study_uid=meta.study_uid,
                       bytes=stored.size, generation=rec.generation, reopened=rec.reopened,
                       write_ms=round((t1 - t0) * 1000, 2), index_ms=round((time.perf_counter() - t1) * 1000, 2))


@functools.lru_cache(maxsize=8)
def _reader(extra_keywords: tuple[str, ...]) -> HeaderReader:
    return HeaderReader.for_keywords((*META_KEYWORDS, *ROUTING_KEYWORDS, *extra_keywords))


def _header(syntax: UID, body: memoryview, extra_keywords: Sequence[str], max_dataset_bytes: int,
            decode: Callable[[], Dataset]) -> tuple[dict[str, str], ImageFacts | None]:
    """:func:`read_received` for ``syntax``, or pydicom's decoding (``decode``) for big endian ones (no
    image facts then)."""
    if readable_here(syntax) or syntax.is_deflated:
        return read_received(body, syntax, extra_keywords, max_dataset_bytes)
    ds = decode()
    broken = truncation(ds)
    if broken:
        raise HeaderError(broken)
    return InstanceMeta.text_of(ds, extra_keywords), None


def read_received(body: bytes | memoryview, syntax: UID, extra_keywords: Sequence[str],
                  max_dataset_bytes: int) -> tuple[dict[str, str], ImageFacts]:
    """The text of the attributes InstanceMeta needs and the data set's :class:`ImageFacts`, read straight
    from the encoded little endian data set as received (see :mod:`node.header`; a deflated one is inflated
    first, with a cap): what the C-STORE handler indexes.  Raises :class:`HeaderError` (including a VR
    mismatch with ``syntax``), :class:`TooLarge`."""
    if syntax.is_deflated:  # inflated here, with a cap, then read as explicit VR little endian
        return _reader(tuple(extra_keywords)).read_instance(inflate(body, max_dataset_bytes), False)
    return _reader(tuple(extra_keywords)).read_instance(body, bool(syntax.is_implicit_VR))


class TooLarge(ValueError):
    """The data set is longer than node.max_dataset_bytes."""


INFLATE_CHUNK = 4 * 1024 * 1024


def inflate(data: bytes | memoryview, cap: int) -> bytes:
    """The deflated data set ``data`` (PS3.5 A.5: raw deflate) inflated.

    Two passes: the first inflates in pieces of at most ``INFLATE_CHUNK`` and keeps nothing, only counting,
    and raises :class:`TooLarge` as soon as the count passes ``cap`` (a deflate bomb costs one piece of
    memory and some CPU, never its inflated size); the second, for a data set within the cap, keeps the
    output.  :class:`HeaderError` when the stream is broken."""
    _inflated_size(data, cap)
    try:
        return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as e:
        raise HeaderError(f"deflated data set broken: {e}") from e


def _inflated_size(data: bytes | memoryview, cap: int) -> int:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    pending: bytes | memoryview = data
    try:
        while pending:
            size += len(inflater.decompress(pending, INFLATE_CHUNK))
            if size > cap:
                raise TooLarge(f"inflated data set over node.max_dataset_bytes ({cap})")
            pending = inflater.unconsumed_tail
        size += len(inflater.flush())
    except zlib.error as e:
        raise HeaderError(f"deflated data set broken: {e}") from e
    if size > cap:
        raise TooLarge(f"inflated data set over node.max_dataset_bytes ({cap})")
    return size


def _max_dataset_bytes(event: Event) -> int:
    limits = getattr(getattr(event.assoc, "dimse", None), "limits", None)
    return int(limits.max_dataset_bytes) if limits is not None else DEFAULT_MAX_DATASET_BYTES


DEFAULT_MAX_DATASET_BYTES = 1 << 30  # without a node.transport.ConnectionGate (tests' plain servers)


def _encoded_dataset(event: Event) -> BytesIO:
    """The C-STORE request's dataset as received (encoded in the context's transfer syntax)."""
    stream = cast(C_STORE, event.request).DataSet
    if not isinstance(stream, BytesIO):
        raise OSError("no encoded dataset in the C-STORE request")
    return stream


UNDEFINED_LENGTH = 0xFFFFFFFF


def truncation(ds: Dataset) -> str:
    """Why the decoded dataset is visibly incomplete ('' when it is not)."""
    if len(ds) == 0:
        return "no data elements"
    last = ds.get_item(sorted(ds.keys())[-1])
    length = getattr(last, "length", None)
    value = getattr(last, "value", None)
    if isinstance(length, int) and length != UNDEFINED_LENGTH and isinstance(value, (bytes, bytearray)) \
            and len(value) < length:
        return f"element {last.tag} truncated ({len(value)} of {length} bytes)"
    return ""


def handle_echo(event: Event, audit: AuditLog) -> int:
    calling, peer = peer_of(event)
    logger.info("C-ECHO from %s at %s", calling, peer)
    audit.write("echo", calling_ae=calling, peer=peer)
    return SUCCESS


def handle_association(event: Event, audit: AuditLog, open_associations: OpenAssociations | None = None) -> None:
    """EVT_ACCEPTED, EVT_REJECTED, EVT_RELEASED, EVT_ABORTED: one line each."""
    if open_associations is not None and event.event in (evt.EVT_RELEASED, evt.EVT_ABORTED):
        open_associations.close(id(event.assoc))
    calling, peer = peer_of(event)
    names: dict[Any, str] = {evt.EVT_ACCEPTED: "accepted", evt.EVT_REJECTED: "rejected",
                             evt.EVT_RELEASED: "released", evt.EVT_ABORTED: "aborted"}
    what = names.get(event.event, event.event.name)
    called = str(event.assoc.acceptor.ae_title).strip()
    level = logging.WARNING if what in ("rejected", "aborted") else logging.INFO
    reason = str(getattr(event.assoc, "rejection_reason", "") or "") if what == "rejected" else ""
    logger.log(level, "association %s: calling %s at %s, called %s%s", what, calling, peer, called,
               f" ({reason})" if reason else "")
    audit.write(f"association_{what}", calling_ae=calling, peer=peer, called_ae=called,
                **({"reason": reason} if reason else {}))
