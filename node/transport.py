"""pynetdicom's acceptor with a receive path that waits on the socket instead of polling.

pynetdicom 3.0 (pinned in requirements.lock) runs two polling loops per association: the DUL
reactor sleeps 1 ms whenever it finds nothing to do and reads each PDU in 4 KiB ``recv``
calls, and the association reactor sleeps 1 ms before each look at the DIMSE queue.  storescu
sends one instance at a time and waits for its C-STORE-RSP, so every one of those sleeps is on
the critical path of every instance.  Here:

- :class:`WakingSocket` reads ahead (one ``recv_into`` takes whatever has arrived, up to
  ``READ_AHEAD``) with TCP_QUICKACK set, and its :meth:`~WakingSocket.ready` blocks in ``select``
  on the socket *and* a wake-up pipe (at most ``POLL_SECONDS``), so incoming data is seen at once;
- :class:`WakingQueue` (the DUL's outgoing queue) writes to that pipe on ``put``, so a response
  queued by the handler is sent at once rather than after the DUL's next sleep;
- :class:`NodeAssociation` waits on the DIMSE message queue instead of sleeping before each
  look, and :class:`UserQueue` (the DUL's queue to the association: release and abort
  requests) puts a wake-up token on that queue, so both loops sleep until something happens
  (or ``POLL_SECONDS`` pass, for timers) rather than waking every millisecond and competing
  for the GIL with the thread that is storing an instance;
- :class:`NodeDIMSE` serves a complete C-STORE or C-ECHO request in the DUL thread that decoded
  it, and encodes C-STORE responses directly (PS3.7 9.3.1.2), byte for byte what pynetdicom would
  send, writing them straight to the socket;
- :class:`NodeRequestHandler` builds associations from these;
- with a :class:`ConnectionGate` on the server (node.server.NodeServer), every accepted socket has
  timeouts (:class:`Limits`), PDUs are checked from their header (:func:`read_pdu_data`), data sets are
  capped as they arrive, and an association holds a slot only once its A-ASSOCIATE-RQ is admitted.

Everything else (state machine, ACSE, DIMSE, events) is pynetdicom's own.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dimse_primitives import (
    C_CANCEL,
    C_ECHO,
    C_STORE,
    N_EVENT_REPORT,
    DimsePrimitiveType,
    DimseServiceType,
)
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

from node.access import (
    DIAG_LOCAL_LIMIT_EXCEEDED,
    REJECT_TRANSIENT,
    SOURCE_SERVICE_PROVIDER_PRESENTATION,
    send_rejection,
)
from node.header import padded

logger = logging.getLogger(__name__)

READ_AHEAD = 1024 * 1024  # bytes a socket read may take at once (PDUs longer than this are read as they come)
# pynetdicom binds these debug-log handlers to every association (pynetdicom._config.LOG_HANDLER_LEVEL);
# each builds an Event per PDU and DIMSE message even when the log level drops its output
STANDARD_LOG_HANDLERS: tuple[tuple[Any, Callable[..., Any]], ...] = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler), (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler), (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)
POLL_SECONDS = 0.02  # the longest a loop waits before re-checking timers (pynetdicom: 1 ms sleeps); events wake it
# The longest PDU read before the association is established (an A-ASSOCIATE-RQ with 128 presentation
# contexts of 5 transfer syntaxes each is about 21 KB), and the longest non-P-DATA PDU after it (those are 4-byte
# A-RELEASE and A-ABORT PDUs): anything longer is aborted before a byte of its body is read.
MAX_CONTROL_PDU = 64 * 1024
PRE_ASSOCIATION_STATES = frozenset({"Sta1", "Sta2", "Sta3"})  # PS3.8 9.2: idle, awaiting the RQ, awaiting our answer
# A-ABORT PDU (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value)
ABORT_INVALID_PDU = struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


@dataclass(frozen=True)
class Limits:
    """What one peer may cost the acceptor: time, connections, memory (set from :class:`node.config.NodeConfig`).

    - ``association_timeout``: seconds from the TCP accept to a complete A-ASSOCIATE-RQ (the TLS handshake
      included); a connection that takes longer is closed.
    - ``dimse_timeout``: the longest the peer may pause inside a PDU or a DIMSE message (between its PDUs), and
      the longest a send to a peer that does not read may block; the association is then aborted.
      Idle time *between* messages is ``network_timeout`` (pynetdicom's idle timer, the AE's setting).
    - ``max_associations``: established associations; ``max_pending``: connections still in their handshake
      (when full, the oldest is closed to make room, so stalled connections cannot lock out a real peer);
      ``max_per_host`` / ``max_per_ae``: established associations per peer address / calling AE title (0: no
      limit of its own).
    - ``max_pdu``: the maximum PDU length the node announces (0: unlimited), enforced on every P-DATA-TF received.
    - ``max_dataset_bytes``: the longest data set of one message (inflated, for the deflated transfer syntax);
      a longer one is read to its end without being kept and answered with a failure status.
    """

    association_timeout: float = 10.0
    dimse_timeout: float | None = 30.0
    max_associations: int = 16
    max_pending: int = 32
    max_per_host: int = 0
    max_per_ae: int = 0
    max_pdu: int = 0
    max_dataset_bytes: int = 1 << 30


class Connection:
    """One accepted connection, from accept to close: ``pending`` until admitted as an association."""

    __slots__ = ("sock", "host", "opened", "state", "calling_ae")

    def __init__(self, sock: Any, host: str) -> None:
        self.sock = sock
        self.host = host
        self.opened = time.monotonic()
        self.state = "pending"
        self.calling_ae = ""

    def shutdown(self) -> None:
        """Make any read or write on the socket return at once (the owner's thread then ends the association)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ConnectionGate:
    """Counts connections in their handshake and established associations, and admits or refuses.

    Only established associations hold one of ``max_associations``; handshakes have their own cap
    (``max_pending``), and when it is reached the oldest handshake is cut off: a real peer completes its
    handshake in milliseconds, so a crowd of stalled connections only ever evicts itself."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._pending: dict[int, Connection] = {}  # insertion order: oldest first
        self._established: dict[int, Connection] = {}
        self._by_socket: dict[int, Connection] = {}
        self.evicted = 0

    def open(self, sock: Any, host: str) -> Connection:
        conn = Connection(sock, host)
        evict: list[Connection] = []
        with self._lock:
            while len(self._pending) >= max(1, self.limits.max_pending):
                oldest = self._pending.pop(next(iter(self._pending)))
                oldest.state = "evicted"
                evict.append(oldest)
            self._pending[id(conn)] = conn
            self._by_socket[id(sock)] = conn
            self.evicted += len(evict)
        for old in evict:
            logger.warning("closing a connection from %s still in its handshake after %.1f s: %d handshakes pending "
                           "(node.max_pending_associations)", old.host, time.monotonic() - old.opened,
                           self.limits.max_pending)
            old.shutdown()
        return conn

    def rebind(self, conn: Connection, sock: Any) -> None:
        """The connection's socket is now ``sock`` (wrapped in TLS)."""
        with self._lock:
            self._by_socket.pop(id(conn.sock), None)
            conn.sock = sock
            self._by_socket[id(sock)] = conn

    def find(self, sock: Any) -> Connection | None:
        with self._lock:
            return self._by_socket.get(id(sock))

    def admit(self, conn: Connection, calling_ae: str) -> str:
        """Move ``conn`` from its handshake to the established associations; '' when admitted, else why not."""
        lim = self.limits
        with self._lock:
            if self._pending.pop(id(conn), None) is None:
                return "connection closed while in its handshake"
            live = self._established.values()
            if len(self._established) >= lim.max_associations:
                return f"{len(self._established)} associations open (node.max_associations)"
            if lim.max_per_host and sum(c.host == conn.host for c in live) >= lim.max_per_host:
                return f"{lim.max_per_host} associations open from {conn.host} (node.max_associations_per_host)"
            if lim.max_per_ae and sum(c.calling_ae == calling_ae for c in live) >= lim.max_per_ae:
                return f"{lim.max_per_ae} associations open by {calling_ae} (node.max_associations_per_ae)"
            conn.state, conn.calling_ae = "established", calling_ae
            self._established[id(conn)] = conn
            return ""

    def close(self, conn: Connection) -> None:
        with self._lock:
            self._pending.pop(id(conn), None)
            self._established.pop(id(conn), None)
            self._by_socket.pop(id(conn.sock), None)
            conn.state = "closed"

    def counts(self) -> tuple[int, int]:
        """(handshakes pending, associations established)."""
        with self._lock:
            return len(self._pending), len(self._established)

    def shutdown(self, pending_only: bool = False) -> int:
        """Cut off every connection in its handshake (and every association unless ``pending_only``)."""
        with self._lock:
            conns = list(self._pending.values()) + ([] if pending_only else list(self._established.values()))
        for conn in conns:
            conn.shutdown()
        return len(conns)


class Waker:
    """A non-blocking pipe: :meth:`wake` from any thread makes ``select`` on :attr:`fd` return.

    Closed once by the association's thread when it ends; a ``wake`` after that does nothing
    (never a write to a reused descriptor)."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"\x01")
            except BlockingIOError:  # a full pipe wakes the reader already
                pass

    def drain(self) -> None:
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._w)
                os.close(self.fd)


class WakingQueue(queue.Queue[Any]):
    """A queue that wakes ``waker`` on every ``put``."""

    def __init__(self, waker: Waker) -> None:
        super().__init__()
        self.waker = waker

    def _put(self, item: Any) -> None:
        super()._put(item)
        self.waker.wake()


class UserQueue(queue.Queue[Any]):
    """The DUL's queue to the association: each ``put`` also calls ``wake``, which puts a
    ``(None, None)`` token on the association's DIMSE message queue, so that a release or abort
    request is seen at once by :meth:`NodeAssociation._run_reactor`."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


# C-STORE-RSP command elements (PS3.7 Table 9.3-2), implicit VR little endian (PS3.7 6.3.1)
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_COMMAND_LAST_FRAGMENT = b"\x03"  # message control header: command, last fragment (PS3.8 E.2)
_PDU_HEADER = struct.Struct(">BBI")  # PDU type, reserved, PDU length (PS3.8 9.3.1)
_PDV_ITEM = struct.Struct(">IB")  # PDV item length, presentation context ID (PS3.8 9.3.5.1)


def c_store_rsp_command(primitive: C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE response, or None when it carries an element this
    encoder does not write (then pynetdicom encodes it).  Same elements, order and padding as
    pynetdicom's ``C_STORE_RSP.encode_msg``."""
    if getattr(primitive, "OffendingElement", None) or primitive.MessageIDBeingRespondedTo is None \
            or primitive.Status is None:
        return None
    parts: list[bytes] = []
    sop_class = primitive.AffectedSOPClassUID
    if sop_class:
        parts.append(_element(0x0002, padded(str(sop_class), b"\x00")))
    parts.append(_element(0x0100, _US.pack(_C_STORE_RSP)))
    parts.append(_element(0x0120, _US.pack(int(primitive.MessageIDBeingRespondedTo))))
    parts.append(_element(0x0800, _US.pack(_NO_DATA_SET)))
    parts.append(_element(0x0900, _US.pack(int(primitive.Status))))
    comment = getattr(primitive, "ErrorComment", None)
    if comment:
        try:
            parts.append(_element(0x0902, padded(str(comment), b" ")))
        except UnicodeEncodeError:
            return None
    sop = primitive.AffectedSOPInstanceUID
    if sop:
        parts.append(_element(0x1000, padded(str(sop), b"\x00")))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def p_data_tf(context_id: int, value: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV (PS3.8 9.3.5): ``value`` is the message control header
    followed by the fragment."""
    item = _PDV_ITEM.pack(len(value) + 1, context_id) + value
    return _PDU_HEADER.pack(0x04, 0, len(item)) + item


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


class _Discard:
    """Where the data set fragments over the cap go: nowhere."""

    def write(self, data: bytes) -> int:
        return len(data)

    def tell(self) -> int:
        return 0


class NodeDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with two changes on the C-STORE path:

    - a complete C-STORE or C-ECHO request is served at once in the thread that decoded it
      (the DUL's), instead of being queued for the association's thread: on a small machine
      each hand-over between threads costs about half a millisecond, and storescu waits for
      every response before it sends the next instance.  Anything else (and any request while
      others are queued) goes to the association's thread as in pynetdicom;
    - C-STORE responses are encoded by :func:`c_store_rsp_command` unless a handler is bound
      to ``EVT_DIMSE_SENT`` (it expects pynetdicom's message object).
    """

    limits: Limits | None = None
    _dropped = 0  # bytes of the current message's data set received over the cap and not kept

    def receive_primitive(self, primitive: P_DATA) -> None:
        # pynetdicom 3.0.4's DIMSEServiceProvider.receive_primitive, serving C-STORE and C-ECHO inline
        if self.message is None:
            self.message = DIMSEMessage()
        if self.limits is not None:
            self._cap_data_set(primitive)
        if not self.message.decode_msg(primitive, self.assoc):
            return
        dropped, self._dropped = self._dropped, 0
        if dropped:
            self.message.data_set = BytesIO()  # what was kept of it is gone; the handler refuses the request
        evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": self.message})
        context_id = cast(int, self.message.context_id)
        try:
            request = self.message.message_to_primitive()
        except Exception as exc:
            logger.error("Received an invalid DIMSE message: %s", exc)
            self.dul.event_queue.put("Evt19")
            return
        # as pynetdicom: reset the message (its memory-leak fix, pynetdicom issue #41)
        self.message.encoded_command_set = BytesIO()
        self.message.data_set = BytesIO()
        self.message._data_set_file = None
        self.message._data_set_path = None
        self.message = None
        if dropped:
            if not isinstance(request, C_STORE):
                logger.warning("aborting: a %s data set over node.max_dataset_bytes", type(request).__name__)
                self.dul.event_queue.put("Evt19")
                return
            cast(Any, request).dropped_bytes = dropped  # node.handlers answers Out of Resources
        if isinstance(request, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[cast(int, request.MessageIDBeingRespondedTo)] = request
        elif self._served_here(request, context_id):
            self.assoc._serve_request(cast(DimseServiceType, request), context_id)
        elif isinstance(request, N_EVENT_REPORT) and request.is_valid_request:
            threading.Thread(target=make_target(self.assoc._serve_request), args=(request, context_id)).start()
        else:
            self.msg_queue.put((context_id, cast(DimseServiceType, request)))

    def _cap_data_set(self, primitive: P_DATA) -> None:
        """Keep at most ``max_dataset_bytes`` of a message's data set: past that, the fragments are counted
        and dropped (the peer is still sending them) and the request is answered with a failure status."""
        message = cast(DIMSEMessage, self.message)
        incoming = sum(len(data) - 1 for _, data in primitive.presentation_data_value_list if not data[0] & 1)
        if not incoming:
            return
        if self._dropped:
            self._dropped += incoming
            return
        held = message.data_set.tell() if isinstance(message.data_set, BytesIO) else 0
        cap = cast(Limits, self.limits).max_dataset_bytes
        if held + incoming > cap:
            logger.warning("a data set over node.max_dataset_bytes (%d): dropping it as it arrives", cap)
            self._dropped = held + incoming
            message.data_set = cast(BytesIO, _Discard())  # decode_msg only writes to it

    def _served_here(self, request: Any, context_id: int) -> bool:
        return (isinstance(request, (C_STORE, C_ECHO)) and request.is_valid_request
                and context_id in self.assoc._accepted_cx and self.assoc.is_established
                and not self.assoc._sent_release and self.msg_queue.empty())

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
            command = c_store_rsp_command(primitive)
            max_pdu = self.maximum_pdu_size
            if command is not None and (not max_pdu or len(command) + 6 <= max_pdu):
                value = _COMMAND_LAST_FRAGMENT + command
                if not self._send_now(context_id, value):
                    pdata = P_DATA()
                    pdata.presentation_data_value_list.append((context_id, value))
                    self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)

    def _send_now(self, context_id: int, value: bytes) -> bool:
        """Send a one-PDV P-DATA-TF PDU (PS3.8 9.3.5) straight to the socket, when called in the
        DUL's own thread in the data transfer state (Sta6) with nothing queued before it: what
        the state machine's DT-1 action would do, without the round trip through the DUL's
        queue.  Returns False (the caller queues it as usual) in any other case."""
        dul = self.dul
        sock = dul.socket
        if (threading.current_thread() is not dul or sock is None or dul.state_machine.current_state != "Sta6"
                or not dul.to_provider_queue.empty() or self.assoc.get_handlers(evt.EVT_PDU_SENT)):
            return False
        sock.send(p_data_tf(context_id, value))
        return True


class WakingSocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``ready`` waits for data or a wake-up, and whose
    ``recv`` reads ahead into one buffer."""

    def __init__(self, assoc: Association, client_socket: Any, waker: Waker, limits: Limits | None = None) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.waker = waker
        self.limits = limits
        # until the association is established, every read must finish by this (monotonic) time
        self.deadline: float | None = None
        self._timeout: float | None = None  # the socket's timeout as last set
        if limits is not None:
            self.deadline = time.monotonic() + limits.association_timeout
            self._set_timeout(client_socket, limits.association_timeout)
        self._buf = bytearray(READ_AHEAD)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # the unread bytes are self._buf[self._start:self._end]
        # Acknowledge at once (Linux; it reverts after each receive, so it is set before each one):
        # a sender whose Nagle algorithm holds the last small segment of an instance back until the
        # previous ones are acknowledged would otherwise wait for our delayed ACK, up to 40 ms.
        self._quickack = hasattr(socket, "TCP_QUICKACK")

    @property
    def ready(self) -> bool:  # type: ignore[override]
        sock = self.socket
        if sock is None or self._is_connected is False:
            # closed: the DUL loop has nothing to wait on until the association ends it; do not let it spin
            time.sleep(POLL_SECONDS)
            return False
        if self._end > self._start or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            return True
        try:
            fds: list[Any] = [sock, self.waker.fd]
            readable, _, _ = select.select(fds, [], [], POLL_SECONDS)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self.waker.fd in readable:
            self.waker.drain()
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer only if the peer closed the connection).

        Reads ahead: each ``recv_into`` takes whatever has arrived, up to ``READ_AHEAD`` bytes, so
        the PDU header and body, and the next PDUs of an instance already sent, cost one system
        call (and at most one wake-up) instead of one or more each."""
        sock = cast(Any, self.socket)
        if self.limits is not None:
            self._arm(sock)
        if nr_bytes > READ_AHEAD:
            # a length this large is the peer's claim, not yet data: grow as bytes arrive
            grown = bytearray(self._take(min(nr_bytes, self._end - self._start)))
            while len(grown) < nr_bytes:
                chunk = sock.recv(min(READ_AHEAD, nr_bytes - len(grown)))
                if not chunk:
                    break
                grown += chunk
            return grown
        while self._end - self._start < nr_bytes:
            if self._start:  # keep what is left at the front
                left = self._end - self._start
                self._buf[:left] = self._buf[self._start:self._end]
                self._start, self._end = 0, left
            if self._quickack:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                except OSError:  # not a TCP socket
                    self._quickack = False
            n = sock.recv_into(self._view[self._end:], READ_AHEAD - self._end)
            if not n:  # the peer closed the connection
                return self._take(self._end - self._start)
            self._end += n
        return self._take(nr_bytes)

    def _arm(self, sock: Any) -> None:
        """Bound the next blocking read (and send): by what is left of the time to associate while the
        association is not established, by ``dimse_timeout`` after.  Raises TimeoutError past the deadline."""
        limits = cast(Limits, self.limits)
        timeout = limits.dimse_timeout
        if self.deadline is not None:
            if self.assoc.dul.state_machine.current_state in PRE_ASSOCIATION_STATES:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("association not established within node.association_timeout")
                timeout = left if timeout is None else min(left, timeout)
            else:
                self.deadline = None
        if timeout != self._timeout:
            self._set_timeout(sock, timeout)

    def _set_timeout(self, sock: Any, timeout: float | None) -> None:
        """Kernel-side timeouts (SO_RCVTIMEO, SO_SNDTIMEO) on the blocking socket: a read or send that waits
        longer fails with EAGAIN (an OSError).  Python's own ``settimeout`` would cost a ``poll`` and a GIL
        round trip before every ``recv``, on the path of every instance."""
        if self._timeout is None and timeout is not None and sock.gettimeout() is not None:
            sock.settimeout(None)  # blocking again (the TLS handshake ran with a Python-side timeout)
        seconds = timeout or 0.0  # 0: no timeout
        value = struct.pack("@ll", int(seconds), int((seconds % 1) * 1_000_000))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        except OSError:
            pass
        self._timeout = timeout

    def pdu_limit(self, pdu_type: int) -> int:
        """The longest PDU of ``pdu_type`` accepted now (PS3.8 9.3: the length field counts the PDU's body)."""
        state = self.assoc.dul.state_machine.current_state
        if pdu_type != 0x04 or state in PRE_ASSOCIATION_STATES:
            return MAX_CONTROL_PDU
        max_pdu = self.limits.max_pdu if self.limits is not None else 0
        return max_pdu if max_pdu else 0xFFFFFFFF

    def _take(self, n: int) -> bytearray:
        out = bytearray(self._view[self._start:self._start + n])
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        return out

    @property
    def buffered(self) -> bool:
        """Whether bytes already read from the socket wait in the read-ahead buffer."""
        return self._end > self._start


def read_pdu_data(dul: DULServiceProvider) -> None:
    """pynetdicom 3.0.4's ``DULServiceProvider._read_pdu_data``, refusing a PDU longer than
    :meth:`WakingSocket.pdu_limit` from its header alone: an A-ABORT (invalid PDU parameter value) is sent and
    the connection closed, without reading (or making room for) the body.  A read that times out (see
    :meth:`WakingSocket._arm`) closes the connection too."""
    sock = cast(WakingSocket, dul.socket)
    try:
        header = sock.recv(6)
        if len(header) < 6:
            sock.close()  # the peer closed the connection: Evt17
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            logger.error("unknown PDU type 0x%02X received", pdu_type)
            dul.event_queue.put("Evt19")
            return
        limit = sock.pdu_limit(pdu_type)
        if length > limit:
            peer = dul.assoc.requestor.address_info
            logger.warning("aborting the connection from %s: PDU type 0x%02X of %d bytes, over the %d allowed%s",
                           peer.address if peer else "?", pdu_type, length, limit,
                           " (node.max_pdu)" if pdu_type == 0x04 else " before association" if
                           dul.state_machine.current_state in PRE_ASSOCIATION_STATES else "")
            try:
                sock.send(ABORT_INVALID_PDU)
            finally:
                sock.close()  # Evt17
            return
        body = sock.recv(length)
    except (OSError, TimeoutError) as exc:
        logger.warning("closing the connection: %s", exc or type(exc).__name__)
        sock.close()  # Evt17: transport connection closed
        return
    if len(body) != length:
        logger.warning("connection closed inside a PDU (%d of %d bytes received)", len(body) + 6, length + 6)
        sock.close()  # Evt17
        return
    data = header + body
    try:
        pdu, event = dul._decode_pdu(data)
    except Exception as exc:
        logger.error("unable to decode the received PDU: %s", exc)
        dul.event_queue.put("Evt19")
        return
    dul.event_queue.put(event)
    dul._recv_pdu.put(pdu)


class NodeAssociation(Association):
    """An acceptor :class:`Association` whose reactor waits on the DIMSE queue instead of sleeping, and
    which is admitted by the server's :class:`ConnectionGate` (when there is one) once its A-ASSOCIATE-RQ
    has arrived: only then does it count as an association."""

    waker: Waker | None = None
    gate: ConnectionGate | None = None
    connection: Connection | None = None
    rejection_reason = ""  # why the gate refused it (node.max_associations, per host, per AE)

    def run_reactor(self) -> None:
        try:
            if self.gate is None or self.connection is None:
                super().run_reactor()
            else:
                self._run_gated()
        finally:
            if self.gate is not None and self.connection is not None:
                self.gate.close(self.connection)
            # the DUL thread has stopped (Association.kill waits for it): nothing selects on the pipe
            if self.waker is not None and not self.dul.is_alive():
                self.waker.close()

    def _run_gated(self) -> None:
        # pynetdicom 3.0.4's Association.run_reactor (acceptor), with a deadline on the A-ASSOCIATE-RQ and
        # the gate's admission (association and per-peer limits) before negotiation
        gate, conn = cast(ConnectionGate, self.gate), cast(Connection, self.connection)
        self.dul.start()
        self._started_dul = True
        self._dul_ready.wait()
        deadline = conn.opened + gate.limits.association_timeout
        primitive = None
        sock = cast(AssociationSocket, self.dul.socket)
        while primitive is None and self.dul.is_alive() and sock.socket is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            primitive = self.dul.receive_pdu(wait=True, timeout=min(left, 0.5))
        if primitive is None:  # an RQ that arrived just before the connection closed
            primitive = self.dul.receive_pdu(wait=False)
        if not isinstance(primitive, A_ASSOCIATE):
            if primitive is None and time.monotonic() >= deadline:
                logger.warning("closing the connection from %s: no A-ASSOCIATE-RQ within %.0f s "
                               "(node.association_timeout)", conn.host, gate.limits.association_timeout)
            conn.shutdown()
            self.kill()
            if self._server and sock.socket:
                self._server.shutdown_request(sock.socket)
            return
        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            calling = str(primitive.calling_ae_title).strip()
            refused = gate.admit(conn, calling)
            if refused:
                self.requestor.ae_title = calling  # set by negotiation otherwise; the log and audit name it
                self.rejection_reason = refused  # node.handlers.handle_association logs and audits it
                # rejected-transient, service provider (presentation), local limit exceeded (PS3.8 9.3.4)
                # (node.access.send_rejection: returns once the RJ is sent and the peer closed)
                send_rejection(self, REJECT_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION, DIAG_LOCAL_LIMIT_EXCEEDED)
                evt.trigger(self, evt.EVT_REJECTED, {})
            else:
                self.acse.negotiate_association()
        if self.is_established:
            self._run_reactor()
        if self._server and sock.socket:
            self._server.shutdown_request(sock.socket)

    def _run_reactor(self) -> None:
        # pynetdicom 3.0.4's Association._run_reactor, with `time.sleep(0.001)` + a non-blocking
        # get replaced by a get that waits up to POLL_SECONDS (it returns as soon as a message is queued)
        self._is_paused = False
        msg_queue = self.dimse.msg_queue
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = msg_queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                logger.debug("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class NodeRequestHandler(RequestHandler):
    """pynetdicom's request handler, building a :class:`NodeAssociation` on a :class:`WakingSocket`."""

    def _create_association(self) -> Association:
        # pynetdicom 3.0.4's RequestHandler._create_association with our classes
        assoc = NodeAssociation(self.ae, MODE_ACCEPTOR)
        for log_event, log_handler in STANDARD_LOG_HANDLERS:
            assoc.unbind(log_event, log_handler)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.waker = Waker()
        weakref.finalize(assoc, assoc.waker.close)  # in case the reactor ended before the DUL did
        assoc.dimse = NodeDIMSE(assoc)
        msg_queue = assoc.dimse.msg_queue
        assoc.dul.to_user_queue = UserQueue(lambda: msg_queue.put((None, None)))
        assoc.dul.to_provider_queue = WakingQueue(assoc.waker)
        assoc.dul._run_loop_delay = 0  # WakingSocket.ready does the waiting
        gate: ConnectionGate | None = getattr(self.server, "gate", None)
        conn = gate.find(self.request) if gate is not None else None
        limits = gate.limits if gate is not None else None
        assoc.set_socket(WakingSocket(assoc, cast(Any, self.request), assoc.waker, limits))
        if gate is not None and conn is not None and limits is not None:
            assoc.gate, assoc.connection = gate, conn
            assoc.dul._read_pdu_data = lambda: read_pdu_data(assoc.dul)  # type: ignore[method-assign]
            assoc.acse_timeout = limits.association_timeout
            assoc.dimse.limits = limits
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in self.server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc
