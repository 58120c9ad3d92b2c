"""Transports: how results reach a destination, one :class:`~node.transports.base.Sender` per ``kind`` of
``[[destinations]]`` (:data:`SENDERS`): ``dimse`` (C-STORE, :mod:`node.transports.dimse`) and ``dicomweb``
(STOW-RS, :mod:`node.transports.dicomweb`).  A new kind is a config model in :mod:`node.config`'s union and
a sender here; :mod:`node.export` (retries, dead letters, probes) and ``prognode echo`` stay as they are."""

from __future__ import annotations

from collections.abc import Callable

from node.config import Config, DestinationConfig, DicomwebDestinationConfig, DicomwebSourceConfig
from node.transports.base import Outcome, Sender
from node.transports.dicomweb import DicomwebSender, peer_problems, peer_where
from node.transports.dimse import DimseSender

Destination = DestinationConfig | DicomwebDestinationConfig


def _dimse(dest: Destination, config: Config) -> Sender:
    assert isinstance(dest, DestinationConfig)
    return DimseSender(dest, config.node.ae_title, config.base_dir)


def _dicomweb(dest: Destination, config: Config) -> Sender:
    assert isinstance(dest, DicomwebDestinationConfig)
    return DicomwebSender(dest, config.base_dir)


SENDERS: dict[str, Callable[[Destination, Config], Sender]] = {"dimse": _dimse, "dicomweb": _dicomweb}


def sender_for(dest: Destination, config: Config) -> Sender:
    """A new (not yet open) sender for ``dest``, by its kind."""
    return SENDERS[dest.kind](dest, config)


def problems(config: Config) -> list[str]:
    """Destination settings that cannot be used, and a DICOMweb source's credential and TLS files
    (``prognode config check``); DIMSE peers' TLS files are :func:`node.tls.tls_problems`'."""
    found = [p for dest in config.destinations for p in sender_for(dest, config).problems()]
    return found + [p for src in config.sources if isinstance(src, DicomwebSourceConfig)
                    for p in peer_problems(src, config.base_dir, peer_where(src))]


__all__ = ["SENDERS", "Destination", "Outcome", "Sender", "problems", "sender_for"]
