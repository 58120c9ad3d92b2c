"""DICOM TLS (PS3.15 Annex B.1, "Basic TLS Secure Transport Connection Profile") on every leg.

Two kinds of settings (:mod:`node.config`), relative paths against the config folder:

* the node's own, ``[node.tls]`` (:class:`~node.config.NodeTlsConfig`): its certificate and key, and the
  CA bundle that verifies callers' certificates (mutual TLS); :func:`server_context` builds the SCP's
  context and :func:`client_identity_handlers` ties calling AE titles to client certificates;
* a peer's, ``tls`` of each destination and source (:class:`~node.config.PeerTlsConfig`): the CA bundle
  that verifies the peer, the name its certificate must carry, and a client certificate only where the
  peer requires mutual TLS.  :func:`client_context` is the one place the SCU context is built (TLS 1.2
  or newer, ``check_hostname``, ``CERT_REQUIRED``, the configured CA bundle only unless the config says
  ``use_system_store``); :func:`associate` opens an association to a peer with it (export's C-STORE,
  ``prognode echo``, the sweep's C-FIND/C-MOVE/C-GET) and says why one failed.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association

from node.access import DIAG_CALLING_AE_NOT_RECOGNISED, reject_association
from node.audit import AuditSink
from node.config import Config, DestinationConfig, NodeTlsConfig, PeerTlsConfig, RemoteAE

log = logging.getLogger(__name__)



class TlsError(ValueError):
    """TLS misconfiguration; the message names the setting and the file."""


def _resolve(p: Path | None, base_dir: Path, key: str) -> Path | None:
    if p is None:
        return None
    q = p if p.is_absolute() else (base_dir / p)
    if not q.is_file():
        raise TlsError(f"{key}: file not found: {q}")
    return q


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, where: str, names: tuple[str, str]) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise TlsError(f"{where}.{names[0]} / {names[1]}: cannot load certificate {cert} with key {key}: "
                       f"{e}") from e


def _load_ca(ctx: ssl.SSLContext, ca: Path, where: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as e:
        raise TlsError(f"{where}.ca_bundle: cannot load CA bundle {ca}: {e}") from e


# The node's own TLS (SCP) -------------------------------------------------------------------------------


def server_context(tls: NodeTlsConfig, base_dir: Path) -> ssl.SSLContext:
    """The SCP's context (``ssl_context`` of the node's server and of the sweep's C-MOVE receiver)."""
    where = "node.tls"
    if not tls.enabled:
        raise TlsError(f"{where}: not enabled")
    if tls.certificate is None or tls.private_key is None:  # NodeTlsConfig refuses this when enabled
        raise TlsError(f"{where}.certificate: required when enabled")
    cert = _resolve(tls.certificate, base_dir, f"{where}.certificate")
    key = _resolve(tls.private_key, base_dir, f"{where}.private_key")
    ca = _resolve(tls.ca_bundle, base_dir, f"{where}.ca_bundle")
    assert cert is not None and key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key, where, ("certificate", "private_key"))
    if tls.require_client_certificate:
        if ca is None:
            raise TlsError(f"{where}.ca_bundle: required for mutual TLS (require_client_certificate)")
        ctx.verify_mode = ssl.CERT_REQUIRED
        _load_ca(ctx, ca, where)
    elif ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        _load_ca(ctx, ca, where)
    return ctx


def certificate_names(peercert: Mapping[str, Any] | None) -> set[str]:
    """Subject CN and subjectAltName values (DNS, IP, URI, e-mail) of ``ssl.SSLSocket.getpeercert()``."""
    names: set[str] = set()
    if not peercert:
        return names
    for rdn in peercert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                names.add(str(value))
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "IP Address", "URI", "email"):
            names.add(str(value).strip())
    return names


def _name_matches(wanted: str, names: Iterable[str]) -> bool:
    w = wanted.strip().casefold()
    return any(n.casefold() == w for n in names)


def check_client_identity(tls: NodeTlsConfig, calling_ae: str, peercert: Mapping[str, Any] | None) -> str | None:
    """``None`` when ``calling_ae`` may use the client certificate ``peercert`` under
    ``[node.tls] calling_aet_names``, else the reason (an AE title that is not listed is refused)."""
    if not tls.calling_aet_names:
        return None
    ae = calling_ae.strip()
    wanted = tls.calling_aet_names.get(ae)
    if wanted is None:
        return f"calling AE {ae!r} not in node.tls.calling_aet_names"
    names = certificate_names(peercert)
    if not names:
        return f"calling AE {ae!r}: no client certificate"
    if not any(_name_matches(w, names) for w in wanted):
        return (f"calling AE {ae!r}: client certificate names {', '.join(sorted(names))}, "
                f"not {', '.join(wanted)}")
    return None


def _peercert(assoc: Any) -> dict[str, Any] | None:
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if isinstance(sock, ssl.SSLSocket):
        try:
            return sock.getpeercert()
        except (ValueError, OSError):
            return None
    return None


def _handle_requested(event: Any, tls: NodeTlsConfig, audit: AuditSink | None) -> None:
    assoc = event.assoc
    if assoc.is_rejected or assoc.is_aborted:  # another handler (the allow-lists) refused it already
        return
    calling = str(assoc.requestor.primitive.calling_ae_title).strip()
    reason = check_client_identity(tls, calling, _peercert(assoc))
    if reason is None:
        return
    reject_association(assoc, calling, str(assoc.requestor.address), reason, DIAG_CALLING_AE_NOT_RECOGNISED, audit)


def client_identity_handlers(
    tls: NodeTlsConfig, audit: AuditSink | None = None
) -> list[tuple[Any, Callable[..., Any], list[Any]]]:
    """``evt_handlers`` entries that reject an association whose calling AE title is not tied to the
    caller's client certificate (``[node.tls] calling_aet_names``); none when TLS is off or nothing is tied."""
    if not tls.enabled or not tls.calling_aet_names:
        return []
    return [(evt.EVT_REQUESTED, _handle_requested, [tls, audit])]


# A peer's TLS (SCU) ----------------------------------------------------------------------------------------


class _RecordingSocket(ssl.SSLSocket):
    """Remembers the first TLS error on its context: pynetdicom only logs it and reports "no association"."""

    def _record(self, e: OSError) -> None:
        ctx = self.context
        if isinstance(ctx, ClientContext) and ctx.failure is None:
            ctx.failure = e

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except OSError as e:
            self._record(e)
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as e:
            self._record(e)
            raise

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags)  # type: ignore[arg-type]
        except ssl.SSLError as e:
            self._record(e)
            raise


class ClientContext(ssl.SSLContext):
    """An SCU's context; :attr:`failure` holds the first TLS error of a connection made with it."""

    sslsocket_class = _RecordingSocket
    failure: OSError | None = None


def client_context(tls: PeerTlsConfig, base_dir: Path, where: str = "tls") -> ClientContext:
    """The SCU context for a peer: TLS 1.2 or newer, the peer's certificate verified (``CERT_REQUIRED``)
    against ``ca_bundle`` only (plus the system store with ``use_system_store``) and its name checked
    (``check_hostname``); the client certificate is presented where one is configured (mutual TLS).
    ``where`` names the peer in errors (``destinations 'pacs' tls``)."""
    if not tls.enabled:
        raise TlsError(f"{where}: not enabled")
    ca = _resolve(tls.ca_bundle, base_dir, f"{where}.ca_bundle")
    cert = _resolve(tls.client_certificate, base_dir, f"{where}.client_certificate")
    key = _resolve(tls.client_private_key, base_dir, f"{where}.client_private_key")
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if ca is None and not tls.use_system_store:  # PeerTlsConfig refuses this when enabled
        raise TlsError(f"{where}.ca_bundle: required unless use_system_store = true")
    if ca is not None:
        _load_ca(ctx, ca, where)
    if tls.use_system_store:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key, where, ("client_certificate", "client_private_key"))
    return ctx


def peer_where(peer: RemoteAE) -> str:
    kind = "destinations" if isinstance(peer, DestinationConfig) else "sources"
    return f"{kind} {peer.name!r} tls"


def server_hostname(peer: RemoteAE) -> str:
    """The name the peer's certificate must carry: ``tls.server_hostname``, else the peer's ``host``."""
    return peer.tls.server_hostname or peer.host


def tls_args(peer: RemoteAE, base_dir: Path) -> tuple[ClientContext, str] | None:
    """``tls_args`` of :meth:`pynetdicom.AE.associate` for ``peer``, or ``None`` when its TLS is off."""
    if not peer.tls.enabled:
        return None
    return client_context(peer.tls, base_dir, peer_where(peer)), server_hostname(peer)


def tls_problems(config: Config) -> list[str]:
    """Every TLS setting of ``config`` built once (``prognode config check``): files that are missing or
    do not load, each named by its key."""
    problems: list[str] = []
    if config.node.tls.enabled:
        try:
            server_context(config.node.tls, config.base_dir)
        except TlsError as e:
            problems.append(str(e))
    for peer in (*config.destinations, *(s for s in config.sources if isinstance(s, RemoteAE))):
        try:
            tls_args(peer, config.base_dir)
        except TlsError as e:
            problems.append(str(e))
    return problems


@dataclass(frozen=True)
class Opened:
    """An association attempt: ``error`` is empty when ``assoc`` is established, else why not."""

    assoc: Association | None
    error: str

    @property
    def ok(self) -> bool:
        return self.assoc is not None and self.assoc.is_established


def _describe_tls_failure(e: OSError, peer: RemoteAE) -> str:
    text = str(e)
    verify = getattr(e, "verify_message", "") or ""
    if isinstance(e, ssl.SSLCertVerificationError) and "mismatch" in (verify + text).lower():
        return (f"TLS: the certificate of {peer.host}:{peer.port} does not name {server_hostname(peer)!r} "
                f"({verify or text}); connect by the name it carries or set {peer_where(peer)}.server_hostname")
    if isinstance(e, ssl.SSLCertVerificationError):
        store = " (and the system store)" if peer.tls.use_system_store else ""
        return (f"TLS: the certificate of {peer.host}:{peer.port} is not trusted ({verify or text}); "
                f"check {peer_where(peer)}.ca_bundle{store}")
    if "certificate required" in text.lower() or "alert_certificate_required" in text.lower() \
            or "handshake failure" in text.lower():
        return (f"TLS: {peer.host}:{peer.port} refused the connection ({text}); it may require a client "
                f"certificate ({peer_where(peer)}.client_certificate) or not trust ours")
    return f"TLS with {peer.host}:{peer.port} failed: {text}"


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens (only asked after an association failed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def associate(ae: AE, peer: RemoteAE, base_dir: Path, **kwargs: Any) -> Opened:
    """``ae.associate`` to ``peer`` with its TLS settings; never raises for the peer's sake.

    ``kwargs`` go to :meth:`pynetdicom.AE.associate` (``ext_neg``, ``evt_handlers``, ...).  A TLS setting
    that cannot be used (a missing file) is an :class:`Opened` with the error, not an exception."""
    label = f"{peer.ae_title}@{peer.host}:{peer.port}"
    try:
        args = tls_args(peer, base_dir)
    except TlsError as e:
        return Opened(None, f"{label}: {e}")
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=args, **kwargs)
    if assoc.is_established:
        return Opened(assoc, "")
    failure = args[0].failure if args is not None else None
    if failure is None and not _reachable(peer.host, peer.port, min(5.0, float(ae.acse_timeout or 5.0))):
        why = "association failed (peer down or unreachable?: no TCP connection)"
    elif failure is not None:
        why = _describe_tls_failure(failure, peer)
    elif assoc.is_rejected:
        why = "association rejected"
    elif assoc.is_aborted and args is not None:
        why = "association aborted (over TLS: the peer may have refused our client certificate, or want none)"
    elif assoc.is_aborted:
        why = "association aborted (does the peer expect TLS?)"
    else:
        why = "association failed (peer down or unreachable?)"
    return Opened(assoc, f"{label}: {why}")
