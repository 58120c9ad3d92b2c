"""DICOM TLS (PS3.15 Annex B.1, "Basic TLS Secure Transport Connection Profile") for the SCP and SCUs.

Contexts are built from :class:`node.config.TlsConfig`; relative paths resolve against the config folder.

* SCP: ``ae.start_server(addr, ssl_context=server_context(cfg.node.tls, cfg.base_dir), ...)``.
* SCU: ``ae.associate(host, port, tls_args=tls_args(peer.tls, cfg.base_dir, host), ...)``.

TLS 1.2 or newer only; the peer certificate is verified against ``ca_certificates`` (the system store
when unset).  With ``require_client_certificate`` the SCP asks for and verifies a client certificate
(mutual TLS, the usual hospital set-up).  DICOM peers are addressed by IP address more often than by
name, so SCU hostname checking is off unless the peer's certificate is meant to match ``host``
(``check_hostname=True``); the chain is still verified.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config import TlsConfig


class TlsError(ValueError):
    """TLS misconfiguration; the message names the file or setting."""


def _resolve(p: Path | None, base_dir: Path) -> Path | None:
    if p is None:
        return None
    q = p if p.is_absolute() else (base_dir / p)
    if not q.is_file():
        raise TlsError(f"tls: file not found: {q}")
    return q


def server_context(tls: TlsConfig, base_dir: Path) -> ssl.SSLContext:
    """The SCP's context (``ssl_context`` of :meth:`pynetdicom.AE.start_server`)."""
    if not tls.enabled:
        raise TlsError("tls: not enabled")
    cert = _resolve(tls.certificate, base_dir)
    key = _resolve(tls.private_key, base_dir)
    ca = _resolve(tls.ca_certificates, base_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert cert is not None and key is not None  # TlsConfig validates this when enabled
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        raise TlsError(f"tls: cannot load certificate {cert} / key {key}: {e}") from e
    if tls.require_client_certificate:
        if ca is None:
            raise TlsError("tls: require_client_certificate needs ca_certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
    elif ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def client_context(tls: TlsConfig, base_dir: Path, check_hostname: bool = False) -> ssl.SSLContext:
    """An SCU's context: verifies the peer's chain, presents our certificate when configured."""
    cert = _resolve(tls.certificate, base_dir)
    key = _resolve(tls.private_key, base_dir)
    ca = _resolve(tls.ca_certificates, base_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        try:
            ctx.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as e:
            raise TlsError(f"tls: cannot load certificate {cert} / key {key}: {e}") from e
    return ctx


def tls_args(
    tls: TlsConfig, base_dir: Path, host: str, check_hostname: bool = False
) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for :meth:`pynetdicom.AE.associate`, or ``None`` when TLS is off for this peer."""
    if not tls.enabled:
        return None
    return client_context(tls, base_dir, check_hostname), host
