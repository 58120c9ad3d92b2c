"""Psoas and erector on the true L3 middle and the slices next to it, and what the slice-consistency gate files.

    PYTHONPATH=$PWD .venv/bin/python bench/psoas_consistency.py [--rows 512] [--slice-mm 1] [--quick] [--seeds 3,7]

Each case is an anatomical phantom (:mod:`pipelines.body_composition.anatomy_phantom`, L2-L4, ``--slice-mm``,
``--rows`` pixels across its 500 mm field of view: 512 gives the ~1 mm pixels of a clinical abdominal CT) for
each habitus, without and with contrast, without contacts and with every psoas contact at once
(``AnatomySpec.psoas_contacts``), for each seed (the intramuscular fat and the noise differ).  The tissue
segmenter runs on the true L3 middle slice and on the slices just above and below it (the truth's vertebral
body as the slice anatomy, as with a reader-confirmed level).  Printed per case and side: Dice and area error %
against the truth on each of the three slices, and what the gates (``plausibility.toml``, the
slice-consistency gate included) file for the middle slice: its area, or "gated" with the gate's name.

The summary counts, over the middle slices: wrong values (area error beyond 25 %) filed and caught, and right
values (within 25 %) filed and gated.  Nothing here is tuned: a poor number is the finding.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipelines.body_composition.anatomy_phantom import (  # noqa: E402
    COMPOSITION,
    LABELS,
    PSOAS_CONTACTS,
    AnatomySpec,
    make_anatomy,
)
from pipelines.body_composition.plausibility import apply_gates, load_gates  # noqa: E402
from pipelines.body_composition.tissues import TissueSlicer  # noqa: E402
from pipelines.body_composition.types import L3_KEYS, NAMED_MUSCLES, Value  # noqa: E402

KEYS = ("psoas_left", "psoas_right", "erector_left", "erector_right")
WRONG = 25.0  # an area error beyond this (%) is a wrong number


def measure(habitus: str, contrast: bool, contacts: tuple[str, ...], seed: int, rows: int,
            slice_mm: float) -> dict[str, Any]:
    ph = make_anatomy(AnatomySpec(habitus=habitus, contrast=contrast, top="L2", bottom="L4", seed=seed, rows=rows,
                                  slice_mm=slice_mm, psoas_contacts=contacts))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    slicer = TissueSlicer()
    cm2 = px * px / 100.0
    out: dict[str, Any] = {}
    seg = slicer.run(ph.hu[k], (px, px), anat)
    near = [slicer.named(ph.hu[kk], (px, px), anat) for kk in (k - 1, k + 1)]
    for dk, masks in ((-1, near[0]), (0, seg.masks), (1, near[1])):
        lab = ph.labels[k + dk]
        for key in KEYS:
            t = np.isin(lab, [LABELS[n] for n in COMPOSITION[key]])
            m = masks[key]
            s = int(t.sum()) + int(m.sum())
            out[(key, dk)] = (2.0 * float((t & m).sum()) / s if s else float("nan"),
                              100.0 * (float(m.sum()) - float(t.sum())) / max(float(t.sum()), 1.0))
    hu = ph.hu[k]
    areas = {key: Value(float(seg.masks[key].sum()) * cm2, "cm2") for key in L3_KEYS}
    means = {key: Value(float(hu[seg.masks[key]].mean()) if seg.masks[key].any() else 0.0, "HU") for key in L3_KEYS}
    for key in L3_KEYS:
        if not seg.masks[key].any():
            areas[key] = Value(None, "cm2", "structure not found on the level slice")
            means[key] = Value(None, "HU", "structure not found on the level slice")
    n_areas = [{key: float(n[key].sum()) * cm2 for key in NAMED_MUSCLES} for n in near]
    gated, _, failed = apply_gates("L3", areas, means, seg, load_gates(), 0.0, n_areas, ph.spec.slice_mm)
    before, _, _ = apply_gates("L3", areas, means, seg, load_gates())  # the other gates alone
    for key in KEYS:
        gates = sorted({f["gate"] for f in failed if f["key"] == key})
        out[key] = "filed" if gated[key].value is not None else (",".join(gates) or "not found")
        out[(key, "before")] = before[key].value is not None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--slice-mm", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="average habitus, no contrast only")
    ap.add_argument("--seeds", default="3,7")
    a = ap.parse_args()
    habs = ["average"] if a.quick else ["thin", "average", "obese"]
    contrasts = [False] if a.quick else [False, True]
    seeds = [int(s) for s in a.seeds.split(",")]
    print(f"{'habitus':8s} {'C':2s} {'contacts':8s} {'seed':>4s}  {'structure':14s} "
          f"{'k-1 Dice/err%':>14s} {'k Dice/err%':>14s} {'k+1 Dice/err%':>14s}  filed?")
    t0 = time.perf_counter()
    tally = {"wrong filed": 0, "wrong caught": 0, "right filed": 0, "right gated": 0}
    without = {"wrong filed": 0, "right gated": 0}  # the same, without the slice-consistency gate
    for hab in habs:
        for contrast in contrasts:
            for cname, contacts in (("none", ()), ("all", tuple(PSOAS_CONTACTS))):
                for seed in seeds:
                    r = measure(hab, contrast, contacts, seed, a.rows, a.slice_mm)
                    for key in KEYS:
                        cells = " ".join(f"{r[(key, dk)][0]:6.3f}/{r[(key, dk)][1]:+6.1f}" for dk in (-1, 0, 1))
                        print(f"{hab:8s} {'C+' if contrast else 'C-':2s} {cname:8s} {seed:4d}  {key:14s} {cells}  "
                              f"{r[key]}", flush=True)
                        if r[key] == "not found":
                            continue
                        wrong = abs(r[(key, 0)][1]) > WRONG
                        filed = r[key] == "filed"
                        tally[("wrong " if wrong else "right ") + ("filed" if filed else
                                                                   ("caught" if wrong else "gated"))] += 1
                        if wrong and r[(key, "before")]:
                            without["wrong filed"] += 1
                        if not wrong and not r[(key, "before")]:
                            without["right gated"] += 1
    print("middle slices: " + ", ".join(f"{k} {v}" for k, v in tally.items())
          + f" (wrong = area error beyond {WRONG:.0f} %); without the slice-consistency gate: "
          + ", ".join(f"{k} {v}" for k, v in without.items()))
    print(f"({time.perf_counter() - t0:.0f} s; Dice/err% against the truth on the slice below, the true L3 middle and "
          "the slice above)")


if __name__ == "__main__":
    main()
