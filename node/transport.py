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
- :class:`NodeRequestHandler` builds associations from these.

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
import weakref
from collections.abc import Callable
from copy import deepcopy
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
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler
from pynetdicom.utils import make_target

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

    def receive_primitive(self, primitive: P_DATA) -> None:
        # pynetdicom 3.0.4's DIMSEServiceProvider.receive_primitive, serving C-STORE and C-ECHO inline
        if self.message is None:
            self.message = DIMSEMessage()
        if not self.message.decode_msg(primitive, self.assoc):
            return
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
        if isinstance(request, C_CANCEL) and len(self.cancel_req) < 10:
            self.cancel_req[cast(int, request.MessageIDBeingRespondedTo)] = request
        elif self._served_here(request, context_id):
            self.assoc._serve_request(cast(DimseServiceType, request), context_id)
        elif isinstance(request, N_EVENT_REPORT) and request.is_valid_request:
            threading.Thread(target=make_target(self.assoc._serve_request), args=(request, context_id)).start()
        else:
            self.msg_queue.put((context_id, cast(DimseServiceType, request)))

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

    def __init__(self, assoc: Association, client_socket: Any, waker: Waker) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.waker = waker
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


class NodeAssociation(Association):
    """An acceptor :class:`Association` whose reactor waits on the DIMSE queue instead of sleeping."""

    waker: Waker | None = None

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            # the DUL thread has stopped (Association.kill waits for it): nothing selects on the pipe
            if self.waker is not None and not self.dul.is_alive():
                self.waker.close()

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
        assoc.set_socket(WakingSocket(assoc, cast(Any, self.request), assoc.waker))
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
