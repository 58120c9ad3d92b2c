"""`make demo`: a real CT through prognode into a loopback Orthanc, end to end.

Starts a private Orthanc (the PACS) on free loopback ports, starts the node
(``python -m node serve --config FILE`` with ports, storage and destination overridden by
``--set``), sends a real CT series from ../shared/data with dcmtk's storescu (the shared
TotalSegmentator CT, given proper UIDs in a temporary copy), waits until the DICOM SEG and
SR are in Orthanc, prints what arrived and the seconds from the last image to results in
the PACS, and stops what it started.  Exits non-zero on failure.

    .venv/bin/python scripts/demo.py --config config.toml
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import DATA, Orthanc, free_port, stop_pid, storescu, wait_port, wait_until, with_uids  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "config.toml")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SEG and SR in the PACS")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    src = DATA / "totalseg_example_ct_dicom" / "dicom"
    if not src.is_dir():
        print(f"demo: shared data not found at {src}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="prognode-demo-"))
    pacs = Orthanc(work / "orthanc")
    node: subprocess.Popen[bytes] | None = None
    try:
        pacs.start()
        print(f"PACS: Orthanc {pacs.aet} on 127.0.0.1:{pacs.dicom_port} (REST {pacs.url})")
        port = free_port()
        dest = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                 "retry_seconds": 2, "max_attempts": 10}]
        sets = [f"node.port={port}", f"node.storage={work / 'var'}", "node.min_free_bytes=0",
                f"destinations={json.dumps(dest)}", f"logging.audit_file={work / 'var' / 'audit.jsonl'}",
                "web.enabled=false"]
        cmd = [sys.executable, "-m", "node", "serve", "--config", str(args.config.resolve())]
        for s in sets:
            cmd += ["--set", s]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        log = open(work / "node.log", "wb")  # noqa: SIM115 - closed with the process
        node = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(port, 120)
        print(f"node: prognode on 127.0.0.1:{port} (config {args.config}, log {work / 'node.log'})")

        ct = with_uids(src, work / "ct", seed=f"demo-{time.time()}")
        import pydicom

        first = pydicom.dcmread(ct[0], stop_before_pixels=True)
        study = str(first.StudyInstanceUID)
        storescu(port, ct, calling="SCANNER", extra=["-xv"])  # JPEG 2000 lossless, as stored
        last_sent = time.time()
        print(f"sent: {len(ct)} CT slices ({first.get('SeriesDescription', '')}) with storescu, study {study}")

        def arrived() -> list[str]:
            mods = pacs.modalities_in_study(study)
            return mods if {"SEG", "SR"} <= set(mods) else []

        wait_until(arrived, args.timeout, interval=0.1, what="SEG and SR in the PACS")
        seen = time.time()
        series = pacs.post("/tools/find", json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study},
                                                       "Expand": True}))
        print("in the PACS now:")
        for s in series:
            tags = s["MainDicomTags"]
            print(f"  {tags.get('Modality', ''):<4} series {tags.get('SeriesNumber', ''):>5}  "
                  f"{len(s['Instances'])} instance(s)  {tags.get('SeriesDescription', '')}")
        con = sqlite3.connect(work / "var" / "prognode.db", timeout=30)
        try:
            row = con.execute("select s.last_received, s.completed_at, j.started_at, j.finished_at, "
                              "max(r.in_pacs_at) from series s join jobs j on j.series_uid = s.series_uid "
                              "join results r on r.job_id = j.id").fetchone()
        finally:
            con.close()
        print(f"seconds from last image sent to SEG and SR seen in the PACS: {seen - last_sent:.2f}")
        if row and all(v is not None for v in row):
            last, done, start, fin, pacs_at = row
            print(f"  (node's ledger: completion {done - last:.2f} s, job {fin - start:.2f} s, "
                  f"last image to both in PACS {pacs_at - last:.2f} s)")
        return 0
    except Exception as e:
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        if (work / "node.log").exists():
            print((work / "node.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        if node is not None:
            stop_pid(node, timeout=30)
        pacs.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
