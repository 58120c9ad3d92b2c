"""Level finding with what lies beside the spine and pelvis on real CT: positive oral contrast, arms at the sides.

    PYTHONPATH=. python bench/level_beside_the_spine.py [--habitus thin,average,obese] [--slice-mm 3,5] [--seeds 3,7]

Each case is :func:`make_anatomy` (512 x 512, the real VerSe T9-L5 spine, sacrum and pelvis synthesised) with
``oral_contrast`` (stomach and bowel at about 300 HU), with and without every psoas contact, and the thin body
from T10 to L4 with its arms touching the trunk (no oral contrast), written as a DICOM series (HFS), read back and
given to ``SpineLevelFinder`` twice: "before" with the three rules for these cases off (``limbs_cut``,
``crest_set_aside``, ``rib_stray_skip``), "now" with the defaults.  ``err`` is the found L3 slice minus the true
middle of the L3 body, in mm; "-" = not named.  Nothing in the phantom was adjusted after running the finder on it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.body_composition.anatomy_phantom import (  # noqa: E402
    PSOAS_CONTACTS,
    AnatomySpec,
    Geometry,
    make_anatomy,
    write_series,
)
from pipelines.body_composition.levels import LevelParams, SpineLevelFinder  # noqa: E402
from pipelines.body_composition.types import LevelResult  # noqa: E402
from pipelines.common.volume import SeriesToVolume, Volume  # noqa: E402

BEFORE = LevelParams(limbs_cut=False, crest_set_aside=False, rib_stray_skip=False)
SHORT = {"sacrum": "sacrum", "iliac crest": "crest", "lowest rib-bearing vertebra": "T12 ribs"}


def _cell(res: LevelResult, vol: Volume, true_z: float) -> str:
    if res.level is None or res.slice_index is None:
        return f"{'-':>6} {res.confidence:<9}"
    err = float(vol.index_to_world(res.slice_index, 0.0, 0.0)[2]) - true_z
    return f"{err:>+6.1f} {res.confidence:<9}"


def _anchors(res: LevelResult) -> str:
    return ", ".join(SHORT.get(a.name, a.name) + ("" if a.agrees else " (aside)") for a in res.anchors) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--habitus", default="thin,average,obese")
    ap.add_argument("--slice-mm", default="3,5")
    ap.add_argument("--seeds", default="3,7")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    cases: list[tuple[str, AnatomySpec]] = []
    for hab in a.habitus.split(","):
        for mm in (float(x) for x in a.slice_mm.split(",")):
            for seed in (int(x) for x in a.seeds.split(",")):
                for contacts in ((), PSOAS_CONTACTS):
                    cases.append((f"oral{' +contacts' if contacts else ''}",
                                  AnatomySpec(habitus=hab, seed=seed, rows=512, slice_mm=mm, oral_contrast=True,
                                              psoas_contacts=contacts)))
    for mm in (float(x) for x in a.slice_mm.split(",")):
        for seed in (int(x) for x in a.seeds.split(",")):
            cases.append(("arms, T10-L4", AnatomySpec(habitus="thin", seed=seed, rows=512, slice_mm=mm,
                                                      contrast=False, bottom="L4")))
    print(f"{'case':<15}{'habitus':<9}{'mm':>3}{'seed':>5}  {'before err':>6} {'conf':<9}  {'now err':>6} "
          f"{'conf':<9}  anchors now")
    named = [0, 0]
    for name, spec in cases:
        ph = make_anatomy(spec)
        with tempfile.TemporaryDirectory() as d:
            vol, _ = SeriesToVolume().run(write_series(ph, Path(d), Geometry("HFS")).files).canonical_axial()
        before = SpineLevelFinder(BEFORE).run(vol, ("L3",))
        now = SpineLevelFinder().run(vol, ("L3",))
        named[0] += before.level is not None
        named[1] += now.level is not None
        print(f"{name:<15}{spec.habitus:<9}{spec.slice_mm:>3.0f}{spec.seed:>5}  {_cell(before, vol, ph.level_z['L3'])}"
              f"  {_cell(now, vol, ph.level_z['L3'])}  {_anchors(now)}", flush=True)
    print(f"L3 named: before {named[0]} of {len(cases)}, now {named[1]} of {len(cases)} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
