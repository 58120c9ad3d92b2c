"""The DICOMweb sender (``kind = "dicomweb"``): STOW-RS with ``dicomweb-client`` to ``{url}/studies``,
a QIDO-RS request as the probe; and the session, client and echo of any DICOMweb peer
(:class:`node.config.DicomwebPeer`: :func:`peer_session`, :func:`peer_client`, :func:`peer_echo`), which a
DICOMweb source's QIDO-RS and WADO-RS (:mod:`node.sweep.dicomweb`) and ``prognode echo`` use too.

* Credentials are read from files when a session opens (a Bearer ``token_file``, or ``username`` with a
  ``password_file`` for Basic) and go only into the ``Authorization`` header: never into a log line,
  an error or the audit log.
* Every request has the peer's ``timeout_seconds`` (connect and read), and dicomweb-client's own
  retries are off: retrying is :mod:`node.export`'s, the same for every kind.
* A JSON answer (QIDO-RS matches, WADO-RS metadata, a STOW-RS response) is read with a cap: at most
  ``JSON_MAX_BYTES``, all of it within ``JSON_READ_TIMEOUTS`` x the timeout (a peer trickling a byte per
  read timeout never ends otherwise); over either, the request fails with :class:`AnswerTooLarge` (a
  ``requests.RequestException``, so callers report it as any failed request) and the connection is closed.
* An ``https`` URL is verified with the peer's TLS table through :func:`node.tls.client_context`
  (TLS 1.2 or newer, ``ca_bundle`` only unless ``use_system_store``, the host name checked, a client
  certificate for mutual TLS), as a DIMSE peer is.
* Files go in as few requests as ``max_request_bytes`` allows.  Each file's :class:`Outcome` comes from
  the PS3.18 10.5.3 response: listed in ReferencedSOPSequence, it is stored; listed in FailedSOPSequence,
  it failed with its FailureReason (permanent unless the reason is a lack of resources, A7xx, or a
  processing failure, 0110).  Without a usable body: HTTP 4xx (but 408 and 429) is permanent, 5xx,
  408, 429, a timeout or a refused connection are retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from requests.adapters import HTTPAdapter

from node import tls
from node.config import DicomwebDestinationConfig, DicomwebPeer, DicomwebSourceConfig
from node.transports.base import Outcome, Sender, file_size

logger = logging.getLogger(__name__)
# dicomweb-client's retry decorator logs every failed request with its traceback at WARNING, even with its
# retries off; the export's own log line says what failed and what happens next
logging.getLogger("retrying").setLevel(logging.ERROR)

RETRYABLE_HTTP = frozenset({408, 429})  # the 4xx statuses that say "later"
PROCESSING_FAILURE = 0x0110


def reason_is_retryable(reason: int) -> bool:
    """A STOW-RS FailureReason (PS3.4 Table B.2-1 status) that may go away by itself: out of resources
    (A7xx) or a processing failure (0110)."""
    return (reason & 0xFF00) == 0xA700 or reason == PROCESSING_FAILURE


def http_is_permanent(status: int) -> bool:
    return 400 <= status < 500 and status not in RETRYABLE_HTTP


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:  # never the token
        return "_BearerAuth(***)"


class _PeerTlsAdapter(HTTPAdapter):
    """HTTPS with the peer's own SSL context (node.tls.client_context) and nothing else: no
    certifi bundle, no system store unless the config says so; ``server_hostname`` when set."""

    def __init__(self, context: tls.ClientContext, server_hostname: str) -> None:
        self._context = context
        self._server_hostname = server_hostname
        super().__init__()

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        host_params, _ = super().build_connection_pool_key_attributes(request, verify, cert)
        pool: dict[str, Any] = {"ssl_context": self._context}
        if self._server_hostname:
            pool["server_hostname"] = self._server_hostname
        return host_params, pool

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED"  # the context carries the CA bundle; no certifi bundle added
        conn.ca_certs = None
        conn.ca_cert_dir = None


def _read_secret(path: Path, base_dir: Path, key: str) -> str:
    p = path if path.is_absolute() else base_dir / path
    try:
        value = p.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {p}: {e.strerror or type(e).__name__}") from None
    if not value:
        raise ValueError(f"{key}: {p} is empty")
    return value


def peer_where(peer: DicomwebDestinationConfig | DicomwebSourceConfig) -> str:
    """How errors name the peer: ``destinations 'vna'`` or ``sources 'vna'`` (keys follow: ``.token_file``)."""
    return f"{'destinations' if isinstance(peer, DicomwebDestinationConfig) else 'sources'} {peer.name!r}"


def peer_session(peer: DicomwebPeer, base_dir: Path, where: str) -> requests.Session:
    """A requests session with the peer's credentials and TLS (``where`` names the peer in errors:
    ``destinations 'vna'``); raises ValueError (naming the key, never the secret) or node.tls.TlsError
    when a setting cannot be used."""
    s = requests.Session()
    s.trust_env = False  # no proxies or .netrc credentials from the environment
    try:
        if peer.token_file is not None:
            s.auth = _BearerAuth(_read_secret(peer.token_file, base_dir, f"{where}.token_file"))
        elif peer.username and peer.password_file is not None:
            s.auth = requests.auth.HTTPBasicAuth(
                peer.username, _read_secret(peer.password_file, base_dir, f"{where}.password_file"))
        if peer.uses_tls:
            ctx = tls.client_context(peer.tls.model_copy(update={"enabled": True}), base_dir, f"{where} tls")
            s.mount("https://", _PeerTlsAdapter(ctx, peer.tls.server_hostname))
    except BaseException:
        s.close()
        raise
    return s


JSON_MAX_BYTES = 64 << 20  # a QIDO-RS page of 500 studies is well under 2 MiB
JSON_READ_TIMEOUTS = 4.0  # a whole JSON answer arrives within this many times the peer's timeout
_JSON_HOOK = "_prognode_json_cap"


class AnswerTooLarge(requests.RequestException):
    """A peer's JSON answer over ``JSON_MAX_BYTES`` or slower than ``JSON_READ_TIMEOUTS`` x its timeout."""


def _json_cap(timeout: float) -> Any:
    """A response hook that reads a JSON body itself, in chunks, with the byte cap and the deadline (requests
    runs hooks before it reads the body of a request that is not streamed)."""

    def hook(r: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("stream") or "json" not in r.headers.get("Content-Type", "").lower():
            return r  # streamed answers (WADO-RS multipart) are capped part by part by their reader
        what = f"{r.request.method} {r.url}: the JSON answer"
        declared = r.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > JSON_MAX_BYTES:
            r.close()
            raise AnswerTooLarge(f"{what} declares {int(declared)} bytes, over the cap of {JSON_MAX_BYTES}",
                                 response=r)
        deadline = time.monotonic() + JSON_READ_TIMEOUTS * timeout
        body = bytearray()
        # read1: what one receive brings (a trickle is seen at each byte, not when 64 KiB have come)
        while chunk := r.raw.read1(64 << 10, decode_content=True):
            body += chunk
            if len(body) > JSON_MAX_BYTES:
                r.close()
                raise AnswerTooLarge(f"{what} passed the cap of {JSON_MAX_BYTES} bytes: transfer stopped", response=r)
            if time.monotonic() > deadline:
                r.close()
                raise AnswerTooLarge(f"{what} took over {JSON_READ_TIMEOUTS * timeout:.0f} s "
                                     f"({len(body)} bytes so far): transfer stopped", response=r)
        r._content = bytes(body)  # requests' own cache of the body: .json() and .content read it
        return r

    setattr(hook, _JSON_HOOK, True)
    return hook


def peer_client(peer: DicomwebPeer, session: requests.Session, timeout: float) -> DICOMwebClient:
    """A dicomweb-client for ``peer`` over ``session``: ``timeout`` seconds to connect and to read, its own
    retries off (retrying is the caller's: node.export's, or the sweep's); JSON answers capped (``_json_cap``)."""
    hooks = session.hooks.setdefault("response", [])
    hooks[:] = [h for h in hooks if not getattr(h, _JSON_HOOK, False)]
    hooks.append(_json_cap(timeout))
    c = DICOMwebClient(peer.url, session=session, timeout=(timeout, timeout))
    c.set_http_retry_params(retry=False)
    return c


def peer_echo(peer: DicomwebPeer, base_dir: Path, where: str, timeout: float) -> tuple[bool, str]:
    """A QIDO-RS study search (``limit=1``): answered with a 2xx status?  The probe of a destination and
    ``prognode echo`` of either kind."""
    try:
        session = peer_session(peer, base_dir, where)
    except (ValueError, tls.TlsError) as e:
        return False, f"{peer.url}: {e}"
    try:
        peer_client(peer, session, timeout).search_for_studies(limit=1)
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else 0
        reason = (e.response.reason if e.response is not None else "") or ""
        return False, f"QIDO-RS HTTP {status} {reason}".strip()
    except (requests.ConnectionError, requests.Timeout) as e:
        return False, f"QIDO-RS: {_no_answer(e, peer.url)}"
    except Exception as e:
        return False, f"QIDO-RS error: {type(e).__name__}: {e}"
    finally:
        session.close()
    return True, "QIDO-RS HTTP 200"


def peer_problems(peer: DicomwebPeer, base_dir: Path, where: str) -> list[str]:
    """Settings of ``peer`` that cannot be used (``prognode config check``): its credential and TLS files."""
    try:
        peer_session(peer, base_dir, where).close()
    except (ValueError, tls.TlsError) as e:
        return [str(e)]
    host = urlsplit(peer.url).hostname or ""
    return [] if host else [f"{where}.url: no host"]


def _failure_reason(item: pydicom.Dataset) -> int:
    try:
        return int(item.get("FailureReason", 0xC000))
    except (TypeError, ValueError):
        return 0xC000


def _response_dataset(response: requests.Response | None) -> pydicom.Dataset | None:
    """The PS3.18 store response of an HTTP error, when it carries one as DICOM JSON."""
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in ("application/dicom+json",
                                                                               "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:
        return None


def _no_answer(e: Exception, url: str) -> str:
    if isinstance(e, requests.exceptions.SSLError):
        return f"TLS with {url} failed: {_innermost(e)}"
    if isinstance(e, requests.Timeout):
        return f"{url} did not answer in time ({type(e).__name__})"
    return f"{url} unreachable (no connection: {_innermost(e)})"


def _innermost(e: BaseException) -> str:
    """The root cause of a requests error (urllib3 wraps it twice), without the request's URL."""
    while e.__context__ is not None and e.__context__ is not e:
        e = e.__context__
    cause = e.args[0] if e.args else e
    if isinstance(cause, BaseException):
        e = cause
    return f"{type(e).__name__}: {e}"[:300]


class DicomwebSender(Sender):
    kind = "dicomweb"

    def __init__(self, dest: DicomwebDestinationConfig, base_dir: Path) -> None:
        self.dest = dest
        self.base_dir = base_dir
        self._client: DICOMwebClient | None = None
        self._session: requests.Session | None = None

    def describe(self) -> str:
        return self.dest.url

    @property
    def _where(self) -> str:
        return peer_where(self.dest)

    def session(self) -> requests.Session:
        """A requests session with the destination's credentials and TLS (:func:`peer_session`)."""
        return peer_session(self.dest, self.base_dir, self._where)

    def client(self, session: requests.Session) -> DICOMwebClient:
        return peer_client(self.dest, session, self.dest.timeout_seconds)

    def open(self, datasets: Sequence[pydicom.Dataset]) -> str:
        try:
            self._session = self.session()
        except (ValueError, tls.TlsError) as e:
            return f"{self.describe()}: {e}"
        self._client = self.client(self._session)
        return ""

    def send(self, ds: pydicom.Dataset) -> Outcome:
        return self.send_all([ds])[0]

    def send_all(self, datasets: Sequence[pydicom.Dataset]) -> list[Outcome]:
        """As few STOW-RS requests as ``max_request_bytes`` allows; once one gets no answer, the rest are
        not tried (each would wait for its own timeout)."""
        chunks: list[list[pydicom.Dataset]] = []
        size = 0
        for ds in datasets:
            n = file_size(ds)
            if not chunks or (chunks[-1] and size + n > self.dest.max_request_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(ds)
            size += n
        out: list[Outcome] = []
        for chunk in chunks:
            if out and out[-1].unreachable:
                out.extend([out[-1]] * len(chunk))
            else:
                out.extend(self._post(chunk))
        return out

    def _post(self, datasets: Sequence[pydicom.Dataset]) -> list[Outcome]:
        """One STOW-RS request for ``datasets``; an Outcome each, in order."""
        if self._client is None:
            return [Outcome(False, error="STOW-RS: no session")] * len(datasets)
        try:
            answer = self._client.store_instances(list(datasets))
        except requests.HTTPError as e:
            response = e.response
            status = response.status_code if response is not None else 0
            body = _response_dataset(response)
            if body is not None and ("FailedSOPSequence" in body or "ReferencedSOPSequence" in body):
                return self._outcomes(datasets, body, str(status), http_failed=True)
            text = (response.reason if response is not None else "") or ""
            return [Outcome(False, status=str(status), error=f"STOW-RS HTTP {status} {text}".strip(),
                            permanent=http_is_permanent(status))] * len(datasets)
        except (requests.ConnectionError, requests.Timeout) as e:
            return [Outcome(False, error=f"STOW-RS: {_no_answer(e, self.describe())}",
                            unreachable=True)] * len(datasets)
        except Exception as e:
            return [Outcome(False, error=f"STOW-RS error: {type(e).__name__}: {e}")] * len(datasets)
        return self._outcomes(datasets, answer, "200", http_failed=False)

    def _outcomes(self, datasets: Sequence[pydicom.Dataset], body: pydicom.Dataset, status: str,
                  http_failed: bool) -> list[Outcome]:
        stored: Mapping[str, pydicom.Dataset] = {
            str(item.get("ReferencedSOPInstanceUID", "")): item for item in body.get("ReferencedSOPSequence", [])}
        failed: Mapping[str, pydicom.Dataset] = {
            str(item.get("ReferencedSOPInstanceUID", "")): item for item in body.get("FailedSOPSequence", [])}
        listed = bool(stored or failed)
        out = []
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if uid in failed:
                reason = _failure_reason(failed[uid])
                out.append(Outcome(False, status=status,
                                   error=f"STOW-RS FailedSOPSequence: FailureReason 0x{reason:04X}",
                                   permanent=not reason_is_retryable(reason)))
            elif uid in stored and not http_failed:
                warning = stored[uid].get("WarningReason")
                out.append(Outcome(True, status=status if warning is None else f"{status} warning 0x{int(warning):04X}"))
            elif not listed and not http_failed:
                out.append(Outcome(True, status=status))  # an empty 200: every instance stored
            else:
                out.append(Outcome(False, status=status, error="STOW-RS: the response does not list this instance"))
        return out

    def close(self) -> None:
        session, self._session, self._client = self._session, None, None
        if session is not None:
            session.close()

    def echo(self) -> tuple[bool, str]:
        """A QIDO-RS study search (``limit=1``): answered with a 2xx status?"""
        return peer_echo(self.dest, self.base_dir, self._where, self.dest.timeout_seconds)

    def problems(self) -> list[str]:
        return peer_problems(self.dest, self.base_dir, self._where)
