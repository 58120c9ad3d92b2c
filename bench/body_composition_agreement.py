"""Agreement of the weight-free tissues with TotalSegmentator on the shared real CT (T11-T12, contrast).

    .venv/bin/python bench/body_composition_agreement.py [--data ../shared/data] [--every 1] [--noise SD]
                                                         [--per-slice]

The series (totalseg_example_ct_dicom) has empty UIDs: it is copied to a temp folder and
given UIDs first.  TotalSegmentator's labels (LAS NIfTI) are sampled onto the canonical grid
by geometry (``labels.read_labels_on_volume``).  Printed, per slice and summarised:

* erector spinae (the paraspinal compartment) against TotalSegmentator's autochthon_left /
  _right: Dice and area error, every slice where the reference exists (a missed slice scores 0),
  per slice with ``--per-slice``;
* left against right: each side's area over the other's and the Dice of the left mask with the right one
  mirrored about the vertebral body's centre column, for TotalSegmentator and for ours, next to the
  muscle-window tissue behind the spine (more than 20 mm behind the body's posterior edge, within 60 mm of
  the midline), left over right.  Where that tissue is symmetric and the reference is not, a segmentation
  that follows the anatomy cannot match the reference on both sides (the real CT: its muscle behind the
  spine is 1.0-1.1 left over right, TotalSegmentator's autochthon 0.75);
* organs inside "skeletal muscle": the area of liver, spleen, stomach (and kidneys, colon,
  aorta, IVC where labelled) that the muscle mask holds, before (the old segmenter,
  ``classical.ClassicalSliceSegmenter``, where it still exists) and after (``tissues``);
  "unenhanced": the same slices with liver, spleen, pancreas and the great vessels shifted to
  unenhanced attenuation (55, 45, 40 HU medians), where HU cannot separate them from muscle;
* the arms: muscle and SAT inside the arm region, before and after.  The arm region is
  the body within 60 mm of TotalSegmentator's humerus that is nearer to the humerus than to
  any rib of that side (TotalSegmentator has no arm soft-tissue label).

The reference is a model's output, not manual truth: read Dice against TotalSegmentator's
own run-to-run agreement of 0.92-0.99.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

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


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def mirrored(mask: NDArray[np.bool_], centre_col: float) -> NDArray[np.bool_]:
    """``mask`` mirrored left to right about the column ``centre_col`` (canonical columns: the patient's left)."""
    out = np.zeros_like(mask)
    cols = np.arange(mask.shape[1])
    src = np.round(2.0 * centre_col - cols).astype(int)
    ok = (src >= 0) & (src < mask.shape[1])
    out[:, ok] = mask[:, src[ok]]
    return out


def sides_table(rows: list[tuple[int, float, float, float, float, float, float, float, float, float]],
                per_slice: bool) -> None:
    """Left against right, for the reference and for ours (see the module docstring); per slice too."""
    print("left against right (TotalSegmentator = TS): area left/right, Dice of left vs right mirrored")
    head = (f"{'slice':>6}{'Dice L':>8}{'Dice R':>8}{'ours L/R':>10}{'TS L/R':>8}{'tissue L/R':>12}"
            f"{'mirror ours':>13}{'mirror TS':>11}")
    print(head)
    if per_slice:
        for k, dl, dr, ol, orr, tl, tr, tissue, mo, mt in rows:
            print(f"{k:>6}{dl:>8.3f}{dr:>8.3f}{ol / orr:>10.2f}{tl / tr:>8.2f}{tissue:>12.2f}{mo:>13.3f}{mt:>11.3f}")
    v = np.asarray([r[1:] for r in rows], dtype=np.float64)
    print(f"{'mean':>6}{v[:, 0].mean():>8.3f}{v[:, 1].mean():>8.3f}{(v[:, 2] / v[:, 3]).mean():>10.2f}"
          f"{(v[:, 4] / v[:, 5]).mean():>8.2f}{v[:, 6].mean():>12.2f}{v[:, 7].mean():>13.3f}{v[:, 8].mean():>11.3f}")


ORGANS = {"liver": 5, "spleen": 1, "stomach": 6, "kidney_right": 2, "kidney_left": 3, "colon": 20,
          "aorta": 52, "inferior_vena_cava": 63}
RIBS = range(92, 116)
# the series as if unenhanced: organ and vessel attenuation shifted to muscle-like values (HU)
UNENHANCED = {5: 55.0, 1: 45.0, 52: 40.0, 63: 40.0, 64: 40.0, 7: 40.0}


def unenhanced(hu: NDArray[np.float32], ref: NDArray[np.uint8]) -> NDArray[np.float32]:
    out = hu.copy()
    for lab, target in UNENHANCED.items():
        m = ref == lab
        if m.any():
            out[m] = hu[m] - float(np.median(hu[m])) + target
    return out
HUMERUS = (69, 70)


def arm_region(ref: NDArray[np.uint8], body: NDArray[np.bool_], spacing: tuple[float, float],
               centre_col: float) -> NDArray[np.bool_]:
    """The arms on one slice, from TotalSegmentator's humerus and ribs (see the module docstring)."""
    from scipy import ndimage as ndi

    out = np.zeros(body.shape, bool)
    cols = np.arange(body.shape[1])[None, :]
    ribs = np.isin(ref, list(RIBS))
    for side in (1, -1):
        half = (cols - centre_col) * side > 0
        hum = np.isin(ref, HUMERUS) & half
        if not hum.any():
            continue
        d_hum = ndi.distance_transform_edt(~hum, sampling=spacing)
        d_rib = ndi.distance_transform_edt(~(ribs & half), sampling=spacing) if (ribs & half).any() else np.inf
        near = d_hum <= 60.0
        lateral = d_hum < d_rib
        out |= body & near & lateral & half
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--every", type=int, default=1, help="use every n-th slice")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="add white noise of this SD (HU) first, as low-dose CT (seeded: the same every run)")
    ap.add_argument("--per-slice", action="store_true", help="print the erector's Dice and left/right per slice")
    a = ap.parse_args(argv)
    from pipelines.body_composition.labels import read_labels_on_volume
    from pipelines.body_composition.levels import SpineLevelFinder, anatomy_for_slice
    from pipelines.body_composition.pipeline import run_folder
    from pipelines.body_composition.tissues import (
        TissueParams,
        TissueSlicer,
        bony_landmarks,
        process_reach_mm,
        with_neighbours,
    )
    from pipelines.body_composition.types import SideBone
    from pipelines.common.volume import load_series

    try:
        from pipelines.body_composition.classical import ClassicalSliceSegmenter as Old
    except ImportError:  # the old segmenter is gone: no "before" column
        Old = None  # type: ignore[assignment,misc]  # noqa: N806

    base = a.data / "totalseg_example_ct_dicom"
    tmp = Path(tempfile.mkdtemp(prefix="bodycomp-agree-"))
    try:
        files = with_uids(base / "dicom", tmp / "ct")
        vol = load_series(files).canonical_axial()[0]
        if a.noise > 0:
            from dataclasses import replace

            noise = np.random.default_rng(0).normal(0.0, a.noise, vol.hu.shape)
            vol = replace(vol, hu=(vol.hu + noise).astype(np.float32))
        ref = read_labels_on_volume(base / "example_seg_dicom.nii.gz", vol)
        lr = SpineLevelFinder().run(vol, ("L3",))  # the pipeline's anatomy (no anchor in view: unnamed)
        px = vol.pixel_area_mm2 / 100.0
        new = TissueSlicer()
        old = Old() if Old is not None else None
        dices: dict[str, list[float]] = {k: [] for k in TS_LABELS if k.startswith("erector")}
        errs: dict[str, list[float]] = {k: [] for k in dices}
        organ: dict[str, dict[str, list[float]]] = {o: {"before": [], "after": [], "unenhanced": []}
                                                    for o in ORGANS}
        arm: dict[str, list[float]] = {"muscle before": [], "muscle after": [], "sat before": [], "sat after": [],
                                       "arm area": []}
        totals: dict[str, list[float]] = {"muscle before": [], "muscle after": [], "sat before": [], "sat after": []}
        sides: list[tuple[int, float, float, float, float, float, float, float, float, float]] = []
        slices = list(range(0, vol.shape[0], a.every))
        p = TissueParams()

        @functools.cache
        def landmarks(kk: int) -> tuple[SideBone, SideBone]:
            return bony_landmarks(vol.hu[kk], vol.pixel_spacing, anatomy_for_slice(lr, kk), p)

        for k in slices:
            # as the pipeline's stage does: the slice with the bony landmarks of its neighbours
            anat = with_neighbours(anatomy_for_slice(lr, k), k, landmarks, vol.shape[0], vol.slice_spacing, p,
                                   process_reach_mm(lr, k, vol.slice_spacing, p))
            seg = new.run(vol.hu[k], vol.pixel_spacing, anat, "L3")
            for key in dices:
                r = ref[k] == TS_LABELS[key]
                if r.any():
                    m = seg.masks[key]
                    dices[key].append(dice(m, r) if m.any() else 0.0)
                    errs[key].append((float(m.sum()) - float(r.sum())) * px)
            tl, tr = ref[k] == TS_LABELS["erector_left"], ref[k] == TS_LABELS["erector_right"]
            ol, orr = seg.masks["erector_left"], seg.masks["erector_right"]
            if tl.any() and tr.any() and ol.any() and orr.any():
                c0 = anat.centre_rc[1]
                dy, dx = vol.pixel_spacing
                rows_behind = np.arange(vol.shape[1])[:, None] > anat.centre_rc[0] + (anat.half_height_mm + 20.0) / dy
                off = (np.arange(vol.shape[2])[None, :] - c0) * dx
                muscle = (vol.hu[k] >= -29.0) & (vol.hu[k] <= 150.0) & rows_behind
                tissue = float((muscle & (off > 0) & (off <= 60.0)).sum()) / float((muscle & (off < 0) & (off >= -60.0)).sum())
                sides.append((k, dice(ol, tl), dice(orr, tr), float(ol.sum()), float(orr.sum()), float(tl.sum()),
                              float(tr.sum()), tissue, dice(mirrored(ol, c0), orr), dice(mirrored(tl, c0), tr)))
            prev = old.run(vol.hu[k], vol.pixel_spacing, anat) if old is not None else None
            plain = new.run(unenhanced(vol.hu[k], ref[k]), vol.pixel_spacing, anat, "L3")
            for name, lab in ORGANS.items():
                if (ref[k] == lab).any():
                    organ[name]["unenhanced"].append(float((plain.masks["skeletal_muscle"] & (ref[k] == lab)).sum()) * px)
            body_all = seg.body | (seg.limbs if seg.limbs is not None else False)
            arms = arm_region(ref[k], body_all, vol.pixel_spacing, anat.centre_rc[1])
            arm["arm area"].append(float(arms.sum()) * px)
            for when, s in (("before", prev), ("after", seg)):
                if s is None:
                    continue
                mus = s.masks["skeletal_muscle"]
                for name, lab in ORGANS.items():
                    if (ref[k] == lab).any():
                        organ[name][when].append(float((mus & (ref[k] == lab)).sum()) * px)
                arm[f"muscle {when}"].append(float((mus & arms).sum()) * px)
                arm[f"sat {when}"].append(float((s.masks["sat"] & arms).sum()) * px)
                totals[f"muscle {when}"].append(float(mus.sum()) * px)
                totals[f"sat {when}"].append(float(s.masks["sat"].sum()) * px)

        print(f"real CT: {base.name}, {len(slices)} slices (T11-T12), pixel {vol.pixel_spacing[0]:.3f} mm"
              + (f", white noise of {a.noise:g} HU added" if a.noise > 0 else ""))
        print()
        print("erector spinae vs TotalSegmentator autochthon (TotalSegmentator vs itself: Dice 0.92-0.99)")
        print(f"{'structure':<16}{'slices':>7}{'Dice mean':>11}{'min':>7}{'max':>7}{'area err cm2':>14}")
        for key, ds in dices.items():
            if ds:
                print(f"{key:<16}{len(ds):>7}{np.mean(ds):>11.3f}{np.min(ds):>7.3f}{np.max(ds):>7.3f}"
                      f"{np.mean(errs[key]):>+14.2f}")
        if sides:
            print()
            sides_table(sides, a.per_slice)
        print()
        print("organs inside 'skeletal muscle' (cm2 per slice, mean / max over slices where the organ is labelled)")
        print(f"{'organ':<20}{'slices':>7}{'before mean':>13}{'max':>8}{'after mean':>12}{'max':>8}"
              f"{'unenhanced mean':>17}{'max':>8}")
        for name, d in organ.items():
            if d["after"]:
                b = (f"{np.mean(d['before']):>13.1f}{np.max(d['before']):>8.1f}" if d["before"]
                     else f"{'n/a':>13}{'':>8}")
                print(f"{name:<20}{len(d['after']):>7}{b}{np.mean(d['after']):>12.1f}{np.max(d['after']):>8.1f}"
                      f"{np.mean(d['unenhanced']):>17.1f}{np.max(d['unenhanced']):>8.1f}")
        print()
        print("arms (cm2 per slice, mean / max)")
        for key, v in arm.items():
            if v:
                print(f"{key:<20}{np.mean(v):>8.1f}{np.max(v):>8.1f}")
        print()
        print("whole-slice totals (cm2 per slice, mean)")
        for key, v in totals.items():
            if v:
                print(f"{key:<20}{np.mean(v):>8.1f}")
        out = run_folder(tmp / "ct", tmp / "out", {})
        print()
        print("pipeline:", json.dumps({"evaluable": out.evaluable, "reason": out.reason}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
