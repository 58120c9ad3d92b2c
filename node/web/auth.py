"""Who may read and write the node's web app: tokens, the dashboard's sign-in cookie, CSRF, throttling.

The rules (``[web]`` in ``config.toml``, :class:`node.config.WebConfig`):

* ``token`` is the write token: ``Authorization: Bearer <token>`` on ``POST /api/...``; it also reads.
* ``read_token`` reads: the dashboard and every ``GET /api/...`` (they list patient IDs, series
  descriptions and UIDs).  Empty: only the write token reads.  Neither set: the dashboard and ``/api``
  answer 403; nothing is ever served to an anonymous reader.
* Public, without PHI: ``/healthz``, ``/metrics``, ``/openapi.json`` and the sign-in page.
* The browser signs in with a token form (``POST /signin``) and gets a session cookie (``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` over HTTPS or with ``[web].secure_cookies``).  The cookie holds no
  token: it is ``v1.<access>.<expires>.<nonce>.<mac>`` with ``mac = HMAC-SHA256(token of that access,
  ...)``, so changing a token ends its sessions; ``POST /signout`` ends one.
* Cookies never authorize ``/api`` writes (those need the bearer token, which a browser does not send on
  its own).  The dashboard's write forms need a write session, a same-origin ``Origin`` (or ``Referer``)
  header and the session's CSRF field.
* Every token comparison is constant-time; wrong tokens are throttled per client address.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from node.config import WebConfig

COOKIE = "prognode_session"
CSRF_FIELD = "csrf"
PUBLIC_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json", "/signin", "/signout", "/favicon.ico"})
MAX_FAILURES = 10  # wrong tokens per client address ...
FAILURE_WINDOW_SECONDS = 60.0  # ... in this window, then 429 until the window has passed
_VERSION = "v1"


class Access(enum.Enum):
    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Credential:
    """Who is asking: the access a token or a session grants, and how it was presented."""

    access: Access
    via: Literal["bearer", "cookie"]
    nonce: str = ""  # the session's (cookie only)
    expires: float = 0.0

    @property
    def writes(self) -> bool:
        return self.access is Access.WRITE


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


class WebAuth:
    """Token checks and stateless sessions for one web app (built from ``[web]`` once)."""

    def __init__(self, web: WebConfig, clock: Callable[[], float] = time.time) -> None:
        self._tokens = {Access.WRITE: web.token, Access.READ: web.read_token}
        self._session_seconds = web.session_hours * 3600.0
        self._clock = clock
        self._revoked: dict[str, float] = {}  # nonce -> expiry, for sessions signed out before they expire
        self._lock = threading.Lock()

    @property
    def writes_enabled(self) -> bool:
        return bool(self._tokens[Access.WRITE])

    @property
    def reads_enabled(self) -> bool:
        return any(self._tokens.values())

    @property
    def session_seconds(self) -> float:
        return self._session_seconds

    def check_token(self, given: str) -> Access | None:
        """The access ``given`` grants; compares with every configured token in constant time."""
        g = _digest(given)
        found: Access | None = None
        for access in (Access.READ, Access.WRITE):  # write last: it wins if both matched
            token = self._tokens[access]
            if hmac.compare_digest(g, _digest(token)) and token:
                found = access
        return found

    def _mac(self, access: Access, payload: str) -> str:
        key = ("prognode-web\0" + self._tokens[access]).encode("utf-8")
        return hmac.new(key, payload.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self, access: Access) -> tuple[str, Credential]:
        """A new session cookie value for ``access`` and its credential."""
        expires = int(self._clock() + self._session_seconds)
        nonce = secrets.token_urlsafe(16)
        payload = f"{_VERSION}.{access.value}.{expires}.{nonce}"
        return f"{payload}.{self._mac(access, payload)}", Credential(access, "cookie", nonce, float(expires))

    def session(self, cookie: str) -> Credential | None:
        """The credential of a session cookie, or None (malformed, forged, expired, signed out, token changed)."""
        parts = cookie.split(".")
        if len(parts) != 5 or parts[0] != _VERSION:
            return None
        _v, access_s, expires_s, nonce, mac = parts
        try:
            access = Access(access_s)
            expires = int(expires_s)
        except ValueError:
            return None
        if not self._tokens[access]:
            return None
        if not hmac.compare_digest(mac, self._mac(access, ".".join(parts[:4]))):
            return None
        now = self._clock()
        if expires <= now:
            return None
        with self._lock:
            if nonce in self._revoked:
                return None
        return Credential(access, "cookie", nonce, float(expires))

    def revoke(self, cred: Credential) -> None:
        """Sign a session out (kept until it would have expired; a restart forgets, the expiry still holds)."""
        now = self._clock()
        with self._lock:
            self._revoked = {n: e for n, e in self._revoked.items() if e > now}
            self._revoked[cred.nonce] = cred.expires

    def csrf(self, cred: Credential) -> str:
        """The CSRF field of a session's forms (bound to the session and to its token)."""
        return self._mac(cred.access, f"csrf.{cred.nonce}") if cred.via == "cookie" else ""

    def csrf_ok(self, cred: Credential, given: str) -> bool:
        expected = self.csrf(cred)
        return bool(expected) and hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


class FailureLimiter:
    """At most ``limit`` wrong tokens per client address in ``window`` seconds; then refuse until it passes."""

    def __init__(self, limit: int = MAX_FAILURES, window: float = FAILURE_WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self._clock = limit, window, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, []) if t > now - self.window]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: not blocked)."""
        now = self._clock()
        with self._lock:
            times = self._recent(client, now)
            return max(0.0, times[0] + self.window - now) if len(times) >= self.limit else 0.0

    def failed(self, client: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._failures) > 10_000:  # many addresses: forget the quiet ones
                for c in list(self._failures):
                    self._recent(c, now)
            self._failures.setdefault(client, []).append(now)


def origin_matches(headers: Mapping[str, str]) -> bool | None:
    """Whether the browser says the request comes from this origin.

    Compares the host and port of ``Origin`` (else ``Referer``) with the ``Host`` header; the scheme is
    not compared (a TLS proxy may forward plain HTTP).  None: neither header was sent (not a browser
    form, or a very old browser); ``Origin: null`` (sandboxed or privacy-stripped) is False.
    """
    source = headers.get("origin") or headers.get("referer")
    if source is None:
        return None
    if source == "null":
        return False
    netloc = urllib.parse.urlsplit(source).netloc.lower()
    host = headers.get("host", "").lower()
    return bool(netloc) and _strip_default_port(netloc, source) == _strip_default_port(host, source)


def _strip_default_port(netloc: str, url: str) -> str:
    default = ":443" if url.lower().startswith("https:") else ":80"
    return netloc[: -len(default)] if netloc.endswith(default) else netloc


def safe_next(target: str) -> str:
    """A local path to go to after signing in (never another site: ``//evil``, ``/\\evil``, ``https:``)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(c in target for c in "\r\n"):
        return "/"
    return target
