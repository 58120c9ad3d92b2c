"""Sweep benchmark: prognode sweep vs dcmtk findscu + movescu/getscu doing the same retrieval, same run.

A private loopback Orthanc holds N synthetic CT studies (one series of S slices each).  Each method
queries STUDY level for the date range, then SERIES level per study, then retrieves each series:

* prognode sweep, C-MOVE to the node's AE (received by ``prognode serve`` running beside the sweep, fsync
  per instance), concurrency 1 and 2
* prognode sweep, C-GET (stores through the same path), concurrency 2
* dcmtk findscu + movescu (one process per query/series, to a dcmtk storescp; no fsync)
* dcmtk findscu + getscu

then a second prognode sweep of the same range (retrieves nothing), and a sweep killed (SIGKILL)
halfway that is resumed.  Prints a table; studies/min counts the studies swept per wall minute.

    .venv/bin/python bench/sweep.py [--studies 24] [--slices 16] [--size 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402

from tests.node_helpers import node_process  # noqa: E402
from tests.peers import Orthanc, free_port, stop_pid, sweep_node_config, wait_port, wait_until  # noqa: E402
from tests.synthetic_ct import write_studies  # noqa: E402

FIRST = dt.date(2026, 3, 2)
LAST = FIRST + dt.timedelta(days=10)


def node_config(folder: Path, pacs: Orthanc, retrieve: str, concurrency: int, pause: float = 0.0) -> Path:
    return sweep_node_config(folder, pacs, retrieve, concurrency, sweep_extra=f"pause_seconds = {pause}")


def sweep_cli(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "node", "sweep", "--config", str(cfg), "--from", FIRST.isoformat(),
            "--to", LAST.isoformat(), "--json", *extra]


class Serving:
    """``prognode serve`` of ``cfg`` as its own process while a C-MOVE sweep runs (its SCP receives)."""

    def __init__(self, cfg: Path, retrieve: str) -> None:
        self.cfg, self.retrieve = cfg, retrieve
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Serving:
        if self.retrieve == "move":
            from node import config as config_mod

            self.proc = node_process(self.cfg)
            wait_port(config_mod.load(self.cfg).node.port, timeout=60)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


def run_prognode(cfg: Path, retrieve: str = "move") -> tuple[float, dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with Serving(cfg, retrieve):
        t = time.monotonic()
        r = subprocess.run(sweep_cli(cfg), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - t
    if r.returncode != 0:
        raise RuntimeError(r.stdout + r.stderr)
    return wall, json.loads(r.stdout[r.stdout.index("{\n"):])


def _find(pacs: Orthanc, out: Path, keys: list[str]) -> list[dict[str, str]]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = ["findscu", "-S", "-aet", "DCMTK", "-aec", pacs.aet, "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    subprocess.run(args + ["127.0.0.1", str(pacs.dicom_port)], check=True, capture_output=True, timeout=120)
    rows = []
    for f in sorted(out.glob("rsp*.dcm")):
        ds = dcmread(f)
        rows.append({k: str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID")})
    return rows


def run_dcmtk(pacs: Orthanc, work: Path, method: str) -> tuple[float, int, int, int]:
    """findscu STUDY, findscu SERIES per study, movescu/getscu per series; returns wall, studies, series, files."""
    received = work / "received"
    received.mkdir(parents=True)
    scp = None
    if method == "move":
        port = free_port()
        pacs.add_modality("dcmtk", "DCMTKSCP", "127.0.0.1", port)
        scp = subprocess.Popen(["storescp", "-aet", "DCMTKSCP", "-od", str(received), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
    try:
        t = time.monotonic()
        studies = _find(pacs, work / "q-study", ["QueryRetrieveLevel=STUDY", f"StudyDate={FIRST:%Y%m%d}-{LAST:%Y%m%d}",
                                                 "ModalitiesInStudy=CT", "StudyInstanceUID"])
        series: list[dict[str, str]] = []
        for st in studies:
            series += _find(pacs, work / "q-series", ["QueryRetrieveLevel=SERIES", "Modality=CT",
                                                      f"StudyInstanceUID={st['StudyInstanceUID']}",
                                                      "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"])
        for se in series:
            keys = ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={se['StudyInstanceUID']}",
                    "-k", f"SeriesInstanceUID={se['SeriesInstanceUID']}"]
            if method == "move":
                args = ["movescu", "-S", "-aet", "DCMTK", "-aec", pacs.aet, "-aem", "DCMTKSCP", *keys]
            else:
                args = ["getscu", "-S", "-aet", "DCMTK", "-aec", pacs.aet, "-od", str(received), *keys]
            subprocess.run(args + ["127.0.0.1", str(pacs.dicom_port)], check=True, capture_output=True, timeout=300)
        wall = time.monotonic() - t
    finally:
        if scp is not None:
            stop_pid(scp)
    return wall, len(studies), len(series), len(list(received.iterdir()))


def run_killed(pacs: Orthanc, work: Path, n_series: int) -> dict[str, Any]:
    cfg = node_config(work, pacs, "move", 1, pause=0.3)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with Serving(cfg, "move"):
        proc = subprocess.Popen(sweep_cli(cfg), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        before = _kill_halfway(proc, work / "var" / "prognode.db", n_series)
    _wall, rep = run_prognode(cfg)
    return {"killed_after": before, **rep}


def _kill_halfway(proc: subprocess.Popen[bytes], db: Path, n_series: int) -> int:

    def retrieved() -> int:
        try:
            with sqlite3.connect(db, timeout=5) as c:
                return int(c.execute("select count(*) from sweep_items where state='retrieved'").fetchone()[0])
        except sqlite3.Error:
            return 0

    try:
        wait_until(lambda: retrieved() >= n_series // 2, timeout=600, what="half retrieved")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return retrieved()


def show_node(cfg_path: Path, metrics_out: Path | None, screenshot: Path | None) -> None:
    """Scrape /metrics and screenshot the dashboard of a swept node (real uvicorn, real Chromium signed in
    through the dashboard's form with a read token made for this run)."""
    import secrets

    from node import config as config_mod
    from node.db import Database
    from node.metrics import Metrics
    from node.web import serve_web

    token = secrets.token_hex(16)
    cfg = config_mod.load(cfg_path, overrides=[f"web.read_token={token}", "web.token="])
    db = Database(cfg.database_url)
    server = serve_web(cfg, db, Metrics(db), port=0)
    try:
        if metrics_out is not None:
            with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
                metrics_out.write_bytes(r.read())
        if screenshot is not None and shutil.which("chromium"):
            from tests.cdp import Browser

            with Browser(timeout=120) as browser:
                page = browser.new_page()
                page.goto(server.url + "/signin")
                page.act_and_wait_load(f"document.getElementById('token').value = {token!r};"
                                       "document.getElementById('signin-submit').click()")
                page.screenshot(screenshot)
    finally:
        server.stop()
        db.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--metrics-out", type=Path, default=REPO / "test-output" / "sweep-metrics.txt",
                    help="where to save a /metrics scrape of the swept node")
    ap.add_argument("--screenshot", type=Path, default=REPO / "test-output" / "dashboard-sweep.png",
                    help="where to save a Chromium screenshot of the swept node's dashboard")
    args = ap.parse_args()
    args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="prognode-bench-sweep-"))
    pacs = Orthanc(root / "orthanc")
    try:
        studies = write_studies(root / "dcm", args.studies, FIRST, slices=args.slices, size=args.size)
        pacs.start()
        pacs.upload([f for s in studies for f in s.files])
        n_inst = args.studies * args.slices
        rows: list[tuple[str, int, int, int, float, str]] = []

        def add(name: str, st: int, se: int, inst: int, wall: float, note: str = "") -> None:
            rows.append((name, st, se, inst, wall, note))

        for retrieve, conc in (("move", 1), ("move", 2), ("get", 2)):
            cfg = node_config(root / f"prognode-{retrieve}-{conc}", pacs, retrieve, conc)
            wall, rep = run_prognode(cfg, retrieve)
            add(f"prognode sweep C-{retrieve.upper()} x{conc}", rep["studies"], rep["retrieved"],
                rep["instances_retrieved"], wall, f"in-process {rep['seconds']:.2f}s, fsync on")
            if (retrieve, conc) == ("move", 2):
                wall2, rep2 = run_prognode(cfg, retrieve)
                add("  second sweep, same range", rep2["studies"], rep2["retrieved"], rep2["instances_retrieved"],
                    wall2, f"{rep2['skipped']} series skipped by the ledger")
                show_node(cfg, args.metrics_out, args.screenshot)
        for method in ("move", "get"):
            wall, st, se, files = run_dcmtk(pacs, root / f"dcmtk-{method}", method)
            tool = "movescu -> storescp" if method == "move" else "getscu"
            add(f"dcmtk findscu + {tool}", st, se, files, wall, "one process per query/series")
        killed = run_killed(pacs, root / "killed", args.studies)
        add("prognode sweep killed -9 halfway, rerun", killed["studies"], killed["retrieved"],
            killed["instances_retrieved"], killed["seconds"],
            f"resumed={killed['resumed']}, {killed['already_done']} done before kill "
            f"({killed['killed_after']} seen), pause 0.3s")
    finally:
        pacs.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nSweep over a loopback Orthanc: {args.studies} studies x 1 CT series x {args.slices} slices "
          f"{args.size}x{args.size} ({n_inst} instances); {os.cpu_count()} CPUs\n")
    head = f"{'method':44} {'studies':>7} {'series':>6} {'inst.':>6} {'wall s':>7} {'studies/min':>11}  note"
    print(head)
    print("-" * len(head))
    for name, st, se, inst, wall, note in rows:
        spm = 60.0 * st / wall if wall > 0 else 0.0
        print(f"{name:44} {st:7d} {se:6d} {inst:6d} {wall:7.2f} {spm:11.1f}  {note}")
    print(f"\n/metrics scrape of the C-MOVE x2 node: {args.metrics_out}; dashboard: {args.screenshot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
