"""A patient lying turned on the table: the pipeline with and without ``spine_roll`` on rolled anatomical phantoms.

    .venv/bin/python bench/body_composition_roll.py [--habitus thin,average,obese] [--angles=-15,-8,-4,0,4,8,15] [--full] [--neck]

Each phantom (:mod:`pipelines.body_composition.anatomy_phantom`, 256 x 256 at 5 mm or with ``--full`` 512 x 512 at
1 mm, seed 3) is turned about the
head-feet axis by each angle (``AnatomySpec.roll_deg``) after it is built: HU resampled bilinearly, the truth labels
by nearest neighbour (so a turned phantom's truth has stair-steps the unturned one has not: read the 0-degree row as
the ceiling).  The VerSe spine inside is itself turned by about -1.5 degrees against the phantom's body.
It is written as a DICOM series and run through ``run_folder`` twice, with ``spine_roll`` off and on.  Per row:
the level's offset from the truth (slices), the Dice of psoas, erector and all skeletal muscle at the slice the
pipeline measured (read from its SEG), the roll the stage applied at the level slice (on), and the values the
plausibility gates held back ("not evaluable" instead of filed).  A Dice below 0.90 that was filed is marked "<".

Nothing here is tuned to the phantoms: the roll comes from the vertebra's mirror symmetry.

``--neck``: the anatomical neck instead (real cervical spines gl003 and gl017, 256 x 256 at 3 mm, or 512 x 512 at 2 mm
with ``--full``), at C3 as a reader confirms it (the finder does not name C3 on these phantoms).  The stages run
directly, so the Dice of each C3 part is read from its mask even where its value is held back; "filed" lists the
parts whose area the SR files (the anatomical neck's sternocleidomastoids touch the muscles behind them with no fat
plane, so their areas and those of the paravertebral muscles are not evaluable; the C3 area, their sum, is).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.body_composition_phantom import dice, run_variant  # noqa: E402
from pipelines.body_composition.anatomy_phantom import AnatomySpec, Geometry, make_anatomy  # noqa: E402
from pipelines.body_composition.types import C3_NAMED  # noqa: E402

KEYS = ("psoas_left", "psoas_right", "erector_left", "erector_right", "skeletal_muscle")
SHORT = {"psoas_left": "PsL", "psoas_right": "PsR", "erector_left": "ErL", "erector_right": "ErR",
         "skeletal_muscle": "SM"}


def applied_roll(notes: Sequence[str]) -> str:
    """The roll the stage applied at the level slice, as its note gives it ("+9.8"), or "0"."""
    return next((n.split("roll of ")[1].split(" ")[0] for n in notes if "spine roll of" in n), "0")


def fmt(v: object) -> str:
    return f"{v:+.1f}" if isinstance(v, float) else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--habitus", default="thin,average,obese")
    ap.add_argument("--angles", default="-15,-8,-4,0,4,8,15")
    ap.add_argument("--full", action="store_true", help="512 x 512 at 1 mm (about 300 slices) instead")
    ap.add_argument("--neck", action="store_true", help="the anatomical neck at C3 instead")
    a = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="bench-roll-"))
    angles = [float(v) for v in a.angles.split(",")]
    if a.neck:
        return neck(base, angles, a.full)
    print(f"{'habitus':8}{'deg':>5} {'roll':4}{'off':>5}{'applied':>8}" + "".join(f"{'D ' + SHORT[k]:>7}" for k in KEYS)
          + f"{'A% SM':>7}  gated")
    t0 = time.perf_counter()
    filed_low = {False: 0, True: 0}
    gated_n = {False: 0, True: 0}
    for hab in a.habitus.split(","):
        for deg in angles:
            spec = AnatomySpec(habitus=hab, rows=512 if a.full else 256, slice_mm=1.0 if a.full else 5.0, seed=3,
                               roll_deg=deg)
            cache: dict[AnatomySpec, object] = {spec: make_anatomy(spec)}
            for on in (False, True):
                r = run_variant(base / f"{hab}{deg:+.0f}{'-roll' if on else ''}", spec, Geometry("HFS"),
                                {"spine_roll": on}, cache)
                gated = str(r.get("gated") or r.get("reason") or "")
                applied = "-"
                summ = next((base / f"{hab}{deg:+.0f}{'-roll' if on else ''}").glob("*/out/summary.json"), None)
                if summ is not None:
                    applied = applied_roll(json.loads(summ.read_text()).get("segmentation_notes") or [])
                cells = []
                for k in KEYS:
                    v = r.get(f"dice_{k}")
                    held = k in gated.split(" (")[0] or f"{k} (" in gated
                    if isinstance(v, float) and not held:
                        low = v < 0.90
                        filed_low[on] += low
                        cells.append(f"{v:.2f}{'<' if low else ' '}")
                    else:
                        gated_n[on] += 1
                        cells.append("-")
                off = r.get("offset")
                print(f"{hab:8}{deg:>+5.0f} {'on' if on else 'off':4}{off if off is not None else '-':>5}{applied:>8}"
                      + "".join(f"{c:>7}" for c in cells) + f"{fmt(r.get('area_skeletal_muscle')):>7}  {gated[:90]}",
                      flush=True)
    print(f"filed with Dice < 0.90: off {filed_low[False]}, on {filed_low[True]}; held back or not found: "
          f"off {gated_n[False]}, on {gated_n[True]}  ({time.perf_counter() - t0:.0f} s; outputs in {base})")
    return 0


C3_SHORT = {"sternocleidomastoid_left": "SCM L", "sternocleidomastoid_right": "SCM R", "paravertebral_left": "PV L",
            "paravertebral_right": "PV R"}


def neck(base: Path, angles: list[float], full: bool) -> int:
    """The ``--neck`` table: C3 on the anatomical neck turned by each angle, with and without the roll."""
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, write_series
    from pipelines.body_composition.pipeline import volume_of
    from pipelines.body_composition.reader_level import LevelOverride, level_from_override
    from pipelines.body_composition.reference import PatientFactors, load_table
    from pipelines.body_composition.roll import RollParams
    from pipelines.body_composition.stages import (
        ClassicalBackend,
        LevelFinder,
        Measure,
        MeasureInput,
        SegmentInput,
        TissueSegmenter,
    )

    print(f"{'spine':6}{'deg':>5} {'roll':4}{'applied':>8}" + "".join(f"{'D ' + C3_SHORT[k]:>8}" for k in C3_NAMED)
          + f"{'C3 cm2':>8}{'truth':>7}  filed")
    t0 = time.perf_counter()
    worst = {False: [], True: []}  # type: dict[bool, list[float]]
    be = ClassicalBackend()
    for spine in ("gl003", "gl017"):
        for deg in angles:
            ph = make_anatomy(AnatomySpec(region="neck", spine=spine, rows=512 if full else 256,
                                          slice_mm=2.0 if full else 3.0, roll_deg=deg))
            d = base / f"{spine}{deg:+.0f}"
            truth = write_series(ph, d, Geometry("HFS"))
            vol = volume_of(list(truth.files)).canonical_axial()[0]
            kt = truth.level_slices["C3"]
            marker = {"level": "C3", "sop_instance_uid": truth.sop_uids[kt], "reader": "Bench^Reader", "source": "cli",
                      "time": "2026-12-06T10:00:00Z"}
            level = level_from_override(vol, LevelOverride.from_mapping(marker, "bench"),
                                        LevelFinder(be, ("C3",)).run(vol))
            k = level.slice_index
            assert k is not None
            truth_of = {key: np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION[key]]) for key in C3_NAMED}
            want = float(np.isin(ph.labels[k], [LABELS[n] for n in COMPOSITION["c3_muscle"]]).sum()) \
                * ph.spec.pixel_mm ** 2 / 100.0
            for on in (False, True):
                seg = TissueSegmenter(be, roll=RollParams(enabled=on)).run(SegmentInput(vol, level))
                m = Measure(load_table()).run(MeasureInput(vol, seg, PatientFactors(1.75, 70.0, "M", 60.0)))
                applied = applied_roll(seg.slice_seg.notes)
                dices = [dice(seg.slice_seg.masks[key], truth_of[key]) for key in C3_NAMED]
                worst[on].append(min(dices[2:]))
                filed = [C3_SHORT[key] for key in C3_NAMED if m.areas[key].value is not None]
                c3 = m.areas["skeletal_muscle"].value
                print(f"{spine:6}{deg:>+5.0f} {'on' if on else 'off':4}{applied:>8}"
                      + "".join(f"{v:>8.3f}" for v in dices) + f"{c3 if c3 is not None else float('nan'):>8.1f}"
                      f"{want:>7.1f}  {', '.join(filed) or '-'}", flush=True)
    print(f"paravertebral muscles, worse side: mean off {np.mean(worst[False]):.3f}, on {np.mean(worst[True]):.3f}; "
          f"lowest off {min(worst[False]):.3f}, on {min(worst[True]):.3f}  ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
