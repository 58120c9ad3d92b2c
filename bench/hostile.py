"""Hostile and busy peers against ``prognode serve`` (a separate process), with Orthanc where it applies.

Probes (tests/probes.py builds them):

- stall: 20 connections send half an A-ASSOCIATE-RQ and stall; then a normal C-ECHO (dcmtk echoscu),
  how many stalled sockets the receiver closed (and when), and a C-ECHO after they are gone;
- big PDU: a PDU header claiming 4 GiB, before association (A-ASSOCIATE-RQ) and after (P-DATA-TF);
- deflate bomb: a Deflated Explicit VR CT data set of about 1.5 MB inflating to 1.5 GiB;
- malformed: each case of tests.probes.malformed_cases (and the valid unusual ones);
- matrix: tests.probes.malformed_matrix (~580 generated malformed data sets) and valid_matrix, counted;
- concurrency: 16 storescu associations at once, 50 CT instances of 128x128 each.

Peak RSS is the node process's VmHWM.  ``--node-extra`` adds TOML lines to the node's [node] table
(the probe timeouts: by default ``association_timeout = 2``; pass '' for a node that lacks the key).

    .venv/bin/python bench/hostile.py [--only stall,pdu,bomb,malformed,concurrency] [--no-orthanc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import serve_config, start_serve  # noqa: E402
from tests.peers import free_port, orthanc, stop_pid  # noqa: E402
from tests.probes import (  # noqa: E402
    big_pdu_probe,
    closed_within,
    deflate_bomb,
    malformed_cases,
    raw_c_store,
    stalled_connections,
    valid_unusual_cases,
    vm_hwm,
)

GiB = 1024 ** 3


def echo(port: int, called: str, timeout: int = 10) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        rc = subprocess.run(["echoscu", "-to", str(timeout), "-ta", str(timeout), "-td", str(timeout), "-aec", called,
                             "127.0.0.1", str(port)], capture_output=True, timeout=timeout * 3).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - t0


def probe_stall(port: int, called: str, n: int = 20, wait: float = 8.0) -> dict[str, Any]:
    stalled = stalled_connections(port, n)
    try:
        rc1, t1 = echo(port, called)
        closed, last = closed_within(stalled, wait)
    finally:
        for s in stalled:
            s.close()
    time.sleep(1.0)
    rc2, t2 = echo(port, called)
    return {"echo during": f"{'ok' if rc1 == 0 else 'FAILED'} ({t1:.2f} s)",
            "stalled closed by receiver": f"{closed}/{n}" + (f" (last after {last:.1f} s)" if closed else "")
            + f" within {wait:.0f} s",
            "echo 1 s after closing them": f"{'ok' if rc2 == 0 else 'FAILED'} ({t2:.2f} s)"}


def probe_pdu(port: int, called: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for established in (False, True):
        try:
            what, took = big_pdu_probe(port, established, wait=8.0)
        except ConnectionError as e:
            what, took = str(e), 0.0
        out["4 GiB " + ("P-DATA-TF after association" if established else "A-ASSOCIATE-RQ")] = f"{what} ({took:.2f} s)"
    rc, t = echo(port, called)
    out["echo after"] = f"{'ok' if rc == 0 else 'FAILED'} ({t:.2f} s)"
    return out


def send(port: int, case: Any) -> tuple[int, str]:
    return raw_c_store(port, case.sop_class, case.sop_instance, case.syntax, case.payload)


def probe_bomb(port: int, pid: int, work: Path, called: str) -> dict[str, Any]:
    path = work / "bomb.deflated"
    t0 = time.monotonic()
    sop_class, sop = deflate_bomb(path, int(1.5 * GiB))
    built = time.monotonic() - t0
    before = vm_hwm(pid)
    t0 = time.monotonic()
    status, comment = raw_c_store(port, sop_class, sop, "1.2.840.10008.1.2.1.99", path.read_bytes(), fragment=200_000)
    took = time.monotonic() - t0
    rc, t = echo(port, called)
    return {"wire size": f"{path.stat().st_size / 1e6:.1f} MB (built in {built:.1f} s)",
            "status": f"0x{status:04X} {comment!r} ({took:.1f} s)" if status >= 0 else f"{status} {comment}",
            "node peak RSS before / after": f"{before / 2**20:.0f} MiB / {vm_hwm(pid) / 2**20:.0f} MiB",
            "echo after": f"{'ok' if rc == 0 else 'FAILED'} ({t:.2f} s)"}


def probe_malformed(port: int, called: str, audit: Path) -> list[tuple[str, str, str]]:
    rows = []
    for case in malformed_cases() + valid_unusual_cases():
        stored_before = _stored(audit)
        status, comment = send(port, case)
        stored = _stored(audit) > stored_before
        want = "refuse" if case.refuse else "store"
        ok = (status in case.refuse and not stored) if case.refuse else (status == 0 and stored)
        got = f"0x{status:04X}" if status >= 0 else str(status)
        rows.append((case.name, want, f"{got} {'stored' if stored else 'not stored'} {comment[:50]!r}"
                     + ("" if ok else "  <-- WRONG")))
    rc, t = echo(port, called)
    rows.append(("echo after", "ok", f"{'ok' if rc == 0 else 'FAILED'} ({t:.2f} s)"))
    return rows


def probe_matrix(port: int, called: str, audit: Path) -> dict[str, Any]:
    from tests.probes import malformed_matrix, valid_matrix

    malformed, valid = malformed_matrix(), valid_matrix()
    refused = stored = no_answer = 0
    for case in malformed:
        before = _stored(audit)
        status, _ = raw_c_store(port, case.sop_class, case.sop_instance, case.syntax, case.payload)
        refused += status in case.refuse
        stored += _stored(audit) > before
        no_answer += status < 0
    ok = sum(raw_c_store(port, c.sop_class, c.sop_instance, c.syntax, c.payload)[0] == 0 for c in valid)
    rc, t = echo(port, called)
    return {"malformed refused with a named status": f"{refused}/{len(malformed)}",
            "malformed stored": f"{stored}/{len(malformed)}", "malformed without an answer": no_answer,
            "unusual valid stored": f"{ok}/{len(valid)}", "echo after": f"{'ok' if rc == 0 else 'FAILED'} ({t:.2f} s)"}


def _stored(audit: Path) -> int:
    if not audit.exists():
        return 0
    return sum(1 for line in audit.read_text().splitlines() if '"instance_stored"' in line)


def build_senders(work: Path, senders: int, per: int) -> list[Path]:
    import datetime as dt

    from tests.synthetic_ct import write_study

    folders = []
    for i in range(senders):
        d = work / f"sender{i}"
        write_study(d, i, dt.date(2026, 1, 1), slices=per, size=128, seed=f"conc{time.time_ns()}")
        folders.append(d)
    return folders


def probe_concurrency(port: int, called: str, folders: list[Path], count: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-aet", f"SENDER{i}", "-aec", called, "-to", "60", "-ta", "60", "-td", "60",
                               "+sd", "127.0.0.1", str(port), str(d)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i, d in enumerate(folders)]
    codes = [p.wait(600) for p in procs]
    wall = time.monotonic() - t0
    stored = count()
    total = sum(len(list(d.iterdir())) for d in folders)
    return {"stored": f"{stored}/{total}", "senders ok": f"{codes.count(0)}/{len(codes)}", "seconds": f"{wall:.1f}",
            "instances/s": f"{stored / wall:.0f}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="stall,pdu,bomb,malformed,matrix,concurrency")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--node-extra", default="association_timeout = 2")
    ap.add_argument("--senders", type=int, default=16)
    ap.add_argument("--per-sender", type=int, default=50)
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="prognode-bench-hostile-"))
    results: dict[str, Any] = {}
    try:
        extra = args.node_extra.replace("\\n", "\n")
        folders: list[Path] = []
        for probe in ("stall", "pdu", "malformed", "matrix", "bomb", "concurrency"):
            if probe not in only:
                continue
            # a fresh node per probe, so that one probe's damage does not show up in the next
            port = free_port()
            node_dir = work / probe
            node_dir.mkdir()
            text = serve_config(port).replace("[node]\n", f"[node]\n{extra}\n", 1)
            text += 'audit_file = "var/audit.jsonl"\n'
            proc = start_serve(node_dir, text, port)
            audit = node_dir / "var" / "audit.jsonl"
            name = {"stall": "stall", "pdu": "big PDU", "malformed": "malformed", "matrix": "malformed matrix",
                    "bomb": "deflate bomb",
                    "concurrency": f"concurrency {args.senders} x {args.per_sender}"}[probe]
            try:
                if probe == "stall":
                    value: Any = probe_stall(port, "PROGNODE")
                elif probe == "pdu":
                    value = probe_pdu(port, "PROGNODE")
                elif probe == "malformed":
                    value = probe_malformed(port, "PROGNODE", audit)
                elif probe == "matrix":
                    value = probe_matrix(port, "PROGNODE", audit)
                elif probe == "bomb":
                    value = probe_bomb(port, proc.pid, work, "PROGNODE")
                else:
                    folders = build_senders(work / "conc", args.senders, args.per_sender)
                    value = probe_concurrency(port, "PROGNODE", folders, lambda a=audit: _stored(a))
            except Exception as e:  # noqa: BLE001 - a probe that breaks is a result too
                value = {"probe failed": f"{type(e).__name__}: {e}"}
            if isinstance(value, dict):
                value["node peak RSS (VmHWM)"] = f"{vm_hwm(proc.pid) / 2**20:.0f} MiB"
                value["node process alive"] = proc.poll() is None
            results[f"{name}: prognode"] = value
            stop_pid(proc)
        if not args.no_orthanc and shutil.which("Orthanc") and ({"stall", "concurrency"} & only):
            with orthanc(work / "orthanc", extra_config={"DicomThreadsCount": 16}) as pacs:
                if "stall" in only:
                    results["stall: Orthanc (16 DICOM threads)"] = probe_stall(pacs.dicom_port, pacs.aet)
                if "concurrency" in only and folders:
                    def count() -> int:
                        with urllib.request.urlopen(pacs.url + "/statistics", timeout=30) as r:
                            return int(json.loads(r.read())["CountInstances"])
                    results[f"concurrency {args.senders} x {args.per_sender}: Orthanc"] = probe_concurrency(
                        pacs.dicom_port, pacs.aet, folders, count)
        print(f"\nhostile peers, {os.cpu_count()} CPUs, load {Path('/proc/loadavg').read_text().split()[:3]}")
        for name, value in results.items():
            print(f"\n### {name}")
            if isinstance(value, dict):
                print("| probe | result |\n|---|---|")
                for k, v in value.items():
                    print(f"| {k} | {v} |")
            elif isinstance(value, list):
                print("| case | expected | got |\n|---|---|---|")
                for row in value:
                    print("| " + " | ".join(row) + " |")
            else:
                print(value)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
