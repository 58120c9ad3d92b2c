"""Export benchmark: the same study sent to Orthanc by C-STORE and by STOW-RS, in the same run.

Each send is the node's own export path: export rows queued for the study's instances, then
``node.export.Exporter.tick`` until all are sent (read each file, the destination's sender, the
per-instance database update and audit record).  Senders:

* ``dimse``: C-STORE on one association per batch of 64 (``node.export.BATCH``);
* ``dicomweb``: STOW-RS to Orthanc's DICOMweb plug-in, one multipart request per batch (up to the
  destination's ``max_request_bytes``, 64 MiB by default);
* ``dicomweb 1 MiB``: STOW-RS with ``max_request_bytes = 1 MiB`` (about two uncompressed 512x512 slices per
  request): what many small requests cost;
* for reference, not the node: dcmtk ``storescu`` sending the same files to the same Orthanc (one
  association), which tells Orthanc's own per-instance C-STORE cost from the node's.

Studies: the shared real CT (20 slices of 512x512, lossless JPEG 2000) and a generated one (``--slices``
uncompressed slices of ``--size``).  The methods take turns in each repeat and the study is deleted from
Orthanc between sends, so every send stores the whole study.  Prints a table of seconds per study
(median, min, max over ``--repeats``) and MB/s of DICOM files sent.

    PYTHONPATH=. .venv/bin/python bench/dicomweb_export.py [--repeats 5] [--slices 120] [--size 512]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from node.audit import AuditLog  # noqa: E402
from node.config import Config, DestinationConfig, DicomwebDestinationConfig, NodeConfig  # noqa: E402
from node.db import Database, Export, ExportState, Job, JobState  # noqa: E402
from node.export import Exporter  # noqa: E402
from tests.peers import DATA, Orthanc, orthanc, storescu, with_uids  # noqa: E402
from tests.synthetic_ct import write_study  # noqa: E402


def destinations(pacs: Orthanc) -> dict[str, DestinationConfig | DicomwebDestinationConfig]:
    return {
        "C-STORE (dimse)": DestinationConfig(name="dimse", ae_title=pacs.aet, host="127.0.0.1",
                                             port=pacs.dicom_port),
        "STOW-RS (dicomweb)": DicomwebDestinationConfig(name="dicomweb", kind="dicomweb",
                                                        url=f"{pacs.url}/dicom-web"),
        "STOW-RS, 1 MiB requests": DicomwebDestinationConfig(name="dicomweb-small", kind="dicomweb",
                                                             url=f"{pacs.url}/dicom-web", max_request_bytes=1 << 20),
    }


def delete_study(pacs: Orthanc, study_uid: str) -> None:
    req = urllib.request.Request(f"{pacs.url}/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        found = json.loads(r.read())
    for item in found:
        if item.get("Type") == "Study":
            urllib.request.urlopen(urllib.request.Request(f"{pacs.url}/studies/{item['ID']}", method="DELETE"),
                                   timeout=60).read()


def send_once(exporter: Exporter, db: Database, dest: str, files: list[Path], uids: list[str]) -> float:
    with db.session() as s:
        job = Job(series_uid="bench", study_uid="bench", route="bench", pipeline="bench", inputs={},
                  input_key=f"bench-{time.monotonic_ns()}", state=JobState.DONE.value)
        s.add(job)
        s.flush()
        for f, uid in zip(files, uids, strict=True):
            s.add(Export(job_id=job.id, destination=dest, path=str(f), sop_instance_uid=uid))
        job_id = job.id
    t = time.perf_counter()
    d = exporter.config.destination(dest)
    while exporter.due(1e18, dest, 1):
        exporter.tick_destination(d)
    wall = time.perf_counter() - t
    with db.read() as s:
        states = [r.state for r in s.query(Export).filter(Export.job_id == job_id)]
    if any(st != ExportState.SENT for st in states):
        raise SystemExit(f"{dest}: not every instance was sent: {states}")
    return wall


def bench_study(label: str, files: list[Path], pacs: Orthanc, work: Path, repeats: int) -> list[str]:
    dests = destinations(pacs)
    config = Config(node=NodeConfig(storage=work / "var"), destinations=tuple(dests.values()), base_dir=work)
    db = Database(f"sqlite:///{work / f'{label}.db'}")
    exporter = Exporter(db, config, AuditLog(None))
    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    uids = [str(h.SOPInstanceUID) for h in heads]
    study_uid = str(heads[0].StudyInstanceUID)
    mb = sum(f.stat().st_size for f in files) / 1e6
    reference = "dcmtk storescu (reference)"
    times: dict[str, list[float]] = {k: [] for k in [*dests, reference]}
    for _ in range(repeats):
        for name in times:
            delete_study(pacs, study_uid)
            if name == reference:
                t = time.perf_counter()
                storescu(pacs.dicom_port, files, called=pacs.aet, extra=["-xv"])
                times[name].append(time.perf_counter() - t)
            else:
                times[name].append(send_once(exporter, db, dests[name].name, files, uids))
            if len(pacs.instances_of_study(study_uid)) != len(files):
                raise SystemExit(f"{name}: Orthanc does not hold all {len(files)} instances")
    delete_study(pacs, study_uid)
    db.dispose()
    lines = []
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {label} | {len(files)} | {mb:.1f} | {name} | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | "
                     f"{mb / med:.1f} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slices", type=int, default=120, help="slices of the generated study")
    ap.add_argument("--size", type=int, default=512, help="rows and columns of the generated study")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="prognode-bench-dicomweb-") as tmp:
        work = Path(tmp)
        studies: list[tuple[str, list[Path]]] = []
        real = DATA / "totalseg_example_ct_dicom" / "dicom"
        if real.is_dir():
            studies.append(("real CT (J2K)", with_uids(real, work / "real", seed="bench-dicomweb")))
        gen = write_study(work / "gen", 1, dt.date(2026, 1, 5), slices=args.slices, size=args.size,
                          seed="bench-dicomweb")
        studies.append((f"generated {args.size}x{args.size}", list(gen.files)))
        rows = []
        with orthanc(work / "orthanc") as pacs:
            for label, files in studies:
                rows += bench_study(label, files, pacs, work, args.repeats)
    print(f"Export of one study to a loopback Orthanc (DICOMweb plug-in), {args.repeats} sends per method, "
          "methods in turn; seconds per study")
    print("| study | instances | MB | method | median s | min s | max s | MB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for line in rows:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
