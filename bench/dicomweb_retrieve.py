"""Retrieval time per study from one Orthanc, same studies, same run: C-MOVE vs C-GET vs WADO-RS.

A private loopback Orthanc (with its DICOMweb plug-in) holds N synthetic CT studies (one series of S slices
of SIZE x SIZE each).  For each method a fresh node storage gets every study, one after the other, through
the sweep's retrieval (:meth:`node.sweep.Sweeper.retrieve`), and the wall time of each study's retrieval is
kept (the query is not timed):

* C-MOVE to the node's AE: ``prognode serve`` runs as its own process and its SCP receives and stores;
* C-GET: the sub-operations come back on the sweep's association and are stored by the node's handler;
* WADO-RS (a ``kind = "dicomweb"`` source): the instances as Part 10, stored by the node's handler.

Each store is the node's own path (door checks, atomic write, fsync as configured, index).  Every study is
read once by WADO-RS before timing (Orthanc's disk cache warm for all methods), and the methods take turns
study by study (move, get, wado, then the next study), so drift on a shared machine hits all three alike.

    .venv/bin/python bench/dicomweb_retrieve.py [--studies 12] [--slices 64] [--size 256] [--no-fsync]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.node_helpers import node_process  # noqa: E402
from tests.peers import Orthanc, stop_pid, sweep_node_config, wait_port  # noqa: E402
from tests.synthetic_ct import write_studies  # noqa: E402

FIRST = dt.date(2026, 3, 2)
METHODS = ("move", "get", "wado")
LABEL = {"move": "C-MOVE (to prognode serve)", "get": "C-GET", "wado": "WADO-RS"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=12)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--no-fsync", action="store_true", help="node fsync = false (default: on, as deployed)")
    args = ap.parse_args()

    from node import config as config_mod
    from node.sweep import Sweeper, default_store_handler, open_database
    from node.sweep import dicomweb as web

    root = Path(tempfile.mkdtemp(prefix="prognode-bench-wado-"))
    pacs = Orthanc(root / "orthanc")
    procs: list[Any] = []
    try:
        studies = write_studies(root / "dcm", args.studies, FIRST, slices=args.slices, size=args.size)
        study_bytes = sum(f.stat().st_size for f in studies[0].files)
        pacs.start()
        pacs.upload([f for s in studies for f in s.files])
        sweepers: dict[str, Any] = {}
        for m in ("get", "wado", "move"):  # move last: its node's port is the one Orthanc knows as PROGNODE
            cfg_path = sweep_node_config(root / f"node-{m}", pacs, m, 1,
                                         node_extra=f"fsync = {'false' if args.no_fsync else 'true'}")
            cfg = config_mod.load(cfg_path)
            if m == "move":
                proc = node_process(cfg_path, log=root / "node-move.log")
                procs.append(proc)
                wait_port(cfg.node.port, timeout=60)
            db = open_database(cfg)
            sweepers[m] = Sweeper(cfg, db, default_store_handler(cfg, db))
        wado = sweepers["wado"]
        src_w = wado.source_config()
        _n, found = wado.find(src_w, f"{FIRST:%Y%m%d}", f"{FIRST + dt.timedelta(days=10):%Y%m%d}")
        assert len(found) == args.studies, found
        for r in found:  # warm Orthanc's cache: every study read once before timing
            for _part in web.retrieve_series(wado.client(src_w), src_w, r.study_uid, r.series_uid):
                pass
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        counts: dict[str, int] = dict.fromkeys(METHODS, 0)
        for r in found:
            for m in METHODS:
                sw = sweepers[m]
                t = time.perf_counter()
                got = sw.retrieve(sw.source_config(), r.study_uid, r.series_uid)
                times[m].append(time.perf_counter() - t)
                counts[m] += got
    finally:
        for p in procs:
            stop_pid(p)
        pacs.stop()
        shutil.rmtree(root, ignore_errors=True)

    n_inst = args.studies * args.slices
    print(f"\nRetrieval per study from a loopback Orthanc (DICOMweb plug-in): {args.studies} studies x 1 CT series x "
          f"{args.slices} slices {args.size}x{args.size} ({study_bytes / 1e6:.1f} MB a study, {n_inst} instances); "
          f"fsync {'off' if args.no_fsync else 'on'}; {os.cpu_count()} CPUs; one study at a time, methods in turn\n")
    head = f"{'method':28} {'inst.':>6} {'mean s':>7} {'median s':>8} {'min s':>6} {'max s':>6} {'MB/s':>6} {'inst/s':>7}"
    print(head)
    print("-" * len(head))
    for m in METHODS:
        ts = times[m]
        mean = statistics.fmean(ts)
        print(f"{LABEL[m]:28} {counts[m]:6d} {mean:7.3f} {statistics.median(ts):8.3f} {min(ts):6.3f} {max(ts):6.3f} "
              f"{study_bytes / 1e6 / mean:6.1f} {args.slices / mean:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
