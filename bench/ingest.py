"""Ingest throughput: prognode vs dcmtk storescp (default, and with TCP_NODELAY), same run.

A 300-slice 512x512 CT is built from real data (the shared TotalSegmentator CT, decoded,
its 20 slices repeated along z with proper UIDs and positions, explicit VR little
endian), once per repeat with new UIDs, then sent with dcmtk's storescu to each receiver
in turn, ``--repeats`` times, interleaved: in repeat k every receiver gets copy k, so no
receiver is timed on instances it already holds (a re-sent instance replaces a file, which
costs more).  prognode runs as ``python -m node serve`` with fsync on (its default) and no
routes; storescp writes files with ``-od`` and never fsyncs.  Every send starts after ``sync``, so
no receiver pays for writing back another's files.  Prints seconds (median and
best), MB/s (median) and ratios (medians), and the re-send of a copy prognode already holds.

    .venv/bin/python bench/ingest.py [--slices 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import serve_config, start_serve  # noqa: E402
from tests.peers import DATA, free_port, stop_pid, wait_port  # noqa: E402


def build_ct(out: Path, slices: int) -> list[Path]:
    """A ``slices``-slice CT from the shared TotalSegmentator series (decoded, re-identified)."""
    import numpy as np
    import pydicom
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    src = sorted((DATA / "totalseg_example_ct_dicom" / "dicom").iterdir())
    sources = [pydicom.dcmread(p) for p in src]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    arrays = [d.pixel_array.astype(np.int16 if d.PixelRepresentation else np.uint16) for d in sources]
    study, series = generate_uid(), generate_uid()
    z0 = float(sources[0].ImagePositionPatient[2])
    spacing = 2.0
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(slices):
        k = i % len(sources)
        ds = sources[k].copy()
        ds.file_meta = sources[k].file_meta.copy()
        ds.PixelData = arrays[k].tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.PatientName, ds.StudyID, ds.SeriesNumber = "BENCH-1", "Bench^Ingest", "1", 1
        ds.InstanceNumber = i + 1
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z0 + i * spacing]
        ds.SliceLocation = z0 + i * spacing
        p = out / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def send(port: int, folder: Path, called: str) -> float:
    os.sync()  # start from a quiet disk: no receiver pays for writing back another's files
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aet", "BENCH", "-aec", called, "+sd", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0


def start_prognode(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    return start_serve(work, serve_config(port), port), port


def start_storescp(work: Path, nodelay: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out = work / ("scp-nodelay" if nodelay else "scp-default")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"  # dcmtk: disable Nagle at runtime
    proc = subprocess.Popen(["storescp", "-od", str(out), str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, 20)
    return proc, port


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prognode-bench-ingest-"))
    try:
        copies = [work / f"ct{k}" for k in range(args.repeats)]
        files = build_ct(copies[0], args.slices)
        for folder in copies[1:]:
            build_ct(folder, args.slices)
        mb = sum(f.stat().st_size for f in files) / 1e6
        receivers = {}
        receivers["prognode (fsync)"] = start_prognode(work)
        receivers["storescp default"] = start_storescp(work, nodelay=False)
        receivers["storescp TCP_NODELAY=1"] = start_storescp(work, nodelay=True)
        called = {"prognode (fsync)": "PROGNODE", "storescp default": "ANY-SCP", "storescp TCP_NODELAY=1": "ANY-SCP"}
        times: dict[str, list[float]] = {k: [] for k in receivers}
        resend: list[float] = []
        try:
            for folder in copies:
                for name, (_proc, port) in receivers.items():
                    times[name].append(send(port, folder, called[name]))
                # storescp's output is not the point; keep the disk from filling
                for d in ("scp-default", "scp-nodelay"):
                    shutil.rmtree(work / d, ignore_errors=True)
                    (work / d).mkdir()
            resend.append(send(receivers["prognode (fsync)"][1], copies[0], "PROGNODE"))
        finally:
            for proc, _ in receivers.values():
                stop_pid(proc)
        ref = statistics.median(times["storescp TCP_NODELAY=1"])
        print(f"\ningest: {len(files)} slices 512x512, {mb:.1f} MB, explicit VR LE, storescu -> receiver on "
              f"127.0.0.1, median of {args.repeats}, {os.cpu_count()} CPUs")
        print("| receiver | seconds (median) | best | MB/s | vs storescp TCP_NODELAY | all runs (s) |")
        print("|---|---:|---:|---:|---:|---|")
        rows = {**times, "prognode, re-sent copy (replaces files)": resend}
        for name, ts in rows.items():
            t = statistics.median(ts)
            print(f"| {name} | {t:.2f} | {min(ts):.2f} | {mb / t:.1f} | {ref / t:.2f}x | "
                  f"{', '.join(f'{x:.2f}' for x in ts)} |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
