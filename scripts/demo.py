"""`make demo`: a real CT through prognode into a loopback Orthanc, end to end.

Starts a private Orthanc (the PACS) on free loopback ports, starts the node
(``python -m node serve --config FILE`` with ports, storage and destination overridden by
``--set``), sends a real CT series from ../shared/data with dcmtk's storescu (the shared
TotalSegmentator CT, given proper UIDs in a temporary copy) and a generated abdomen phantom
that contains L3, waits until every routed job's SEG and SR are in Orthanc, prints what
arrived and the seconds from the last image to results in the PACS, and stops what it
started.  Exits non-zero on failure.

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


def _quantity(value: object) -> str:
    """``{"value": 148.95, "unit": "cm2"}`` -> ``148.95 cm2``; anything else as it is."""
    if isinstance(value, dict) and "value" in value:
        v = value["value"]
        text = f"{v:.2f}" if isinstance(v, float) else str(v)
        return f"{text} {value.get('unit', '')}".strip() + (f" ({value['reason']})" if value.get("reason") else "")
    return str(value)


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

        import pydicom

        from pipelines.body_composition.anatomy_phantom import (
            COMPOSITION,
            AnatomySpec,
            Geometry,
            write_anatomy,
        )

        # 1. the real CT (upper abdomen, T11-T12: no L3 in the field of view)
        ct = with_uids(src, work / "ct", seed=f"demo-{time.time()}")
        first = pydicom.dcmread(ct[0], stop_before_pixels=True)
        # 2. an anatomical abdomen phantom with known truth that contains L3 (body composition with
        #    numbers): a real VerSe spine (T10-S1) with ribs, iliac wings, organs touching the muscles and
        #    arms, stored feet-first with mirrored rows (left must stay the patient's left)
        truth = write_anatomy(AnatomySpec(rows=256, slice_mm=5.0), work / "phantom", Geometry("FFS", mirror_rows=True),
                              patient_id="PN-DEMO-2", patient_name="Phantom^Abdomen")
        studies = {str(first.StudyInstanceUID): f"real CT, {len(ct)} slices ({first.get('SeriesDescription', '')})",
                   truth.study_uid: f"anatomical abdomen phantom with known truth, {len(truth.files)} slices"}
        sent_at: dict[str, float] = {}
        storescu(port, ct, calling="SCANNER", extra=["-xv"])  # JPEG 2000 lossless, as stored
        sent_at[str(first.StudyInstanceUID)] = time.time()
        storescu(port, truth.files, calling="SCANNER")
        sent_at[truth.study_uid] = time.time()
        for uid, what in studies.items():
            print(f"sent: {what} with storescu, study {uid}")

        db_path = work / "var" / "prognode.db"

        def settled() -> bool:
            """Every routed job finished (done or dead) and every export sent or dead."""
            if not db_path.exists():
                return False
            con = sqlite3.connect(db_path, timeout=30)
            try:
                jobs = con.execute("select state from jobs").fetchall()
                open_exports = con.execute("select count(*) from exports where state = 'pending'").fetchone()[0]
            finally:
                con.close()
            return len(jobs) >= 4 and all(j[0] in ("done", "dead") for j in jobs) and open_exports == 0

        wait_until(settled, args.timeout, interval=0.2, what="all jobs done and results exported")
        seen = time.time()
        con = sqlite3.connect(db_path, timeout=30)
        try:
            jobs = con.execute("select j.study_uid, j.pipeline, j.state, j.error, j.summary, s.last_received, "
                               "s.completed_at, j.started_at, j.finished_at, "
                               "(select max(r.in_pacs_at) from results r where r.job_id = j.id) "
                               "from jobs j join series s on s.series_uid = j.series_uid order by j.id").fetchall()
        finally:
            con.close()
        failed = False
        for uid, what in studies.items():
            print(f"\nstudy {uid}: {what}")
            series = pacs.post("/tools/find", json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": uid},
                                                           "Expand": True}))
            print("  in the PACS now:")
            for s in sorted(series, key=lambda s: int(s["MainDicomTags"].get("SeriesNumber", "0") or 0)):
                tags = s["MainDicomTags"]
                print(f"    {tags.get('Modality', ''):<4} series {tags.get('SeriesNumber', ''):>5}  "
                      f"{len(s['Instances'])} instance(s)  {tags.get('SeriesDescription', '')}")
            for (study, pipeline, state, error, summary, last, done, start, fin, in_pacs) in jobs:
                if study != uid:
                    continue
                info = json.loads(summary or "{}")
                line = f"  job {pipeline}: {state}"
                if state != "done":
                    failed = True
                    line += f" ({error.strip().splitlines()[-1] if error else ''})"
                elif not info.get("evaluable", True):
                    line += f", not evaluable: {info.get('reason', '')}"
                if in_pacs and last:
                    line += (f"; completion {done - last:.2f} s, job {fin - start:.2f} s, "
                             f"last image to results in PACS {in_pacs - last:.2f} s")
                print(line)
                if pipeline == "body-composition" and info.get("level"):
                    print(f"    level {info['level']} ({info.get('level_method', '')}, "
                          f"confidence {info.get('level_confidence')})")
                    known = uid == truth.study_uid and "L3" in truth.level_slices
                    for key, value in (info.get("areas_cm2") or {}).items():
                        beside = ""
                        if known and key in COMPOSITION:  # the phantom's truth at the middle of L3
                            beside = f"   (truth at mid-L3: {truth.area_cm2(key, truth.level_slices['L3']):.2f} cm2)"
                        print(f"    {key}: {_quantity(value)}{beside}")
                    for key, value in (info.get("derived") or {}).items():
                        print(f"    {key}: {_quantity(value)}")
                    for key, value in (info.get("sarcopenia") or {}).items():
                        verdict = value.get("sarcopenic") if isinstance(value, dict) else value
                        cut = f" (cut-off {value.get('threshold')} {value.get('unit', '')})" if isinstance(value, dict) else ""
                        print(f"    sarcopenia by {key}: {verdict}{cut}")
            print(f"  seconds from last image sent to all results in the PACS: {seen - sent_at[uid]:.2f} (wall)")
        if failed:
            return 1
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
