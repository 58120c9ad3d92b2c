"""FastAPI application: dashboard (``/``), REST API (``/api/...``, OpenAPI at ``/openapi.json``), ``/metrics``.

Reads are open to whoever can reach ``[web].host:port`` (loopback by default).  Write actions need
``Authorization: Bearer <[web].token>`` (the dashboard's resend form posts the token as a field);
with an empty token every write is refused with 403.  Swagger UI is off: it would load from a CDN.
"""


import hmac
import logging
import socket
import threading
import time
import urllib.parse
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select

from node.audit import AuditSink
from node.config import Config
from node.db import Database, Job, Series
from node.jobs import NothingToResend, resend_job
from node.metrics import CONTENT_TYPE, Metrics
from node.reader import LevelRequestError, request_level
from node.routing import Router
from node.web import data, pages

log = logging.getLogger(__name__)

API_VERSION = "1"


def _token_ok(expected: str, given: str) -> bool:
    return bool(expected) and hmac.compare_digest(expected.encode(), given.encode())


def create_app(config: Config, db: Database, metrics: Metrics, audit: AuditSink | None = None) -> FastAPI:
    """The node's web app; dependencies are passed in, nothing is global."""
    app = FastAPI(title="prognode", version=API_VERSION, docs_url=None, redoc_url=None,
                  description="Series, jobs, dead letters, results and sweeps of a prognode DICOM node.")
    token = config.web.token

    def require_token(authorization: Annotated[str, Header()] = "") -> str:
        if not token:
            raise HTTPException(403, "write actions are disabled: [web].token is empty")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not _token_ok(token, given.strip()):
            raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
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
    @app.get("/api/series", response_model=list[data.SeriesOut], tags=["read"])
    def api_series(limit: Annotated[int, Query(ge=1, le=5000)] = 200, state: str | None = None) -> Any:
        return data.list_series(db, limit, state)

    @app.get("/api/jobs", response_model=list[data.JobOut], tags=["read"])
    def api_jobs(limit: Annotated[int, Query(ge=1, le=5000)] = 200, state: str | None = None) -> Any:
        return data.list_jobs(db, limit, state)

    @app.get("/api/jobs/{job_id}", response_model=data.JobOut, tags=["read"])
    def api_job(job_id: int) -> Any:
        job = data.get_job(db, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return job

    @app.get("/api/dead-letters", response_model=list[data.DeadLetterOut], tags=["read"])
    def api_dead(limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> Any:
        return data.list_dead_letters(db, limit)

    @app.get("/api/results", response_model=list[data.ResultOut], tags=["read"])
    def api_results(limit: Annotated[int, Query(ge=1, le=5000)] = 200) -> Any:
        return data.list_results(db, limit)

    @app.get("/api/sweeps", response_model=list[data.SweepOut], tags=["read"])
    def api_sweeps(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Any:
        return data.list_sweeps(db, limit)

    @app.post("/api/jobs/{job_id}/resend", response_model=data.ResendOut, tags=["write"])
    def api_resend(job_id: int, who: Annotated[str, Depends(require_token)]) -> Any:
        """Send the job's results again to every destination; a failed or dead job runs again.

        404: no such job; 409: nothing to resend (the job is pending or running, or has no results)."""
        return _resend(job_id, who)

    router = Router(config.routes)

    @app.post("/api/series/{series_uid}/level", response_model=data.LevelOut, status_code=202, tags=["write"])
    def api_level(series_uid: str, body: data.LevelIn, who: Annotated[str, Depends(require_token)]) -> Any:
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

    @app.get("/healthz", tags=["read"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "ae_title": config.node.ae_title}

    @app.get("/metrics", tags=["read"])
    def scrape() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    # Dashboard -------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def dashboard(msg: str = "") -> str:
        with db.session() as s:
            counts = {
                "Series": s.scalar(select(func.count()).select_from(Series)) or 0,
                "Jobs pending": s.scalar(select(func.count()).select_from(Job).where(Job.state == "pending")) or 0,
                "Jobs running": s.scalar(select(func.count()).select_from(Job).where(Job.state == "running")) or 0,
                "Jobs done": s.scalar(select(func.count()).select_from(Job).where(Job.state == "done")) or 0,
            }
        dead = data.list_dead_letters(db, 100)
        counts["Dead letters"] = len(dead)
        return pages.dashboard(f"{config.node.ae_title} @ {config.node.host}:{config.node.port}",
                               data.list_series(db, 100), data.list_jobs(db, 100), dead, data.list_results(db, 100),
                               data.list_sweeps(db, 20), writes_enabled=bool(token), message=msg, counts=counts)

    @app.post("/ui/jobs/{job_id}/resend", include_in_schema=False)
    async def ui_resend(job_id: int, request: Request) -> RedirectResponse:
        form = urllib.parse.parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0]
        if not token:
            raise HTTPException(403, "write actions are disabled: [web].token is empty")
        if not _token_ok(token, given):
            raise HTTPException(401, "wrong token")
        out = _resend(job_id, "dashboard")
        msg = f"job {job_id}: {'requeued' if out.job_requeued else 'kept'}, {out.exports_requeued} exports requeued"
        return RedirectResponse("/?" + urllib.parse.urlencode({"msg": msg}), status_code=303)

    return app


class WebServer:
    """uvicorn in a daemon thread; :meth:`stop` asks it to exit and joins."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     lifespan="off")
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
        return f"http://{self.config.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_web(config: Config, db: Database, metrics: Metrics, audit: AuditSink | None = None,
              port: int | None = None) -> "WebServer":
    """Start the web app for the node service (``[web].host``/``port``; ``port=0`` picks a free one)."""
    app = create_app(config, db, metrics, audit)
    server = WebServer(app, config.web.host, config.web.port if port is None else port).start()
    log.info("web dashboard on %s", server.url)
    return server
