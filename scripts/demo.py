"""`make demo`: a real CT through prognode into a loopback Orthanc, end to end.

Starts a private Orthanc (the PACS) on free loopback ports, starts the node
(``python -m node serve --config FILE`` with ports, storage and destination overridden by
``--set``), sends a real CT series from ../shared/data with dcmtk's storescu (the shared
TotalSegmentator CT, given proper UIDs in a temporary copy) and a generated abdomen phantom
that contains L3, waits until every routed job's SEG and SR are in Orthanc, prints what
arrived and the seconds from the last image to results in the PACS, and stops what it
started.  Exits non-zero on failure.

The destination asks for Secondary Capture key images too (``formats = ["seg", "sr", "sc"]``), and
the "scanner" sends each CT to the PACS as well, so the viewer shows the results over the CT.
Then it writes OHIF screenshots (the shared ohif-check for every SEG and SR, and the SC key images
opened in OHIF over the demo's Orthanc) and prints their paths.  With ``--view`` (``make demo
VIEW=1``) it keeps Orthanc, the node (with its dashboard) and OHIF running and prints the viewer and
dashboard URLs until Ctrl-C, then stops what it started, by PID.

    .venv/bin/python scripts/demo.py --config config.toml [--view] [--shots DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import ohif_view  # noqa: E402
from tests.peers import DATA, Orthanc, free_port, stop_pid, storescu, wait_port, wait_until, with_uids  # noqa: E402

OHIF_CHECK_RUN = ohif_view.OHIF_CHECK / "run.sh"


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
    ap.add_argument("--view", action="store_true",
                    help="keep Orthanc, the node and OHIF running and print their URLs until Ctrl-C")
    ap.add_argument("--shots", type=Path, default=None,
                    help="folder for the OHIF screenshots (default: a new temporary folder, kept)")
    ap.add_argument("--no-screenshots", action="store_true", help="skip the OHIF screenshots")
    args = ap.parse_args()
    src = DATA / "totalseg_example_ct_dicom" / "dicom"
    if not src.is_dir():
        print(f"demo: shared data not found at {src}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="prognode-demo-"))
    pacs = Orthanc(work / "orthanc")
    node: subprocess.Popen[bytes] | None = None
    viewer = None
    try:
        pacs.start()
        print(f"PACS: Orthanc {pacs.aet} on 127.0.0.1:{pacs.dicom_port} (REST {pacs.url})")
        why_no_viewer = ohif_view.available()
        if not why_no_viewer:
            viewer = ohif_view.start_viewer(pacs.url)
            print(f"viewer: OHIF {ohif_view.OHIF_VERSION} on {viewer.url} (DICOMweb of the PACS)")
        else:
            print(f"viewer: none ({why_no_viewer}); no OHIF screenshots")
        port = free_port()
        web_port = free_port()
        token = "demo-" + secrets.token_urlsafe(18)
        dest = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                 "retry_seconds": 2, "max_attempts": 10, "formats": ["seg", "sr", "sc"]}]
        sets = [f"node.port={port}", f"node.storage={work / 'var'}", "node.min_free_bytes=0",
                f"destinations={json.dumps(dest)}", f"logging.audit_file={work / 'var' / 'audit.jsonl'}",
                "web.enabled=true", "web.host=127.0.0.1", f"web.port={web_port}", f"web.read_token={token}"]
        if viewer is not None:
            sets.append(f"web.viewer_url={ohif_view.study_url(viewer.url, '{study_uid}')}")
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
        # the scanner sends to the PACS too: the viewer shows the results over their CT
        storescu(pacs.dicom_port, ct, called=pacs.aet, calling="SCANNER", extra=["-xv"])
        storescu(pacs.dicom_port, truth.files, called=pacs.aet, calling="SCANNER")
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
        if viewer is not None and not args.no_screenshots:
            shots = args.shots or Path(tempfile.mkdtemp(prefix="prognode-demo-shots-"))
            _screenshots(pacs, viewer.url, db_path, {str(first.StudyInstanceUID): work / "ct",
                                                     truth.study_uid: work / "phantom"}, shots)
        if args.view:
            _view(pacs, viewer, f"http://127.0.0.1:{web_port}/", token, studies)
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
        if viewer is not None:
            viewer.stop()
        pacs.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _screenshots(pacs: Orthanc, viewer_url: str, db_path: Path, ct_folders: dict[str, Path], shots: Path) -> None:
    """OHIF screenshots of the results: each SC key-image series opened in OHIF over the demo's PACS,
    then the shared ohif-check on every SEG and SR (with its CT); prints every path."""
    shots.mkdir(parents=True, exist_ok=True)
    print(f"\nOHIF screenshots in {shots}:")
    for study_uid in ct_folders:
        series = pacs.post("/tools/find", json.dumps({"Level": "Series", "Query": {"StudyInstanceUID": study_uid,
                                                                                  "Modality": "OT"}, "Expand": True}))
        for s in series:
            uid = s["MainDicomTags"]["SeriesInstanceUID"]
            out = shots / f"SC-{study_uid[-8:]}-{uid[-8:]}.png"
            try:
                ohif_view.series_screenshot(viewer_url, study_uid, uid, out)
                print(f"  SC key images ({s['MainDicomTags'].get('SeriesDescription', '')}): {out}")
            except Exception as e:  # a look, not a check: say why and go on
                print(f"  SC key images of study {study_uid}: no screenshot ({type(e).__name__}: {e})")
    con = sqlite3.connect(db_path, timeout=30)
    try:
        paths = [Path(p) for (p,) in con.execute(
            "select distinct e.path from exports e join results r on r.sop_instance_uid = e.sop_instance_uid "
            "where r.modality in ('SEG', 'SR')")]
    finally:
        con.close()
    if not OHIF_CHECK_RUN.exists() or not paths:
        return
    out = shots / "ohif-check"
    r = subprocess.run(["bash", str(OHIF_CHECK_RUN), "--out", str(out), *map(str, ct_folders.values()),
                        *map(str, paths)], capture_output=True, text=True, timeout=1800)
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            state = "displayed" if rec.get("displayed") else f"not displayed ({'; '.join(rec.get('reasons', []))})"
            print(f"  {rec.get('modality')} {rec.get('description', '')}: {state}: {rec.get('screenshot', '')}")
        elif line.startswith("ohif-check:"):
            print(f"  {line}")
    if r.returncode == 2:
        print(f"  ohif-check could not run: {r.stderr.strip().splitlines()[-1:] or ''}")


def _view(pacs: Orthanc, viewer: Any, dashboard: str, token: str, studies: dict[str, str]) -> None:
    """Keep everything running, print where to look, until Ctrl-C (the caller then stops what it started)."""
    print("\n--view: everything keeps running until Ctrl-C")
    if viewer is not None:
        url = str(viewer.url)
        print(f"  viewer (OHIF):  {url}/")
        for uid, what in studies.items():
            print(f"    {what}: {ohif_view.study_url(url, uid)}")
    print(f"  dashboard:      {dashboard}  (sign in with the read token {token})")
    print(f"  PACS (Orthanc): {pacs.url}/app/explorer.html")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping what the demo started")


if __name__ == "__main__":
    raise SystemExit(main())
