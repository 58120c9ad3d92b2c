"""FastAPI application: dashboard (``/``), REST API (``/api/...``, OpenAPI at ``/openapi.json``), ``/metrics``.

Nothing that lists patients or series is served anonymously (node.web.auth has the rules): every path but
``/healthz``, ``/metrics``, ``/openapi.json`` and the sign-in page needs the read or the write token,
as ``Authorization: Bearer ...`` (API clients) or as the dashboard's sign-in cookie (browsers);
``POST /api/...`` needs the write token as a bearer token.  The checks run in one middleware, before any
route, so a route added later is closed by default.  Swagger UI is off: it would load from a CDN.
"""


import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from node import counters
from node.audit import AuditLog, AuditSink
from node.config import Config
from node.db import Database, ExportState, JobState
from node.jobs import NothingToResend, resend_job
from node.metrics import CONTENT_TYPE, Metrics, queue_by_lane
from node.reader import LevelRequestError, request_level
from node.retract import RetractError, pipeline_version, request_rerun, retract_job
from node.routing import Router
from node.stow import StowReceiver
from node.stow import warning as stow_warning
from node.web import data, outcomes, pages
from node.web.auth import (
    COOKIE,
    CSRF_FIELD,
    PUBLIC_PATHS,
    Credential,
    FailureLimiter,
    WebAuth,
    origin_matches,
    safe_next,
)

log = logging.getLogger(__name__)

API_VERSION = "1"
MAX_FORM_BYTES = 16 * 1024
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # keeps Origin on same-origin form posts; sends nothing elsewhere
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
CLOSED = "the dashboard and /api are closed: set [web].read_token (reads) and/or [web].token (writes and reads)"

# Shown in the OpenAPI document; the middleware does the checking.
_bearer = HTTPBearer(auto_error=False, description="[web].read_token or [web].token; writes need [web].token")


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _problem(status: int, detail: str, bearer: bool = False) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if bearer else None)


def _stow_answer(status: int, body: dict[str, Any], warnings: list[str], raw: bool = False) -> Response:
    """A STOW-RS answer: ``application/dicom+json``, Warning headers (``raw``: already formatted)."""
    response = Response(json.dumps(body), status_code=status, media_type="application/dicom+json")
    for w in warnings:
        response.headers.append("Warning", w if raw else stow_warning(w))
    return response


def _harden(response: Response) -> Response:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    return response


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    parsed = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


def create_app(config: Config, db: Database, metrics: Metrics, audit: AuditSink | None = None) -> FastAPI:
    """The node's web app; dependencies are passed in, nothing is global."""
    app = FastAPI(title="prognode", version=API_VERSION, docs_url=None, redoc_url=None,
                  description="Series, jobs, dead letters, results and sweeps of a prognode DICOM node. "
                              "Reads need `Authorization: Bearer <[web].read_token or [web].token>`, "
                              "writes `Authorization: Bearer <[web].token>`.")
    auth = WebAuth(config.web)
    limiter = FailureLimiter()
    node_title = f"{config.node.ae_title} @ {config.node.host}:{config.node.port}"

    def record(event: str, **fields: Any) -> None:
        if audit is not None:
            audit.write(event, **fields)

    def bearer(request: Request, header: str) -> Credential | Response:
        client = _client(request)
        wait = limiter.blocked(client)
        if wait:
            return JSONResponse({"detail": "too many wrong tokens; try again later"}, status_code=429,
                                headers={"Retry-After": str(int(wait) + 1)})
        scheme, _, given = header.partition(" ")
        access = auth.check_token(given.strip()) if scheme.lower() == "bearer" else None
        if access is None:
            limiter.failed(client)
            log.warning("web: wrong or malformed bearer token from %s for %s %s", client, request.method,
                        request.url.path)
            return _problem(401, "a valid bearer token is required", bearer=True)
        return Credential(access, "bearer")

    def session(request: Request) -> Credential | None:
        cookie = request.cookies.get(COOKIE)
        return auth.session(cookie) if cookie else None

    def decide(request: Request) -> Credential | Response:
        """The credential of a non-public request, or the response that refuses it."""
        path, method = request.url.path, request.method
        api = path.startswith("/api/")
        if not auth.reads_enabled:
            return _problem(403, CLOSED)
        header = request.headers.get("authorization")
        found = bearer(request, header) if header is not None else session(request)
        if isinstance(found, Response):
            return found
        if found is None:
            if api or method not in SAFE_METHODS:
                return _problem(401, "sign in: a valid bearer token or session is required", bearer=True)
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/signin?" + urllib.parse.urlencode({"next": target}), status_code=303)
        if method in SAFE_METHODS:
            return found
        if not auth.writes_enabled:
            return _problem(403, "write actions are disabled: [web].token is empty")
        if api and found.via != "bearer":
            return _problem(401, "API writes need Authorization: Bearer <[web].token>", bearer=True)
        if not found.writes:
            return _problem(403, "the read token cannot write; use [web].token")
        if found.via == "cookie" and origin_matches(request.headers) is not True:
            return _problem(403, "cross-origin or origin-less form post refused")
        return found

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path in PUBLIC_PATHS:
            return _harden(await call_next(request))
        decided = decide(request)
        if isinstance(decided, Response):
            return _harden(decided)
        request.state.credential = decided
        return _harden(await call_next(request))

    def credential(request: Request) -> Credential:
        cred = getattr(request.state, "credential", None)
        if not isinstance(cred, Credential):  # cannot happen behind the middleware; refuse if it does
            raise HTTPException(401, "not signed in")
        return cred

    def require_write(request: Request, _shown: Annotated[Any, Depends(_bearer)]) -> str:
        """Write actions of the REST API: the write token as a bearer token (the middleware checked it)."""
        cred = credential(request)
        if not (cred.writes and cred.via == "bearer"):
            raise HTTPException(403, "the write token is required")
        return "api"

    def _resend(job_id: int, by: str) -> data.ResendOut:
        try:
            out = resend_job(db, job_id, audit, by)
        except KeyError as e:
            raise HTTPException(404, str(e.args[0])) from None
        except NothingToResend as e:
            raise HTTPException(409, str(e)) from None
        return data.ResendOut(job_id=out.job_id, job_requeued=out.job_requeued,
                              exports_requeued=out.exports_requeued)

    # REST ------------------------------------------------------------------------------------
    read = [Depends(_bearer)]

    @app.get("/api/series", response_model=list[data.SeriesOut], tags=["read"], dependencies=read)
    def api_series(limit: Annotated[int, Query(ge=1, le=5000)] = 200, state: str | None = None) -> Any:
        return data.list_series(db, limit, state)

    @app.get("/api/jobs", response_model=list[data.JobOut], tags=["read"], dependencies=read)
    def api_jobs(limit: Annotated[int, Query(ge=1, le=5000)] = 200, state: str | None = None) -> Any:
        return data.list_jobs(db, limit, state)

    @app.get("/api/jobs/{job_id}", response_model=data.JobOut, tags=["read"], dependencies=read)
    def api_job(job_id: int) -> Any:
        job = data.get_job(db, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return job

    @app.get("/api/dead-letters", response_model=list[data.DeadLetterOut], tags=["read"], dependencies=read)
    def api_dead(limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> Any:
        return data.list_dead_letters(db, limit)

    @app.get("/api/results", response_model=list[data.ResultOut], tags=["read"], dependencies=read)
    def api_results(limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> Any:
        return data.list_results(db, limit)

    @app.get("/api/outcomes", response_model=list[outcomes.OutcomeOut], tags=["read"], dependencies=read)
    def api_outcomes(limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> Any:
        return outcomes.list_outcomes(db, config.web.viewer_url, limit)

    @app.get("/api/time-to-result", response_model=list[outcomes.HistogramOut], tags=["read"], dependencies=read)
    def api_time_to_result() -> Any:
        return outcomes.histograms(db)

    @app.get("/api/sweeps", response_model=list[data.SweepOut], tags=["read"], dependencies=read)
    def api_sweeps(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Any:
        return data.list_sweeps(db, limit)

    @app.post("/api/jobs/{job_id}/resend", response_model=data.ResendOut, tags=["write"])
    def api_resend(job_id: int, who: Annotated[str, Depends(require_write)]) -> Any:
        """Send the job's results again to every destination; a failed or dead job runs again.

        401: no or wrong token; 403: the read token, or writes disabled; 404: no such job;
        409: nothing to resend (the job is pending or running, or has no results)."""
        return _resend(job_id, who)

    @app.post("/api/jobs/{job_id}/retract", response_model=data.RetractOut, tags=["write"])
    def api_retract(job_id: int, body: data.RetractIn, who: Annotated[str, Depends(require_write)]) -> Any:
        """Retract the job's results: an IOCM rejection note (KOS "Rejected for Quality Reasons")
        referencing them goes to every destination that received them (node.retract).

        401: no or wrong token; 403: the read token, or writes disabled; 404: no such job;
        409: the job is not done, has no results or is already retracted; 422: an empty reason."""
        try:
            out = retract_job(db, config, audit, job_id, body.reason, by=who)
        except RetractError as e:
            raise HTTPException(e.status, str(e)) from None
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return data.RetractOut(job_id=out.job_id, kos_sop_instance_uid=out.kos_sop_instance_uid,
                               retracted=list(out.retracted), destinations=list(out.destinations),
                               exports_cancelled=out.cancelled)

    @app.post("/api/series/{series_uid}/rerun", response_model=data.RerunOut, status_code=202, tags=["write"])
    def api_rerun(series_uid: str, body: data.RerunIn, who: Annotated[str, Depends(require_write)]) -> Any:
        """Run a pipeline again on the inputs of the series' latest job of it, at the installed version
        (``prognode rerun``, node.retract): the new results supersede the old (Predecessor Documents).

        202: queued (or that version's job was queued already), its id.  404: unknown series, or no
        job of the pipeline on it; 409: a job of it on the series is queued or running, or the
        installed version made the latest result already (unless ``force``); 422: unknown pipeline."""
        try:
            version = pipeline_version(config, body.pipeline)
        except KeyError as e:
            raise HTTPException(422, str(e.args[0])) from None
        try:
            out = request_rerun(db, audit, series_uid, body.pipeline, version, by=who, force=body.force)
        except RetractError as e:
            raise HTTPException(e.status, str(e)) from None
        return data.RerunOut(job_id=out.job_id, created=out.created, previous_job=out.previous_job,
                             previous_version=out.previous_version, version=out.version)

    router = Router(config.routes, sweep_priority=config.sweep.priority)

    @app.post("/api/series/{series_uid}/level", response_model=data.LevelOut, status_code=202, tags=["write"])
    def api_level(series_uid: str, body: data.LevelIn, who: Annotated[str, Depends(require_write)]) -> Any:
        """Recompute body composition at a reader-confirmed level (L3 or C3) on one image of the series.

        Queues a new body-composition job whose results supersede the earlier ones (202, its id).
        404: unknown series; 422: bad level, image not in the series, an absent or repeated instance
        number, or a reader that is not a person name; 409: a body-composition job on the series is
        queued or running, or the series is still receiving."""
        try:
            q = request_level(db, router, audit, series_uid, body.level, sop_instance_uid=body.sop_instance_uid,
                              instance_number=body.instance_number, reader=body.reader, source="api")
        except LevelRequestError as e:
            raise HTTPException(e.status, str(e)) from None
        return data.LevelOut(job_id=q.job_id, sop_instance_uid=q.sop_instance_uid)

    stow = StowReceiver(config, db, audit if audit is not None else AuditLog(None), metrics)

    @app.post("/dicom-web/studies", tags=["write"], response_class=Response)
    async def stow_rs(request: Request, who: Annotated[str, Depends(require_write)]) -> Response:
        """STOW-RS (PS3.18 10.5): DICOM Part 10 files as ``multipart/related; type="application/dicom"``, stored
        as if received by C-STORE (node.stow).  200 all stored, 202 some, 409 none (FailedSOPSequence with
        each FailureReason, a Warning header with the reason in words); 400 malformed, 413 over
        ``[web] stow_max_request_bytes``, 415 another media type; 401/403 without the write token."""
        return await _stow(request)

    async def _stow(request: Request) -> Response:
        peer = f"{_client(request)}:{request.client.port if request.client else 0}"
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > stow.max_request_bytes:
            stow.count(413)
            return _stow_answer(413, {}, [f"request of {declared} bytes over [web] stow_max_request_bytes "
                                          f"({stow.max_request_bytes})"])
        try:
            spooled = await run_in_threadpool(stow.spool)
        except OSError as e:
            stow.count(503)
            return _stow_answer(503, {}, [f"cannot spool the request: {e.strerror or e}"])
        with spooled:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > stow.max_request_bytes:
                    stow.count(413)
                    return _stow_answer(413, {}, [f"request over [web] stow_max_request_bytes "
                                                  f"({stow.max_request_bytes})"])
                await run_in_threadpool(spooled.write, chunk)
            await run_in_threadpool(spooled.flush)
            result = await run_in_threadpool(stow.receive, spooled, size, request.headers.get("content-type", ""),
                                             peer)
        return _stow_answer(result.status, result.body, result.warnings, raw=True)

    @app.get("/healthz", tags=["public"])
    def healthz() -> dict[str, str]:
        """Open, no PHI."""
        return {"status": "ok", "ae_title": config.node.ae_title}

    @app.get("/metrics", tags=["public"])
    def scrape() -> Response:
        """Open, no PHI: counts by state, sizes and durations only."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    # Sign-in ---------------------------------------------------------------------------------
    def secure(request: Request) -> bool:
        return config.web.secure_cookies or request.url.scheme == "https"

    def signin_page(status: int, message: str = "", next_path: str = "/",
                    signed_in: Credential | None = None) -> HTMLResponse:
        return HTMLResponse(pages.signin(node_title, message, safe_next(next_path), auth.reads_enabled,
                                         signed_in.access.value if signed_in else ""), status_code=status)

    @app.get("/signin", response_class=HTMLResponse, include_in_schema=False)
    def signin_form(request: Request, next: str = "/", msg: str = "") -> HTMLResponse:  # noqa: A002
        return signin_page(200, msg, next, session(request))

    @app.post("/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        if origin_matches(request.headers) is False:
            return _problem(403, "cross-origin sign-in refused")
        client = _client(request)
        form = await _form(request)
        next_path = safe_next(form.get("next", "/"))
        if not auth.reads_enabled:
            return signin_page(403, CLOSED, next_path)
        wait = limiter.blocked(client)
        if wait:
            page = signin_page(429, "too many wrong tokens; try again later", next_path)
            page.headers["Retry-After"] = str(int(wait) + 1)
            return page
        access = auth.check_token(form.get("token", ""))
        if access is None:
            limiter.failed(client)
            record("web_signin", client=client, ok=False)
            log.warning("web: failed sign-in from %s", client)
            return signin_page(401, "wrong token", next_path)
        value, cred = auth.issue(access)
        record("web_signin", client=client, ok=True, access=access.value)
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(COOKIE, value, max_age=int(auth.session_seconds), path="/", secure=secure(request),
                            httponly=True, samesite="strict")
        return response

    @app.post("/signout", include_in_schema=False)
    def signout(request: Request) -> Response:
        if origin_matches(request.headers) is False:
            return _problem(403, "cross-origin sign-out refused")
        cred = session(request)
        if cred is not None:
            auth.revoke(cred)
            record("web_signout", client=_client(request), access=cred.access.value)
        response = RedirectResponse("/signin?" + urllib.parse.urlencode({"msg": "signed out"}), status_code=303)
        response.delete_cookie(COOKIE, path="/", secure=secure(request), httponly=True, samesite="strict")
        return response

    # Dashboard -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(request: Request, msg: str = "") -> str:
        cred = credential(request)
        with db.read() as s:  # the counters kept by the database (node.counters), not table scans
            figures = counters.read_counters(s.connection())
            lanes = queue_by_lane(s, time.time())
        counts = {
            "Series": sum(counters.by_state(figures, "series").values()),
            "Jobs pending": figures.get(f"jobs.{JobState.PENDING}", 0),
            "Jobs running": figures.get(f"jobs.{JobState.RUNNING}", 0),
            "Jobs done": figures.get(f"jobs.{JobState.DONE}", 0),
            **{f"Queue {lane}": depth for lane, depth in lanes.items()},  # ready to run, by lane (node.lanes)
            "Instances received": metrics.instances_received_total(),  # by this process: C-STORE, STOW-RS, sweeps
        }
        dead = data.list_dead_letters(db, 100)
        counts["Dead letters"] = figures.get(f"jobs.{JobState.DEAD}", 0) + figures.get(f"exports.{ExportState.DEAD}", 0)
        if not auth.writes_enabled:
            writes = "disabled"
        elif cred.writes and cred.via == "cookie":
            writes = "enabled"
        else:
            writes = "read-only"
        return pages.dashboard(node_title, data.list_series(db, 100), data.list_jobs(db, 100), dead,
                               data.list_results(db, 100), data.list_sweeps(db, 20), writes=writes,
                               csrf=auth.csrf(cred), access=cred.access.value if cred.via == "cookie" else "",
                               message=msg, counts=counts,
                               outcomes=outcomes.outcomes_html(outcomes.list_outcomes(db, config.web.viewer_url, 100),
                                                               pages.fmt_time),
                               histograms=outcomes.histograms_html(outcomes.histograms(db)))

    @app.post("/ui/jobs/{job_id}/resend", include_in_schema=False)
    async def ui_resend(job_id: int, request: Request) -> RedirectResponse:
        cred = credential(request)
        form = await _form(request)
        if not cred.writes:
            raise HTTPException(403, "the read token cannot write")
        if cred.via == "cookie" and not auth.csrf_ok(cred, form.get(CSRF_FIELD, "")):
            raise HTTPException(403, "missing or wrong CSRF field; reload the dashboard")
        out = _resend(job_id, "dashboard")
        msg = f"job {job_id}: {'requeued' if out.job_requeued else 'kept'}, {out.exports_requeued} exports requeued"
        return RedirectResponse("/?" + urllib.parse.urlencode({"msg": msg}), status_code=303)

    return app


class WebServer:
    """uvicorn in a daemon thread; :meth:`stop` asks it to exit and joins."""

    def __init__(self, app: FastAPI, host: str, port: int, certificate: Path | None = None,
                 private_key: Path | None = None) -> None:
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     lifespan="off", ssl_certfile=certificate, ssl_keyfile=private_key)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self, timeout: float = 15.0) -> "WebServer":  # noqa: UP037
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"web server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return int(self.config.port)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.ssl_certfile else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_web(config: Config, db: Database, metrics: Metrics, audit: AuditSink | None = None,
              port: int | None = None) -> "WebServer":
    """Start the web app for the node service (``[web].host``/``port``; ``port=0`` picks a free one)."""
    web = config.web
    if not (web.token or web.read_token):
        log.warning("web: neither [web].token nor [web].read_token is set: the dashboard and /api answer 403; "
                    "/healthz and /metrics are served")
    elif not web.token:
        log.info("web: [web].token is empty: write actions (resend) are refused")
    for name, token in (("token", web.token), ("read_token", web.read_token)):
        if token and len(token) < 16:
            log.warning("web: [web].%s is shorter than 16 characters; use e.g. `openssl rand -hex 16`", name)
    app = create_app(config, db, metrics, audit)
    cert = config.path(web.tls_certificate) if web.tls_certificate is not None else None
    key = config.path(web.tls_private_key) if web.tls_private_key is not None else None
    server = WebServer(app, web.host, web.port if port is None else port, cert, key).start()
    log.info("web dashboard on %s", server.url)
    return server
