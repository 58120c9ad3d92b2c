"""Time ``tissue-hu`` per stage on a 300-slice 512x512 CT built from the shared real CT.

    .venv/bin/python bench/tissue_hu.py [--slices 300] [--keep DIR]

The 20 real slices of ../shared/data/totalseg_example_ct_dicom are repeated along z with
fresh UIDs and positions 2 mm apart and written uncompressed (explicit VR little endian),
as a PACS usually sends them.  Prints a table of stage times (wall clock, this CPU) and the
peak RSS.  A table, not a timed test.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_series(out: Path, slices: int) -> list[Path]:
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from tests.peers import DATA

    src_dir = DATA / "totalseg_example_ct_dicom" / "dicom"
    if not src_dir.is_dir():
        raise SystemExit(f"shared data not found at {src_dir}")
    src = sorted((pydicom.dcmread(f) for f in src_dir.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    study, series = generate_uid(), generate_uid()
    z0 = [float(v) for v in src[0].ImagePositionPatient]
    files = []
    for k in range(slices):
        ds = src[k % len(src)].copy()
        ds.PixelData = ds.pixel_array.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName = "BENCH-300", "Bench^TissueHU"
        ds.ImagePositionPatient = [z0[0], z0[1], z0[2] + 2.0 * k]
        ds.InstanceNumber = k + 1
        path = out / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--keep", type=Path, help="write the series and the outputs here and keep them")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-tissue-hu-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ct = work / "ct"
        if ct.is_dir() and len(list(ct.iterdir())) == args.slices:
            files = sorted(ct.iterdir())
        else:
            shutil.rmtree(ct, ignore_errors=True)
            ct.mkdir()
            files = make_series(ct, args.slices)
        import os

        load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
        t0 = time.perf_counter()
        from dicom_templates.common import Algorithm  # noqa: F401 - import cost counted below
        from pipelines.base import Identity
        from pipelines.common.volume import SeriesToVolume
        from pipelines.tissue_hu import TissueOutputs, create

        rows: list[tuple[str, float, float]] = [("imports", time.perf_counter() - t0, time.process_time())]
        pipeline = create({})
        identity = Identity("prognode", "bench", "bench-serial")

        def timed(name: str, fn):  # type: ignore[no-untyped-def]
            t, c = time.perf_counter(), time.process_time()
            result = fn()
            rows.append((name, time.perf_counter() - t, time.process_time() - c))
            return result

        volume = timed("series-to-volume (read + decode)", lambda: SeriesToVolume().run(files))
        body = timed("body-mask", lambda: pipeline.body_mask.run(volume).body)
        masks = timed("tissue-masks", lambda: pipeline.tissue_masks.run(volume, body).masks)
        stats = timed("measurements", lambda: pipeline.measurements.run(volume, masks))
        outputs = TissueOutputs(pipeline.options, identity)
        timed("SEG + SR (build + write)", lambda: outputs.run(volume, masks, stats, work / "out"))
        total = sum(t for _, t, _ in rows)
        cpu = sum(c for _, _, c in rows)
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"tissue-hu on {volume.shape[0]} slices of {volume.shape[1]}x{volume.shape[2]}\n")
        load = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
        print(f"load average before: {load0}, after: {load} ({__import__('os').cpu_count()} CPUs)\n")
        print("| stage | wall s | CPU s |\n|---|---|---|")
        for name, t, c in rows:
            print(f"| {name} | {t:.2f} | {c:.2f} |")
        print(f"| **total** | **{total:.2f}** | **{cpu:.2f}** |\n\npeak RSS {rss_mb:.0f} MiB")
        for key, s in stats.items():
            print(f"{key}: {s.volume_ml:.1f} mL, mean {s.mean_hu:.1f} HU")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
