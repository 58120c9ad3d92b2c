"""Concurrent senders: N dcmtk storescu associations at once, 50 CT instances of 128x128 each, sent to
``prognode serve`` (fsync on, its default) and to Orthanc (16 DICOM threads) in the same run.

Prints, per receiver and N: instances stored of those sent, senders that exited 0, wall seconds from the
first connection to the last sender's exit, and instances per second.  Every N gets fresh copies (new UIDs)
and a fresh receiver.

    .venv/bin/python bench/concurrency.py [--senders 1,4,8,16] [--per-sender 50] [--no-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import serve_config, start_serve  # noqa: E402
from bench.hostile import _stored, build_senders, probe_concurrency  # noqa: E402
from tests.peers import free_port, orthanc, stop_pid  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", default="1,4,8,16")
    ap.add_argument("--per-sender", type=int, default=50)
    ap.add_argument("--no-orthanc", action="store_true")
    args = ap.parse_args()
    counts = [int(n) for n in args.senders.split(",")]
    work = Path(tempfile.mkdtemp(prefix="prognode-bench-concurrency-"))
    rows: list[tuple[str, int, dict[str, str]]] = []
    try:
        for n in counts:
            folders = build_senders(work / f"data{n}", n, args.per_sender)
            port = free_port()
            node_dir = work / f"node{n}"
            node_dir.mkdir()
            proc = start_serve(node_dir, serve_config(port), port)
            audit = node_dir / "var" / "audit.jsonl"
            try:
                rows.append(("prognode", n, probe_concurrency(port, "PROGNODE", folders, lambda a=audit: _stored(a))))
            finally:
                stop_pid(proc)
            if not args.no_orthanc and shutil.which("Orthanc"):
                with orthanc(work / f"orthanc{n}", extra_config={"DicomThreadsCount": 16}) as pacs:
                    def count(url: str = pacs.url) -> int:
                        with urllib.request.urlopen(url + "/statistics", timeout=30) as r:
                            return int(json.loads(r.read())["CountInstances"])
                    rows.append(("Orthanc", n, probe_concurrency(pacs.dicom_port, pacs.aet, folders, count)))
            shutil.rmtree(work / f"data{n}", ignore_errors=True)
        print(f"\nconcurrent senders: storescu x N at once, {args.per_sender} CT instances 128x128 each (explicit VR LE),"
              f" 127.0.0.1, {os.cpu_count()} CPUs, load {Path('/proc/loadavg').read_text().split()[:3]}")
        print("| receiver | senders | stored | senders ok | seconds | instances/s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, n, r in rows:
            print(f"| {name} | {n} | {r['stored']} | {r['senders ok']} | {r['seconds']} | {r['instances/s']} |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
