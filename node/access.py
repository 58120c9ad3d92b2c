"""Who may associate with the node: calling AE titles and peer IP addresses, per peer.

Config (``[node]``):

* ``allowed_calling_aets``: empty means any.  An entry is ``"AET"`` (from any allowed host) or
  ``"AET@10.1.2.3"`` / ``"AET@10.1.0.0/16"`` (that AE only from that address or network).
* ``allowed_hosts``: IPs or CIDR networks any association must come from; empty means any.

:func:`access_handlers` returns the ``EVT_REQUESTED`` handler that rejects a refused association with
a proper A-ASSOCIATE-RJ (permanent; "calling AE title not recognised" or "no reason given" for an
address) before any negotiation, logs one line and writes an ``association_rejected`` audit record.
Every rejection after the A-ASSOCIATE-RQ (these, the disk watermark's, the connection gate's) goes
through :func:`send_rejection`, which waits until the RJ is on the wire and the peer has closed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt

from node.audit import AuditSink

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

REJECT_PERMANENT = 0x01
REJECT_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03  # DICOM UL service-provider (presentation related function)
DIAG_NO_REASON = 0x01
DIAG_CALLING_AE_NOT_RECOGNISED = 0x03
DIAG_LOCAL_LIMIT_EXCEEDED = 0x02  # with SOURCE_SERVICE_PROVIDER_PRESENTATION


def _net(text: str) -> Network:
    return ipaddress.ip_network(text.strip(), strict=False)


@dataclass(frozen=True)
class AccessPolicy:
    """Immutable allow-lists; :meth:`check` returns ``None`` when allowed, else the reason."""

    aets: dict[str, tuple[Network, ...]]  # AE -> networks it may come from (empty tuple: any allowed host)
    hosts: tuple[Network, ...]

    @classmethod
    def from_lists(cls, allowed_calling_aets: Sequence[str], allowed_hosts: Sequence[str]) -> AccessPolicy:
        aets: dict[str, list[Network]] = {}
        for entry in allowed_calling_aets:
            ae, _, where = entry.partition("@")
            nets = aets.setdefault(ae.strip(), [])
            if where:
                nets.append(_net(where))
        return cls({k: tuple(v) for k, v in aets.items()}, tuple(_net(h) for h in allowed_hosts))

    @staticmethod
    def _in(ip: str, nets: Sequence[Network]) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in n for n in nets)

    def check(self, calling_ae: str, ip: str) -> tuple[str, int] | None:
        """``None`` if allowed, else ``(reason, A-ASSOCIATE-RJ diagnostic)``."""
        ae = calling_ae.strip()
        if self.hosts and not self._in(ip, self.hosts):
            return f"peer address {ip} not in allowed_hosts", DIAG_NO_REASON
        if self.aets:
            if ae not in self.aets:
                return f"calling AE {ae!r} not in allowed_calling_aets", DIAG_CALLING_AE_NOT_RECOGNISED
            nets = self.aets[ae]
            if nets and not self._in(ip, nets):
                return f"calling AE {ae!r} not allowed from {ip}", DIAG_CALLING_AE_NOT_RECOGNISED
        return None


def _handle_requested(event: Any, policy: AccessPolicy, audit: AuditSink | None) -> None:
    assoc = event.assoc
    calling = str(assoc.requestor.primitive.calling_ae_title).strip()
    ip = str(assoc.requestor.address)
    verdict = policy.check(calling, ip)
    if verdict is None:
        return
    reason, diagnostic = verdict
    reject_association(assoc, calling, ip, reason, diagnostic, audit)


def reject_association(assoc: Any, calling: str, ip: str, reason: str, diagnostic: int,
                       audit: AuditSink | None, result: int = REJECT_PERMANENT,
                       source: int = SOURCE_SERVICE_USER) -> None:
    """A-ASSOCIATE-RJ (permanent, by the service user, unless ``result`` and ``source`` say otherwise) with a
    log line and an audit record naming why; nothing when another handler already rejected it."""
    if getattr(assoc, "is_rejected", False):
        return
    log.warning("association rejected: calling_ae=%s peer=%s reason=%s", calling, ip, reason)
    if audit is not None:
        audit.write("association_rejected", calling_ae=calling, peer=ip, reason=reason,
                    **({"transient": True} if result == REJECT_TRANSIENT else {}))
    send_rejection(assoc, result, source, diagnostic)


def send_rejection(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """The one way the node rejects an association it has read the A-ASSOCIATE-RQ of: queue the
    A-ASSOCIATE-RJ, then wait (``Association.kill``, as pynetdicom does after its own rejections) until
    the DUL has sent it and the peer has closed the connection, or the ARTIM timer ran out.  Returning
    at once let the reactor close the socket before the RJ was on the wire, and a real peer (dcmtk)
    saw "Peer aborted Association" instead of the rejection and its reason."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()


def access_handlers(
    policy: AccessPolicy, audit: AuditSink | None = None
) -> list[tuple[Any, Callable[..., Any], list[Any]]]:
    """``evt_handlers`` entries enforcing ``policy`` on an SCP."""
    return [(evt.EVT_REQUESTED, _handle_requested, [policy, audit])]
