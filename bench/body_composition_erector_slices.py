"""Erector spinae and psoas on every slice from L5 to L1 of the anatomical phantom, with and without the
bony landmarks of neighbouring slices (``tissues.with_neighbours``).

    .venv/bin/python bench/body_composition_erector_slices.py [--slice-mm 5] [--habitus average] [--rows 256]

The phantom bench measures the L3 middle only, where a transverse process is on the slice; the
3D volumes of the named muscles are measured on every lumbar slice, half of which lie between
processes (a disc, between two processes) and take their neighbours' process tip and floor.
Printed: erector and psoas Dice (mean, min) per side, all slices and split by whether the slice shows a
process itself, before (the slice alone) and after (with its neighbours); psoas where the truth has it; and
the error of the volume summed over L5-L1 (the 3D volume the volumes SR files) against the truth's.  The level finder's
vertebrae give the range and the slice anatomy, as in the pipeline.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


KEYS = ("erector_left", "erector_right", "psoas_left", "psoas_right")


def measure(habitus: str = "average", slice_mm: float = 5.0, per_slice: bool = False, base: Path | None = None,
            rows: int = 256) -> tuple[dict[tuple[str, str, str], list[float]], str]:
    """Erector and psoas Dice per (structure, "all" / "process" / "no process", "before" / "after"), and the range."""
    from pipelines.body_composition import tissues as t
    from pipelines.body_composition.anatomy_phantom import (
        COMPOSITION,
        LABELS,
        AnatomySpec,
        Geometry,
        make_anatomy,
        write_series,
    )
    from pipelines.body_composition.levels import SpineLevelFinder, anatomy_for_slice
    from pipelines.body_composition.types import SideBone
    from pipelines.common.volume import SeriesToVolume

    ph = make_anatomy(AnatomySpec(habitus=habitus, rows=rows, slice_mm=slice_mm))
    base = base or Path(tempfile.mkdtemp(prefix="bench-erector-"))
    truth = write_series(ph, base / "ct", Geometry("HFS"))
    vol = SeriesToVolume().run(truth.files).canonical_axial()[0]
    lr = SpineLevelFinder().run(vol, ("L3",))
    l1, l5 = lr.vertebra("L1"), lr.vertebra("L5")
    if l1 is None or l5 is None:
        return {}, "L1 or L5 not found: nothing measured"
    p = t.TissueParams()

    @functools.cache
    def landmarks(kk: int) -> tuple[SideBone, SideBone]:
        return t.bony_landmarks(vol.hu[kk], vol.pixel_spacing, anatomy_for_slice(lr, kk), p)

    rows, cols = vol.hu.shape[1:]
    rr, cc = np.mgrid[:rows, :cols]
    res: dict[tuple[str, str, str], list[float]] = {}
    for k in range(l5.first, l1.last + 1):
        pts = (vol.slices[k].position + cc[..., None] * vol.pixel_spacing[1] * vol.row_direction
               + rr[..., None] * vol.pixel_spacing[0] * vol.column_direction)
        tl = ph.labels_at(pts)
        alone = anatomy_for_slice(lr, k)
        near = t.with_neighbours(alone, k, landmarks, vol.shape[0], vol.slice_spacing, p,
                                 t.process_reach_mm(lr, k, vol.slice_spacing, p))
        for when, anat in (("before", alone), ("after", near)):
            m = t.lumbar_named(vol.hu[k], vol.pixel_spacing, anat, p)
            for i, key in ((0, KEYS[0]), (1, KEYS[1]), (0, KEYS[2]), (1, KEYS[3])):
                truth_k = np.isin(tl, [LABELS[n] for n in COMPOSITION[key]])  # the compartment, its fat in
                if not truth_k.any():
                    continue
                d = 2.0 * float((m[key] & truth_k).sum()) / float(m[key].sum() + truth_k.sum())
                res.setdefault((key, "voxels", when), []).append(float(m[key].sum()))
                res.setdefault((key, "truth voxels", when), []).append(float(truth_k.sum()))
                own = "process" if landmarks(k)[i].tip_mm is not None else "no process"
                for split in ("all", own):
                    res.setdefault((key, split, when), []).append(d)
                if per_slice and when == "after":
                    name = next((v.name for v in lr.vertebrae if v.first <= k <= v.last), "disc")
                    print(f"slice {k:>3} {name:<5} {key:<14} {own:<11} Dice {d:.3f}  area {m[key].sum():>5} px"
                          f"  truth {truth_k.sum():>5} px")
    return res, f"phantom {habitus}, {rows} rows, {slice_mm:g} mm slices, L5-L1 = slices {l5.first}-{l1.last}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slice-mm", type=float, default=5.0)
    ap.add_argument("--habitus", default="average")
    ap.add_argument("--rows", type=int, default=256, help="pixels across the 500 mm field (512: ~1 mm pixels)")
    ap.add_argument("--per-slice", action="store_true", help="print each slice's Dice (after)")
    a = ap.parse_args(argv)
    res, title = measure(a.habitus, a.slice_mm, a.per_slice, rows=a.rows)
    slice_mm = a.slice_mm
    print(title)
    if not res:
        return 1
    from pipelines.body_composition.plausibility import load_gates, unstable_slices

    gates = {g.key: g for g in load_gates().continuity}
    print(f"{'structure':<16}{'slices':<12}{'n':>4}{'before':>9}{'min':>7}{'after':>9}{'min':>7}  volume err % after"
          "  continuity gate")
    for key in KEYS:
        got, want = sum(res.get((key, "voxels", "after"), [])), sum(res.get((key, "truth voxels", "after"), []))
        for split in ("all", "process", "no process"):
            b, f = res.get((key, split, "before"), []), res.get((key, split, "after"), [])
            if b:
                vol = f"{100.0 * (got - want) / want:+9.1f}" if split == "all" and want else ""
                if split == "all" and key in gates:
                    g = gates[key]
                    bad, judged = unstable_slices(res[(key, "voxels", "after")], slice_mm, g)
                    vol += f"  {bad}/{judged} unstable: " + ("gated" if judged and bad > g.max_unstable * judged
                                                             else "filed")
                print(f"{key:<16}{split:<12}{len(b):>4}{np.mean(b):>9.3f}{np.min(b):>7.3f}"
                      f"{np.mean(f):>9.3f}{np.min(f):>7.3f}{vol}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
