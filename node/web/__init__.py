"""The dashboard, REST API and ``/metrics`` of the node (FastAPI, served by uvicorn in a thread)."""

from node.web.app import WebServer, create_app, serve_web

__all__ = ["WebServer", "create_app", "serve_web"]
