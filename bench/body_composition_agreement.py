"""Agreement of the weight-free erector spinae (and psoas) masks with TotalSegmentator on the shared real CT.

    .venv/bin/python bench/body_composition_agreement.py [--data ../shared/data]

The series (totalseg_example_ct_dicom) has empty UIDs: it is copied to a temp folder and
given UIDs first.  TotalSegmentator's labels (LAS NIfTI) are sampled onto the DICOM (LPS)
grid by geometry (``labels.read_labels_on_volume``).  On every slice where both masks of a
side exist, Dice is computed; the full pipeline is also run once to show its verdict.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TS_LABELS = {"erector_left": 86, "erector_right": 87, "psoas_left": 88, "psoas_right": 89}


def with_uids(src: Path, dst: Path) -> list[Path]:
    """Copy a series, giving it Study/Series/SOP Instance UIDs and a Frame of Reference UID."""
    import pydicom
    from pydicom.uid import generate_uid

    dst.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i, p in enumerate(sorted(q for q in src.iterdir() if q.is_file())):
        ds = pydicom.dcmread(p)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        if not ds.get("FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = frame
        if not ds.get("PatientID"):
            ds.PatientID = "TOTALSEG-EXAMPLE"
        q = dst / f"CT{i + 1:04d}.dcm"
        ds.save_as(q)
        out.append(q)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    a = ap.parse_args(argv)
    from pipelines.body_composition.classical import (
        ClassicalLevelFinder,
        ClassicalParams,
        anatomy_for_slice,
        named_muscles,
    )
    from pipelines.body_composition.labels import read_labels_on_volume
    from pipelines.body_composition.pipeline import run_folder
    from pipelines.body_composition.types import LevelResult
    from pipelines.common.volume import load_series

    base = a.data / "totalseg_example_ct_dicom"
    tmp = Path(tempfile.mkdtemp(prefix="bodycomp-agree-"))
    try:
        files = with_uids(base / "dicom", tmp / "ct")
        vol = load_series(files)
        ref = read_labels_on_volume(base / "example_seg_dicom.nii.gz", vol)
        verts, centre, _ = ClassicalLevelFinder().vertebrae(vol)
        lr = LevelResult(level=None, slice_index=None, vertebrae=tuple(verts), spine_centre_rc=centre)
        rows: dict[str, list[float]] = {k: [] for k in TS_LABELS}
        for k in range(vol.shape[0]):
            ours = named_muscles(vol.hu[k], vol.pixel_spacing, anatomy_for_slice(lr, k), ClassicalParams())
            for key, lab in TS_LABELS.items():
                r = ref[k] == lab
                if r.any() and ours[key].any():
                    rows[key].append(dice(ours[key], r))
        print(f"{'structure':<16}{'slices':>7}{'Dice mean':>11}{'min':>7}{'max':>7}   (TotalSegmentator vs itself: 0.92-0.99)")
        for key, ds in rows.items():
            if ds:
                print(f"{key:<16}{len(ds):>7}{np.mean(ds):>11.3f}{np.min(ds):>7.3f}{np.max(ds):>7.3f}")
            else:
                print(f"{key:<16}{0:>7}  (no slice where both exist)")
        out = run_folder(tmp / "ct", tmp / "out", {})
        print("pipeline:", json.dumps({"evaluable": out.evaluable, "reason": out.reason}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
