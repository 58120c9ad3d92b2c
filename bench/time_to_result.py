"""Time to result: last image sent -> DICOM SEG and SR retrievable from Orthanc.

A 300-slice 512x512 CT built from real data (see bench/ingest.py) is sent with storescu
to ``python -m node serve`` routing CT to ``tissue-hu`` and sending to a loopback
Orthanc.  Reported: ingest time, completion latency (last image -> series complete, from
the node's ledger), job time, last image -> both results in the PACS (ledger and as seen
by polling Orthanc's REST API), and peak RSS of the node and of its worker process,
and the CPU seconds each spent (a load-independent view when other work shares the CPU).

    .venv/bin/python bench/time_to_result.py [--slices 300] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import serve_config, start_serve  # noqa: E402
from bench.ingest import build_ct  # noqa: E402
from tests.peers import Orthanc, free_port, stop_pid  # noqa: E402


def peak_rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants_cpu(pid: int) -> float:
    """CPU seconds of the node's descendants (the worker pool), summed."""
    total, todo = 0.0, children(pid)
    while todo:
        c = todo.pop()
        total += cpu_seconds(c)
        todo += children(c)
    return total


class RssWatch:
    """Samples VmHWM of the node and its descendants until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.node = 0
        self.workers = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.node = max(self.node, peak_rss_kib(self.pid))
            todo = children(self.pid)
            while todo:
                c = todo.pop()
                self.workers = max(self.workers, peak_rss_kib(c))
                todo += children(c)


def one_run(work: Path, ct_dir: Path, study: str) -> dict[str, float]:
    pacs = Orthanc(work / "orthanc").start()
    node = None
    try:
        port = free_port()
        node = start_serve(work, serve_config(port, f"""
[completion]
quiet_seconds = 20
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {pacs.dicom_port}
retry_seconds = 1
[[routes]]
name = "ct"
when = {{ Modality = "CT" }}
pipelines = ["tissue-hu"]
send_to = ["pacs"]
"""), port, name="node", timeout=120)
        watch = RssWatch(node.pid)
        # let the worker finish preloading, as on a node that has been up for a while: wait until
        # the worker pool exists and its CPU time has stopped growing (at least 3 s, at most 120 s)
        settle0 = time.time()
        last, still = -1.0, 0
        while time.time() - settle0 < 120 and (time.time() - settle0 < 3 or still < 4 or last <= 0):
            time.sleep(0.25)
            cpu = descendants_cpu(node.pid)
            still = still + 1 if cpu == last else 0
            last = cpu
        cpu0_node, cpu0_workers = cpu_seconds(node.pid), descendants_cpu(node.pid)
        t0 = time.time()
        subprocess.run(["storescu", "-aet", "BENCH", "-aec", "PROGNODE", "+sd", "127.0.0.1", str(port), str(ct_dir)],
                       check=True, capture_output=True, timeout=900)
        sent = time.time()
        while True:
            mods = pacs.modalities_in_study(study)
            if {"SEG", "SR"} <= set(mods):
                break
            if time.time() - sent > 600:
                raise TimeoutError("no SEG and SR after 600 s")
            time.sleep(0.05)
        seen = time.time()
        cpu_node, cpu_workers = cpu_seconds(node.pid) - cpu0_node, descendants_cpu(node.pid) - cpu0_workers
        watch.stop.set()
        watch.thread.join()
        con = sqlite3.connect(work / "var" / "prognode.db", timeout=30)
        try:
            last, done, start, fin, pacs_at = con.execute(
                "select s.last_received, s.completed_at, j.started_at, j.finished_at, max(r.in_pacs_at) "
                "from series s join jobs j on j.series_uid = s.series_uid join results r on r.job_id = j.id").fetchone()
        finally:
            con.close()
        return {"ingest_s": sent - t0, "completion_s": done - last, "job_s": fin - start,
                "ledger_last_to_pacs_s": pacs_at - last, "seen_last_to_pacs_s": seen - sent,
                "node_cpu_s": cpu_node, "worker_cpu_s": cpu_workers,
                "node_rss_mib": watch.node / 1024, "worker_rss_mib": watch.workers / 1024}
    finally:
        if node is not None:
            stop_pid(node, 30)
        pacs.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="prognode-bench-ttr-"))
    try:
        import pydicom

        files = build_ct(root / "ct", args.slices)
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        rows = []
        for i in range(args.runs):
            work = root / f"run{i}"
            work.mkdir()
            rows.append(one_run(work, root / "ct", study))
        load = os.getloadavg()
        print(f"\ntime to result: {args.slices} slices 512x512 (real CT, explicit VR LE) -> tissue-hu -> Orthanc; "
              f"{os.cpu_count()} CPUs, load average {load[0]:.1f}")
        keys = ["ingest_s", "completion_s", "job_s", "ledger_last_to_pacs_s", "seen_last_to_pacs_s",
                "node_cpu_s", "worker_cpu_s", "node_rss_mib", "worker_rss_mib"]
        labels = {"ingest_s": "ingest (storescu, s)", "completion_s": "completion latency (s)",
                  "job_s": "tissue-hu job (s)", "ledger_last_to_pacs_s": "last image -> SEG+SR in PACS, ledger (s)",
                  "seen_last_to_pacs_s": "last image sent -> SEG+SR retrievable, REST poll (s)",
                  "node_cpu_s": "node CPU, ingest to results (s)",
                  "worker_cpu_s": "worker CPU = job CPU, load-independent (s)",
                  "node_rss_mib": "peak RSS node (MiB)", "worker_rss_mib": "peak RSS worker (MiB)"}
        print("| measure | " + " | ".join(f"run {i + 1}" for i in range(len(rows))) + " |")
        print("|---|" + "---:|" * len(rows))
        for k in keys:
            print(f"| {labels[k]} | " + " | ".join(f"{r[k]:.2f}" for r in rows) + " |")
        print(json.dumps(rows))
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
