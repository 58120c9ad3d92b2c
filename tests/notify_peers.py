"""Peers of the notification tests: a webhook receiver and an MLLP listener (a RIS) on 127.0.0.1
free ports, in threads of the test process, stopped by the test."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import hl7


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class WebhookReceiver:
    """Records every POST (headers, JSON body); answers ``statuses`` in turn, then 200."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> WebhookReceiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                outer.received.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def bodies(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r.body for r in self.received if event is None or r.body.get("event") == event]


@dataclass
class MllpListener:
    """A RIS: reads MLLP frames, parses each with ``hl7.parse`` and answers an ACK whose MSA-1 is the
    next of ``acks`` (then AA)."""

    acks: list[str] = field(default_factory=list)
    messages: list[Any] = field(default_factory=list)  # hl7.Message
    raw: list[str] = field(default_factory=list)
    sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> MllpListener:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not data.endswith(b"\x1c\r"):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    continue
                text = data.decode("utf-8").strip("\x0b\x1c\r")
                self.raw.append(text)
                msg = hl7.parse(text)
                self.messages.append(msg)
                code = self.acks.pop(0) if self.acks else "AA"
                ack = str(msg.create_ack(code, message_id=f"ACK{len(self.messages)}"))
                conn.sendall(b"\x0b" + ack.encode("utf-8") + b"\x1c\r")

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            self.sock.close()


@contextmanager
def notify_peers(statuses: Sequence[int] = (), acks: Sequence[str] = ()) -> Iterator[tuple[WebhookReceiver,
                                                                                            MllpListener]]:
    hook = WebhookReceiver(list(statuses)).start()
    ris = MllpListener(list(acks)).start()
    try:
        yield hook, ris
    finally:
        hook.stop()
        ris.stop()


def segments(msg: Any, name: str) -> list[Any]:
    return [s for s in msg if str(s[0]) == name]
