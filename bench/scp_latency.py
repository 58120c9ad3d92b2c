"""Where an instance's time goes in the SCP's receive path: pynetdicom's stock acceptor vs node.transport.

storescu sends one instance at a time and waits for its C-STORE-RSP, so every delay on the
receiving side is on the critical path.  This serves the 300-slice bench CT (built as in
bench/ingest.py) with a handler that only sleeps ``--handler-ms`` (standing in for the fsync),
once with pynetdicom's acceptor and once with :class:`node.transport.NodeRequestHandler`, and
prints per-instance medians: peer (last response sent -> first P-DATA of the next instance),
receive (first P-DATA -> handler start) and respond (handler end -> C-STORE-RSP sent).

    .venv/bin/python bench/scp_latency.py [--slices 300] [--handler-ms 4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.ingest import build_ct  # noqa: E402


def serve_and_send(folder: Path, node_transport: bool, handler_s: float) -> tuple[float, dict[str, float]]:
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.transport import ThreadedAssociationServer

    from node.transport import STANDARD_LOG_HANDLERS, NodeRequestHandler

    marks: list[tuple[str, float]] = []

    def on_recv(event: Any) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            marks.append(("recv", time.perf_counter()))

    def on_sent(event: Any) -> None:
        if type(event.pdu).__name__ == "P_DATA_TF":
            marks.append(("sent", time.perf_counter()))

    def on_store(_event: Any) -> int:
        marks.append(("h0", time.perf_counter()))
        time.sleep(handler_s)
        marks.append(("h1", time.perf_counter()))
        return 0

    ae = AE("PROGNODE")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    kwargs: dict[str, Any] = {"request_handler": NodeRequestHandler} if node_transport else {}
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store),
                                                            (evt.EVT_PDU_RECV, on_recv), (evt.EVT_PDU_SENT, on_sent)],
                            server_class=ThreadedAssociationServer, **kwargs)
    for event, handler in STANDARD_LOG_HANDLERS:
        server.unbind(event, handler)
    ae._servers.append(server)  # as DicomServer.start does, so that shutdown() finds it
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", "PROGNODE", "+sd", "127.0.0.1", str(server.server_address[1]), str(folder)],
                   check=True, capture_output=True, timeout=600)
    wall = time.perf_counter() - t0
    server.shutdown()
    peer, receive, respond = [], [], []
    first: float | None = None
    last_sent = h1 = 0.0
    for kind, t in marks:
        if kind == "recv" and first is None:
            first = t
            if last_sent:
                peer.append(t - last_sent)
        elif kind == "h0" and first is not None:
            receive.append(t - first)
        elif kind == "h1":
            h1 = t
        elif kind == "sent" and h1:
            respond.append(t - h1)
            last_sent, first, h1 = t, None, 0.0
    return wall, {"peer": statistics.median(peer) * 1e3, "receive": statistics.median(receive) * 1e3,
                  "respond": statistics.median(respond) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--handler-ms", type=float, default=4.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prognode-bench-scp-"))
    try:
        build_ct(work / "ct", args.slices)
        print(f"\nSCP receive path, {args.slices} slices 512x512 by storescu, handler sleeps {args.handler_ms} ms, "
              f"load {Path('/proc/loadavg').read_text().split()[:3]}")
        print("| acceptor | seconds | peer ms | receive ms | respond ms |")
        print("|---|---:|---:|---:|---:|")
        for name, ours in (("pynetdicom stock", False), ("node.transport", True)):
            wall, ms = serve_and_send(work / "ct", ours, args.handler_ms / 1000)
            print(f"| {name} | {wall:.2f} | {ms['peer']:.2f} | {ms['receive']:.2f} | {ms['respond']:.2f} |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
