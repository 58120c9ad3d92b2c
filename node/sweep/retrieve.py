"""Retrieval of one series: C-MOVE, C-GET or WADO-RS, every instance stored by the node's own C-STORE path.

* **C-MOVE** asks the PACS to send the series to the node's AE title (``[node].ae_title``, or the source's
  ``move_destination``): the running node's SCP (``prognode serve``) receives it, with its one
  :class:`~node.storage.Storage`, its route keywords, its door checks and caps.  The PACS must know the
  node's AE title with its host and port as a move destination.  Nothing else receives: a C-MOVE sweep
  with no node listening at ``[node].host:port`` stops with an error saying so (C-GET and WADO-RS need no
  running node).
* **C-GET** sub-operations come back on the sweep's own association; they are served by
  :func:`node.handlers.handle_store` (the SCP's handler) bound by :func:`default_store_handler` to the
  process's one Storage of the folder, the index and the route keywords, with the SCP's caps
  (``[node].max_dataset_bytes``).
* **WADO-RS** (``kind = "dicomweb"`` sources) yields each instance's Part 10 bytes; :func:`store_part10`
  hands them to the same handler as a C-STORE request of the source (:class:`Part10Request`), after the
  checks the SCP makes when it negotiates (SOP class and transfer syntax in :mod:`node.dicom_facts`).
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    build_role,
    evt,
)
from pynetdicom.association import Association

from node.audit import AuditLog, AuditSink
from node.config import Config, DicomwebSourceConfig, SourceConfig
from node.db import Database
from node.dicom_facts import (
    STORAGE_CLASS_UIDS,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    TRANSFER_SYNTAX_UIDS,
)
from node.handlers import CANNOT_UNDERSTAND, SUCCESS, OpenAssociations, handle_store
from node.index import Index
from node.metrics import Metrics
from node.server import limits_of, route_keywords
from node.storage import Storage
from node.sweep import dicomweb
from node.sweep.plan import SweepError

log = logging.getLogger(__name__)

StoreHandler = Callable[[Any], Any]  # EVT_C_STORE handler: event -> status (int or Dataset)
Associate = Callable[..., Association]  # (src, ae, ext_neg=..., handlers=...) -> established association
Source = SourceConfig | DicomwebSourceConfig

# Series a sweep of this process is retrieving by C-GET or WADO-RS (the store handler runs here): completion
# waits for them as for a series an open association still delivers (node.service passes in_flight() on)
IN_FLIGHT = OpenAssociations()


def in_flight() -> set[str]:
    return IN_FLIGHT.busy()


@contextmanager
def _retrieving(series_uid: str) -> Iterator[None]:
    token = object()
    if series_uid:
        IN_FLIGHT.add(id(token), series_uid)
    try:
        yield
    finally:
        IN_FLIGHT.close(id(token))


SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported (PS3.4 C.4.2.1.4 / the SCP's negotiation)


def method_of(src: Source) -> str:
    """``move``, ``get`` or ``wado`` (the metrics label and the report's method)."""
    return "wado" if isinstance(src, DicomwebSourceConfig) else src.retrieve


def method_label(src: Source) -> str:
    return "WADO-RS" if isinstance(src, DicomwebSourceConfig) else f"C-{src.retrieve.upper()}"


def describe(src: Source) -> str:
    return src.url if isinstance(src, DicomwebSourceConfig) else f"{src.ae_title}@{src.host}:{src.port}"


# The store path ----------------------------------------------------------------------------------


def default_store_handler(config: Config, db: Database, metrics: Metrics | None = None,
                          audit: AuditSink | None = None, storage: Storage | None = None) -> StoreHandler:
    """The node's own C-STORE path (:func:`node.handlers.handle_store`: door checks, atomic write, index) with the
    SCP's route keywords, through ``storage`` or else the process's one :class:`Storage` of the folder
    (:meth:`Storage.shared`: inside ``prognode serve``, the node's own)."""
    if storage is None:
        storage = Storage.shared(config.storage_dir, fsync=config.node.fsync,
                                 min_free_bytes=config.node.min_free_bytes)
    index = Index(db, config.storage_dir)
    core_audit: Any = audit if audit is not None else AuditLog(None)  # handle_store is typed with AuditLog
    core = functools.partial(handle_store, store=storage, index=index, audit=core_audit,
                             extra_keywords=route_keywords(config))
    return core if metrics is None else functools.partial(_metered_store, core, metrics)


def _metered_store(handler: StoreHandler, metrics: Metrics, event: Any) -> Any:
    """Call the store handler, then count the instance and its bytes when it was stored."""
    status = handler(event)
    if status_code(status) == SUCCESS:
        raw: Any = getattr(event.request, "DataSet", None)
        size = raw.getbuffer().nbytes if raw is not None and hasattr(raw, "getbuffer") else 0
        metrics.record_instance(int(size))
    return status


def status_code(status: Any) -> int:
    return int(status.Status) if isinstance(status, Dataset) else int(status)


def _capped(handler: StoreHandler, max_dataset_bytes: int) -> StoreHandler:
    """C-GET: a data set over ``max_dataset_bytes`` is answered as the SCP answers one (Out of Resources, the
    size named) by the same handler, which sees it as dropped."""

    def store(event: Any) -> Any:
        raw: Any = getattr(event.request, "DataSet", None)
        size = raw.getbuffer().nbytes if raw is not None and hasattr(raw, "getbuffer") else 0
        if size > max_dataset_bytes:
            event.request.dropped_bytes = size
        return handler(event)

    return store


# Part 10 bytes as a C-STORE request (WADO-RS) ------------------------------------------------------


@dataclass
class _Requestor:
    ae_title: str
    address: str
    port: int


@dataclass
class _Acceptor:
    implementation_class_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version_name: str = PYNETDICOM_IMPLEMENTATION_VERSION


@dataclass
class _Limits:
    max_dataset_bytes: int


@dataclass
class _Dimse:
    limits: _Limits


@dataclass
class _Assoc:
    requestor: _Requestor
    dimse: _Dimse
    acceptor: _Acceptor = field(default_factory=_Acceptor)


@dataclass
class _Request:
    AffectedSOPClassUID: str
    AffectedSOPInstanceUID: str
    DataSet: BytesIO
    dropped_bytes: int = 0


@dataclass
class _Context:
    transfer_syntax: UID


@dataclass
class Part10Request:
    """What :func:`node.handlers.handle_store` reads of an ``EVT_C_STORE`` event, for an instance that came as
    Part 10 bytes (WADO-RS): the data set as encoded, its transfer syntax, SOP class and instance from the file
    meta, the source as the calling peer, the node's data set cap."""

    assoc: _Assoc
    request: _Request
    context: _Context

    @property
    def dataset(self) -> Dataset:  # only read for syntaxes node.header cannot read (none accepted here)
        ds = pydicom.dcmread(BytesIO(self.request.DataSet.getvalue()), force=True)
        return ds


def part10_request(data: bytes, calling: str, host: str, port: int, max_dataset_bytes: int) -> Part10Request:
    """Split Part 10 bytes into file meta and data set; raises ValueError when there is no usable file meta."""
    fp = BytesIO(data)
    read_preamble(fp, True)  # the 128-byte preamble and DICM, when present
    meta = _read_file_meta_info(fp)
    syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not syntax:
        raise ValueError("no Transfer Syntax UID in the file meta")
    body = data[fp.tell():]
    dropped = len(body) if len(body) > max_dataset_bytes else 0
    request = _Request(str(meta.get("MediaStorageSOPClassUID", "") or ""),
                       str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
                       BytesIO(b"" if dropped else body), dropped)
    return Part10Request(_Assoc(_Requestor(calling, host, port), _Dimse(_Limits(max_dataset_bytes))), request,
                         _Context(UID(syntax)))


def _refused(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def store_part10(data: bytes, handler: StoreHandler, calling: str, host: str, port: int,
                 max_dataset_bytes: int, audit: AuditSink | None = None) -> Dataset | int:
    """Store one instance given as Part 10 bytes through ``handler`` (the node's C-STORE handler); the status.

    The SOP class and transfer syntax are checked first against the SCP's table, as its presentation context
    negotiation would (an instance in another syntax is refused, never transcoded)."""
    try:
        req = part10_request(data, calling, host, port, max_dataset_bytes)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on malformed data
        reason = f"unreadable Part 10 file: {type(e).__name__}: {e}"
        return _refuse(CANNOT_UNDERSTAND, reason, calling, f"{host}:{port}", "", audit)
    sop_class, syntax = req.request.AffectedSOPClassUID, str(req.context.transfer_syntax)
    if sop_class not in STORAGE_CLASS_UIDS:
        return _refuse(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} not accepted by this node", calling,
                       f"{host}:{port}", req.request.AffectedSOPInstanceUID, audit)
    if syntax not in TRANSFER_SYNTAX_UIDS:
        return _refuse(SOP_CLASS_NOT_SUPPORTED, f"transfer syntax {syntax} not accepted by this node", calling,
                       f"{host}:{port}", req.request.AffectedSOPInstanceUID, audit)
    return handler(req)  # type: ignore[no-any-return]


def _refuse(code: int, reason: str, calling: str, peer: str, sop: str, audit: AuditSink | None) -> Dataset:
    log.warning("instance from %s at %s refused: SOP Instance %s status 0x%04X (%s)", calling, peer, sop or "?",
                code, reason)
    if audit is not None:
        audit.write("instance_refused", calling_ae=calling, peer=peer, sop_instance_uid=sop,
                    status=f"0x{code:04X}", reason=reason)
    return _refused(code, reason)


# DIMSE -------------------------------------------------------------------------------------------


def listening(host: str, port: int) -> bool:
    """True when something (the running node) holds ``host:port``.

    Checked by trying to bind, not by connecting: a bare TCP connect would leave the node's SCP
    waiting for an A-ASSOCIATE-RQ until its ACSE timeout.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_move_destination(config: Config, src: Source) -> None:
    """A C-MOVE to the node's own AE needs the node's SCP running (``prognode serve``)."""
    if not isinstance(src, SourceConfig) or src.retrieve != "move":
        return
    node = config.node
    if src.move_destination and src.move_destination != node.ae_title:
        return  # another AE receives (e.g. a router that forwards to the node)
    if not listening(node.host, node.port):
        raise SweepError(f"C-MOVE from {src.name} delivers to {node.ae_title} at {node.host}:{node.port}, the node's "
                         "own SCP, and nothing listens there: start `prognode serve` first (the PACS must know "
                         f"{node.ae_title} at that address as a move destination), or use retrieve = \"get\"")


def retrieve_contexts(ae: AE, model: str) -> list[Any]:
    """Request the retrieve model plus storage contexts with the SCP role (for C-GET): the SOP classes
    and transfer syntaxes the node's SCP accepts (:mod:`node.dicom_facts`)."""
    ae.add_requested_context(model)
    roles = []
    for uid in STORAGE_CLASS_UIDS:
        ae.add_requested_context(uid, list(TRANSFER_SYNTAX_UIDS))
        roles.append(build_role(uid, scp_role=True))
    return roles


def _drain(responses: Any) -> tuple[int, int, int]:
    completed = failed = 0
    final = 0xFFFF
    for status, _ident in responses:
        if status is None or "Status" not in status:  # pynetdicom: an empty Dataset when no response came
            raise SweepError("retrieve: no response (connection lost or timed out)")
        final = int(status.Status)
        if "NumberOfCompletedSuboperations" in status:
            completed = int(status.NumberOfCompletedSuboperations)
        if "NumberOfFailedSuboperations" in status:
            failed = int(status.NumberOfFailedSuboperations)
    return completed, failed, final


def retrieve_dimse(config: Config, src: SourceConfig, associate: Associate, store_handler: StoreHandler,
                   study_uid: str, series_uid: str = "") -> int:
    """C-MOVE or C-GET of one series (or, without ``series_uid``, one study); the completed sub-operations."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    q.StudyInstanceUID = study_uid
    if series_uid:
        q.SeriesInstanceUID = series_uid
    ae = AE(ae_title=config.node.ae_title)
    if src.retrieve == "move":
        ae.add_requested_context(STUDY_ROOT_MOVE)
        assoc = associate(src, ae)
        responses = assoc.send_c_move(q, src.move_destination or config.node.ae_title, STUDY_ROOT_MOVE)
    else:
        roles = retrieve_contexts(ae, STUDY_ROOT_GET)
        cap = config.node.max_dataset_bytes
        assoc = associate(src, ae, ext_neg=roles, handlers=[(evt.EVT_C_STORE, _capped(store_handler, cap))])
        assoc.dimse.limits = limits_of(config.node)  # type: ignore[attr-defined]  # read by handle_store's caps
        responses = assoc.send_c_get(q, STUDY_ROOT_GET)
    try:
        with _retrieving(series_uid if src.retrieve == "get" else ""):
            completed, failed, status = _drain(responses)
    finally:
        assoc.release()
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    if status not in (0x0000, 0xB000) or failed:
        raise SweepError(f"C-{src.retrieve.upper()} of {what}: status 0x{status:04X}, "
                         f"{failed} sub-operations failed")
    return completed


# DICOMweb ----------------------------------------------------------------------------------------


def store_parts(parts: Iterable[bytes], src: DicomwebSourceConfig, config: Config, store_handler: StoreHandler,
                audit: AuditSink | None = None) -> tuple[int, int, str]:
    """Store every part; (stored, refused, the first refusal's reason)."""
    where = urlsplit(src.url)
    host, port = where.hostname or "", where.port or (443 if where.scheme == "https" else 80)
    stored = refused = 0
    first = ""
    for data in parts:
        status = store_part10(bytes(data), store_handler, src.name[:16], host, port,
                              config.node.max_dataset_bytes, audit)
        if status_code(status) == SUCCESS:
            stored += 1
        else:
            refused += 1
            if not first:
                first = str(getattr(status, "ErrorComment", "") or f"status 0x{status_code(status):04X}")
    return stored, refused, first


def retrieve_wado(config: Config, src: DicomwebSourceConfig, client: Any, store_handler: StoreHandler,
                  study_uid: str, series_uid: str, audit: AuditSink | None = None) -> int:
    """WADO-RS of one series, each instance stored through ``store_handler``; the instances stored."""
    try:
        with _retrieving(series_uid):
            parts = dicomweb.retrieve_series(client, src, study_uid, series_uid, config.node.max_dataset_bytes)
            stored, refused, first = store_parts(parts, src, config, store_handler, audit)
    except dicomweb.DicomwebError as e:
        raise SweepError(str(e)) from e
    if refused:
        raise SweepError(f"WADO-RS of series {series_uid}: {refused} instances refused ({first})")
    return stored
