"""Level finding on aged spines: the anatomical phantom with osteoporosis, degenerated discs, osteophytes, a wedge.

    PYTHONPATH=. python bench/level_aged.py [--quick] [--seeds 1,2,3,4 [--habitus thin,average,obese]]
    PYTHONPATH=. python bench/level_aged.py --overlap [--seeds 1,2] [--habitus average]

Each case is :func:`make_anatomy` (the real VerSe T9-L5 spine, sacrum and pelvis synthesised) with the
options of :class:`AnatomySpec` for an old spine, written as a DICOM series in several geometries, read
back (``SeriesToVolume``, ``canonical_axial``) and given to ``SpineLevelFinder``.  ``err`` is the found L3
slice minus the true middle of the L3 body (its z), in slices; "-" = not named (the reason is printed).
Nothing in the phantom was adjusted after running the finder on it: a poor number is the finding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.body_composition.anatomy_phantom import AnatomySpec, Geometry, make_anatomy, write_series  # noqa: E402
from pipelines.body_composition.levels import SpineLevelFinder  # noqa: E402
from pipelines.common.volume import SeriesToVolume  # noqa: E402

# osteoporotic elderly: trabecular bone 50-120 HU (young 150-250); degenerated lower lumbar discs
CASES: dict[str, dict[str, object]] = {
    "young": {},
    "osteoporosis": {"trabecular_hu": 80.0},
    "degenerated": {"narrowed_discs": ("L2/L3", "L4/L5", "L5/S1"), "endplate_sclerosis": True,
                    "vacuum_discs": ("L4/L5",), "osteophyte_discs": ("L3/L4",)},
    "aged": {"trabecular_hu": 80.0, "narrowed_discs": ("L2/L3", "L4/L5", "L5/S1"), "endplate_sclerosis": True,
             "vacuum_discs": ("L4/L5",), "osteophyte_discs": ("L3/L4",), "wedge_fracture": "L1"},
    "aged-dim": {"trabecular_hu": 55.0, "narrowed_discs": ("L1/L2", "L3/L4", "L4/L5"), "disc_height_mm": 2.0,
                 "endplate_sclerosis": True, "osteophyte_discs": ("L2/L3", "L4/L5"), "wedge_fracture": "L2",
                 "wedge_front": 0.5},
}
GEOMETRIES = (Geometry("HFS"), Geometry("FFS"), Geometry("HFS", mirror_rows=True))


def l3_off(spec: AnatomySpec, d: Path) -> tuple[float | None, str]:
    """Build and write ``spec`` (HFS) under ``d``, find L3: (found minus true L3 middle in mm, None when refused;
    the confidence)."""
    ph = make_anatomy(spec)
    vol, _ = SeriesToVolume().run(write_series(ph, d, Geometry("HFS")).files).canonical_axial()
    res = SpineLevelFinder().run(vol, ("L3",))
    if res.slice_index is None:
        return None, res.confidence
    return float(vol.index_to_world(res.slice_index, 0.0, 0.0)[2]) - ph.level_z["L3"], res.confidence


def cell(off_mm: float | None, conf: str, spacing: float, tol_mm: float = 0.0) -> tuple[str, bool]:
    """A table cell (slices off and the confidence's initial, "-" refused, "!" wrong) and whether it is wrong: more
    than one slice and more than ``tol_mm`` off."""
    if off_mm is None:
        return "-", False
    e = off_mm / spacing
    bad = abs(e) > 1.0 and abs(off_mm) > tol_mm
    return f"{e:+.1f}{'!' if bad else ''}{conf[:1]}", bad


def seeds(seed_list: list[int], habitus: list[str]) -> None:
    """The noise sweep: each case at 3 and 5 mm (HFS) with each noise seed and habitus; per cell the L3 error in
    slices and the confidence's initial ("-": refused), "!" where it is more than one slice off."""
    print(f"{'habitus':8} {'case':13} {'mm':>3} " + " ".join(f"{'seed ' + str(x):>8}" for x in seed_list))
    named = wrong = runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for hab in habitus:
            for case, opts in CASES.items():
                for sp in (3.0, 5.0):
                    cells = []
                    for seed in seed_list:
                        spec = AnatomySpec(slice_mm=sp, seed=seed, habitus=hab, **opts)  # type: ignore[arg-type]
                        off_mm, conf = l3_off(spec, Path(tmp) / f"{hab}{case}{sp}{seed}")
                        text, bad = cell(off_mm, conf, sp)
                        cells.append(text)
                        runs, named, wrong = runs + 1, named + (off_mm is not None), wrong + bad
                    print(f"{hab:8} {case:13} {sp:3.0f} " + " ".join(f"{c:>8}" for c in cells), flush=True)
    print(f"{runs} runs: L3 named in {named}, more than one slice off in {wrong}")


# overlapping reconstructions as scanners write them: (thickness, spacing) in mm
OVERLAPS = ((5.0, 2.5), (5.0, 3.0), (3.0, 2.0), (3.0, 1.5), (2.0, 1.0), (1.25, 0.625))


def overlap(seed_list: list[int], habitus: list[str]) -> None:
    """Slices thicker than their spacing (5 mm every 2.5 mm, 3 mm every 2 mm as the shared real CT, ...): each case
    and habitus per (thickness / spacing) with each noise seed; a cell is the L3 error in slices of the spacing and the
    confidence's initial ("-": refused), "!" where it is more than one slice (or 5 mm) off."""
    cols = [f"{t:g}/{s:g}" for t, s in OVERLAPS]
    print(f"{'habitus':8} {'case':13} {'seed':>4} " + " ".join(f"{c:>9}" for c in cols))
    named = wrong = runs = 0
    with tempfile.TemporaryDirectory() as tmp:
        for hab in habitus:
            for case, opts in CASES.items():
                for seed in seed_list:
                    cells = []
                    for th, sp in OVERLAPS:
                        spec = AnatomySpec(slice_mm=th, spacing_mm=sp, seed=seed, habitus=hab, **opts)  # type: ignore[arg-type]
                        off_mm, conf = l3_off(spec, Path(tmp) / f"{hab}{case}{seed}{th}{sp}")
                        text, bad = cell(off_mm, conf, sp, tol_mm=5.0)
                        cells.append(text)
                        runs, named, wrong = runs + 1, named + (off_mm is not None), wrong + bad
                    print(f"{hab:8} {case:13} {seed:>4} " + " ".join(f"{c:>9}" for c in cells), flush=True)
    print(f"{runs} runs: L3 named in {named}, more than one slice and 5 mm off in {wrong}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="3 and 5 mm, HFS only")
    ap.add_argument("--seeds", default="", help="noise seeds, e.g. 1,2,3,4: the sweep at 3 and 5 mm instead")
    ap.add_argument("--habitus", default="average", help="with --seeds or --overlap: thin,average,obese")
    ap.add_argument("--overlap", action="store_true",
                    help="overlapping reconstructions (thickness / spacing) instead, with --seeds (default 1)")
    args = ap.parse_args()
    if args.overlap:
        overlap([int(x) for x in (args.seeds or "1").split(",")], args.habitus.split(","))
        return
    if args.seeds:
        seeds([int(x) for x in args.seeds.split(",")], args.habitus.split(","))
        return
    spacings = (3.0, 5.0) if args.quick else (1.0, 3.0, 5.0)
    geoms = GEOMETRIES[:1] if args.quick else GEOMETRIES
    print(f"{'case':13} {'mm':>3} {'geometry':11} {'level':5} {'err':>5} {'conf':8} {'s':>5}  anchors / reason")
    with tempfile.TemporaryDirectory() as tmp:
        for case, opts in CASES.items():
            for sp in spacings:
                ph = make_anatomy(AnatomySpec(slice_mm=sp, **opts))  # type: ignore[arg-type]
                for g in geoms:
                    gname = g.position + (" mirror" if g.mirror_rows else "")
                    truth = write_series(ph, Path(tmp) / f"{case}{sp}{gname}".replace(" ", ""), g)
                    vol, _ = SeriesToVolume().run(truth.files).canonical_axial()
                    t0 = time.perf_counter()
                    res = SpineLevelFinder().run(vol, ("L3",))
                    dt = time.perf_counter() - t0
                    err = "-"
                    if res.slice_index is not None:
                        z = float(vol.index_to_world(res.slice_index, 0.0, 0.0)[2])
                        err = f"{(z - ph.level_z['L3']) / sp:+.1f}"
                    keys = ("not named", "cannot count", "touches the edge", "not in the field of view", "not found")
                    why = (", ".join(a.name if a.agrees else f"({a.name}: set aside)" for a in res.anchors) if res.level else
                           next((x for x in res.notes if any(q in x for q in keys)), res.notes[0] if res.notes else ""))
                    print(f"{case:13} {sp:3.0f} {gname:11} {res.level or '-':5} {err:>5} {res.confidence:8} {dt:5.2f}  "
                          f"{why}", flush=True)


if __name__ == "__main__":
    main()
