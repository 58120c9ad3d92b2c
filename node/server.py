"""The node's Application Entity: presentation contexts, socket tuning, allow-lists, clean stop.

Handlers live in :mod:`node.handlers` and are bound here with their dependencies
(``(evt.EVT_C_STORE, handle_store, [store, index, audit, keywords])``).  Importing this
module imports neither torch nor monai.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from node import handlers
from node.access import AccessPolicy, access_handlers
from node.config import Config, NodeConfig
from node.dicom_facts import STORAGE_CLASS_UIDS, TRANSFER_SYNTAX_UIDS, VERIFICATION
from node.index import Index
from node.logs import AuditLog
from node.storage import Storage
from node.transport import STANDARD_LOG_HANDLERS, ConnectionGate, Limits, NodeRequestHandler

logger = logging.getLogger(__name__)

# one table (node.dicom_facts): the SOP classes and transfer syntaxes this SCP accepts, as sent (never transcoded)
STORAGE_CLASSES = STORAGE_CLASS_UIDS
TRANSFER_SYNTAXES = TRANSFER_SYNTAX_UIDS


STOP_GRACE = 4.0  # seconds stop() gives aborted associations to end before cutting their connections

# A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): type 0x03, length 4; result 1 rejected-permanent,
# source 1 DICOM UL service-user, reason 1 no-reason-given (there is none for addresses).
_RJ_PDU_TYPE, _RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_NO_REASON = 0x03, 0x01, 0x01, 0x01


def _reject_pdu() -> bytes:
    return struct.pack(">BBIBBBB", _RJ_PDU_TYPE, 0, 4, 0, _RJ_PERMANENT, _RJ_SERVICE_USER, _RJ_NO_REASON)


REJECT_WAIT = 5.0  # seconds a raw A-ASSOCIATE-RJ waits for the peer to close (as pynetdicom's ARTIM does)


def _await_peer_close(sock: socket.socket, seconds: float, limit: int = 1 << 20) -> None:
    """After an A-ASSOCIATE-RJ written on the raw socket: read and drop what the peer still sends (the rest
    of its A-ASSOCIATE-RQ) until it closes, for at most ``seconds`` and ``limit`` bytes.  Closing with
    unread data would reset the connection under the RJ, and the peer could see "Peer aborted" instead of
    the rejection (the same wait as node.access.send_rejection's)."""
    deadline = time.monotonic() + seconds
    got = 0
    while got < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return
        got += len(chunk)


class HostAllowList:
    """Peer addresses allowed to associate (IPs or CIDR networks); empty: any."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries]

    def allows(self, host: str) -> bool:
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in n for n in self.networks)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on accepted sockets, an address allow-list, a
    :class:`node.transport.ConnectionGate` (timeouts, handshake and association limits) and the TLS handshake
    in the connection's own thread.

    The accept loop only accepts: the allow-list, the TLS handshake (bounded by ``association_timeout``)
    and everything after run in the connection's thread, so no peer can hold the loop up."""

    daemon_threads = True
    allow_list: HostAllowList = HostAllowList(())
    audit: AuditLog = AuditLog(None)
    tcp_nodelay: bool = True
    recv_buffer: int = 4 * 1024 * 1024
    gate: ConnectionGate = ConnectionGate(Limits())

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # pynetdicom's get_request wraps the socket in TLS here, in the accept loop: not here
        sock, address = cast(socket.socket, self.socket).accept()
        if self.tcp_nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.recv_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.recv_buffer)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        if not self.allow_list.allows(host):
            self._reject_address(request, client_address)
            return
        conn = self.gate.open(request, host)
        if self.ssl_context is not None:
            request.settimeout(self.gate.limits.association_timeout)
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                self.gate.rebind(conn, request)
                request.do_handshake()
            except (OSError, ValueError) as e:
                logger.warning("TLS handshake with %s:%s failed: %s", host, client_address[1], e)
                self.gate.close(conn)
                self.shutdown_request(request)
                return
        try:
            super().process_request_thread(request, client_address)
        except BaseException:
            self.gate.close(conn)
            raise
        if self.gate.find(request) is conn and not [a for a in self.active_associations
                                                     if getattr(a, "connection", None) is conn]:
            self.gate.close(conn)  # no association thread took it (an error while creating it)

    def _reject_address(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        peer = f"{client_address[0]}:{client_address[1]}"
        calling = ""
        if self.ssl_context is not None:  # a TLS peer: nothing to say in clear text
            self.shutdown_request(request)
            logger.warning("connection from %s closed: address not in node.allowed_hosts", peer)
            self.audit.write("association_rejected", calling_ae="", peer=peer, reason="address not allowed")
            return
        try:
            request.settimeout(5)
            header = request.recv(6)
            if len(header) == 6:
                pdu_type, _, length = struct.unpack(">BBI", header)
                body = b""
                while len(body) < min(length, 68):
                    chunk = request.recv(min(length, 68) - len(body))
                    if not chunk:
                        break
                    body += chunk
                if pdu_type == 0x01 and len(body) >= 36:
                    calling = body[20:36].decode("ascii", "replace").strip()
            request.sendall(_reject_pdu())
            _await_peer_close(request, REJECT_WAIT)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)
        logger.warning("association rejected: calling %s at %s, address not in node.allowed_hosts",
                       calling or "?", peer)
        self.audit.write("association_rejected", calling_ae=calling, peer=peer, reason="address not allowed")


def build_ae(cfg: NodeConfig) -> AE:
    """The AE with its supported presentation contexts and tuned limits."""
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(VERIFICATION)
    for sop in STORAGE_CLASSES:
        ae.add_supported_context(sop, list(TRANSFER_SYNTAXES))
    ae.maximum_pdu_size = cfg.max_pdu
    # the gate (node.transport.ConnectionGate) counts established associations; pynetdicom's own check counts
    # every connection thread, handshakes included, so it is set out of the gate's way
    ae.maximum_associations = cfg.max_associations + cfg.max_pending_associations + 64
    ae.network_timeout = cfg.network_timeout
    ae.acse_timeout = cfg.association_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    # "AET" or "AET@network" (node.access): pynetdicom checks the titles, the access handler the pairs
    ae.require_calling_aet = list(dict.fromkeys(a.partition("@")[0].strip() for a in cfg.allowed_calling_aets))
    ae.require_called_aet = False
    return ae


def limits_of(cfg: NodeConfig) -> Limits:
    return Limits(association_timeout=cfg.association_timeout, dimse_timeout=cfg.dimse_timeout,
                  max_associations=cfg.max_associations, max_pending=cfg.max_pending_associations,
                  max_per_host=cfg.max_associations_per_host, max_per_ae=cfg.max_associations_per_ae,
                  max_pdu=cfg.max_pdu, max_dataset_bytes=cfg.max_dataset_bytes)


def event_handlers(store: Storage, index: Index, audit: AuditLog, extra_keywords: Sequence[str] = (),
                   open_associations: handlers.OpenAssociations | None = None) -> list[Any]:
    """Handlers bound with explicit dependencies."""
    kws = tuple(extra_keywords)
    return [
        (evt.EVT_C_STORE, handlers.handle_store, [store, index, audit, kws, open_associations]),
        (evt.EVT_C_ECHO, handlers.handle_echo, [audit]),
        (evt.EVT_ACCEPTED, handlers.handle_association, [audit, open_associations]),
        (evt.EVT_REJECTED, handlers.handle_association, [audit, open_associations]),
        (evt.EVT_RELEASED, handlers.handle_association, [audit, open_associations]),
        (evt.EVT_ABORTED, handlers.handle_association, [audit, open_associations]),
    ]


def route_keywords(config: Config) -> tuple[str, ...]:
    kws: set[str] = set()
    for r in config.routes:
        kws.update(r.when)
        for req in r.requires:
            kws.update(req.when)
    return tuple(sorted(kws))


class DicomServer:
    """The running SCP; :meth:`stop` stops accepting, then waits for in-flight associations."""

    def __init__(self, config: Config, store: Storage, index: Index, audit: AuditLog,
                 ssl_context: ssl.SSLContext | None = None,
                 open_associations: handlers.OpenAssociations | None = None,
                 extra_handlers: Sequence[Any] = ()) -> None:
        self.config = config
        self.ae = build_ae(config.node)
        self.open_associations = open_associations or handlers.OpenAssociations()
        # extra_handlers: notification handlers of others, e.g. node.metrics.Metrics.scp_handlers()
        self._handlers = (event_handlers(store, index, audit, route_keywords(config), self.open_associations)
                          + list(extra_handlers))
        if any("@" in a for a in config.node.allowed_calling_aets):
            policy = AccessPolicy.from_lists(config.node.allowed_calling_aets, config.node.allowed_hosts)
            self._handlers += access_handlers(policy, audit)
        self._audit = audit
        self._ssl = ssl_context
        self.server: NodeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> DicomServer:
        cfg = self.config.node
        server = self.ae.make_server((cfg.host, cfg.port), ae_title=cfg.ae_title, ssl_context=self._ssl,
                                     evt_handlers=self._handlers, server_class=NodeServer,
                                     request_handler=NodeRequestHandler)
        assert isinstance(server, NodeServer)
        # pynetdicom's debug-log handlers run on every PDU and DIMSE message even when the log
        # level drops their output; the node logs one line per association and instance itself
        # (NodeRequestHandler unbinds them from each association as well)
        for event, handler in STANDARD_LOG_HANDLERS:
            server.unbind(event, handler)
        server.allow_list = HostAllowList(cfg.allowed_hosts)
        server.gate = ConnectionGate(limits_of(cfg))
        server.audit = self._audit
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True)
        self._thread.start()
        self.server = server
        logger.info("DICOM SCP %s listening on %s:%d (max PDU %d, TCP_NODELAY)", cfg.ae_title, cfg.host,
                    self.port, cfg.max_pdu)
        return self

    def active(self) -> int:
        return len(self.server.active_associations) if self.server is not None else 0

    def stop(self, timeout: float = 30.0, wait: Callable[[float], None] = time.sleep) -> None:
        """Stop accepting, close connections still in their handshake, let established associations finish
        (up to ``timeout``) and those just released run their last events (up to 1 s more), then abort the rest:
        returns within about ``timeout`` + 1 + ``STOP_GRACE`` seconds whatever the peers do."""
        server = self.server
        if server is None:
            return
        self.server = None
        server.shutdown()  # stops serve_forever and closes the listening socket
        server.gate.shutdown(pending_only=True)
        deadline = time.monotonic() + timeout
        while any(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
            wait(0.05)
        # associations that just released still run their last events (the released log line): let them end
        closing = time.monotonic() + min(1.0, max(0.0, deadline - time.monotonic()))
        while server.active_associations and time.monotonic() < closing:
            wait(0.05)
        left = server.active_associations
        for assoc in left:
            logger.warning("aborting association with %s still open at shutdown", assoc.requestor.ae_title)
            # Association.abort waits for the peer; in a thread of its own so that none of them holds stop() up
            threading.Thread(target=assoc.abort, name="prognode-abort", daemon=True).start()
        grace = time.monotonic() + STOP_GRACE / 2
        while server.active_associations and time.monotonic() < grace:
            wait(0.05)
        if server.active_associations:  # peers that neither answer nor read: cut the connections
            server.gate.shutdown()
            grace = time.monotonic() + STOP_GRACE / 2
            while server.active_associations and time.monotonic() < grace:
                wait(0.05)
        if self._thread is not None:
            self._thread.join(1)
        logger.info("DICOM SCP stopped")
