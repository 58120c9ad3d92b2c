"""Level finding on VerSe-based volumes: level error (slices) and time per volume x spacing x orientation.

    PYTHONPATH=. python bench/level_finding.py [--noise SD ...] [--cases verse004 verse010]

Volumes come from tests/verse_spine.py (real manual VerSe vertebra masks given HU, ribs, sacrum, iliac wings,
skull base).  Error = named middle of L3 (or C3) minus the truth body centroid, in slices; "-" = not named
(the reason is printed).  ``--noise`` adds white noise of each SD (HU, seeded) to the volumes, as low-dose CT
(0 is the volume as built); a noisy spine may be refused, never named wrong.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pipelines.body_composition.levels import SpineLevelFinder  # noqa: E402
from tests.verse_spine import as_volume, build  # noqa: E402

ORIENT = {"supine HF": ((1, 0, 0), (0, 1, 0), False), "prone FF": ((-1, 0, 0), (0, -1, 0), True),
          "mirrored rows FF": ((-1, 0, 0), (0, 1, 0), True)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", type=float, nargs="*", default=[0.0])
    ap.add_argument("--cases", nargs="*", default=["verse004", "verse010", "gl003", "gl017"])
    a = ap.parse_args(argv)
    noisy = a.noise != [0.0]
    print(f"{'volume':10} {'mm':>3} {'orientation':17} " + ("noise " if noisy else "")
          + f"{'level':5} {'err':>5} {'conf':8} {'s':>5}  anchors / reason")
    for case in a.cases:
        target = "L3" if case.startswith("verse") else "C3"
        for sp in (1.0, 3.0, 5.0):
            c = build(case, sp)
            for name, (rd, cd, ff) in ORIENT.items():
                clean, _ = as_volume(c, rd, cd, ff).canonical_axial()
                for sd in a.noise:
                    vol = clean
                    if sd > 0:
                        noise = np.random.default_rng(0).normal(0.0, sd, clean.hu.shape)
                        vol = replace(clean, hu=(clean.hu + noise).astype(np.float32))
                    t0 = time.perf_counter()
                    res = SpineLevelFinder().run(vol, (target,))
                    dt = time.perf_counter() - t0
                    err = "-" if res.slice_index is None else f"{res.slice_index - c.truth_mid[target]:+.1f}"
                    keys = ("not named", "cannot count", "touches the edge", "not in the field of view", "not found")
                    why = (", ".join(x.name if x.agrees else f"({x.name}: set aside)" for x in res.anchors) if res.level else
                           next((x for x in res.notes if any(q in x for q in keys)), res.notes[0] if res.notes else ""))
                    print(f"{case:10} {sp:3.0f} {name:17} " + (f"{sd:5.0f} " if noisy else "")
                          + f"{res.level or '-':5} {err:>5} {res.confidence:8} {dt:5.2f}  {why}")


if __name__ == "__main__":
    main()
