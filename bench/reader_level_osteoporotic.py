"""A reader-confirmed L3 on osteoporotic spines: what the pipeline files on the reader's slice.

    PYTHONPATH=$PWD .venv/bin/python bench/reader_level_osteoporotic.py [--habitus thin,average,obese]
                                                                        [--slice-mm 5] [--trabecular 80,young]

Each row is an anatomical phantom (:mod:`pipelines.body_composition.anatomy_phantom`, 256 rows, seed 3, HFS) with
cancellous bone at the given HU ("young": the phantom's default) written as a DICOM series.  On osteoporotic
spines at 3-5 mm the level finder often names no level (``bench/level_aged.py``), so a reader's level is the way
to a number: ``run_folder`` runs with ``level_override`` on the true L3 middle slice, as a reader would confirm it.
Per structure the table prints the Dice of the SEG's mask on that slice against the truth and the filed area's
error % against the truth area ("NE": not evaluable, the gates held it back).  Nothing here is tuned: a poor
number is the finding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.body_composition_phantom import dice, seg_masks  # noqa: E402
from pipelines.body_composition.anatomy_phantom import AnatomySpec, Geometry, make_anatomy, write_series  # noqa: E402
from pipelines.body_composition.pipeline import run_folder  # noqa: E402

KEYS = ("psoas_left", "psoas_right", "erector_left", "erector_right", "skeletal_muscle")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--habitus", default="thin,average,obese")
    ap.add_argument("--slice-mm", type=float, default=5.0)
    ap.add_argument("--trabecular", default="80,young", help="cancellous HU per row set ('young': the default)")
    a = ap.parse_args(argv)
    print(f"{'habitus':8} {'bone':5} " + " ".join(f"{k.replace('skeletal_muscle', 'SM'):>14}" for k in KEYS)
          + "  held back")
    with tempfile.TemporaryDirectory() as tmp:
        for bone in a.trabecular.split(","):
            for habitus in a.habitus.split(","):
                opts = {} if bone == "young" else {"trabecular_hu": float(bone)}
                spec = AnatomySpec(habitus=habitus, slice_mm=a.slice_mm, **opts)  # type: ignore[arg-type]
                d = Path(tmp) / f"{habitus}-{bone}"
                truth = write_series(make_anatomy(spec), d / "ct", Geometry("HFS"))
                k = truth.level_slices["L3"]
                run_folder(d / "ct", d / "out", {"volumes_3d": False, "level_override": {
                    "level": "L3", "sop_instance_uid": truth.sop_uids[k]}})
                s = json.loads((d / "out" / "summary.json").read_text())
                segs = seg_masks(d / "out" / str(s["seg"]), truth)
                cells = []
                for key in KEYS:
                    t = truth.mask(key)[k]
                    want = float(t.sum()) * spec.pixel_mm**2 / 100.0
                    got = (s["areas_cm2"].get(key) or {}).get("value")
                    err = f"{100.0 * (got - want) / want:+.0f}%" if got is not None and want > 0 else "NE"
                    dc = f"{dice(segs[key][k], t):.2f}" if key in segs else "-"
                    cells.append(f"{dc + '/' + err:>14}")
                held = sorted({f["key"] if isinstance(f, dict) else str(f) for f in s["plausibility"]["failed"]})
                print(f"{habitus:8} {bone:5} " + " ".join(cells) + "  " + (", ".join(held) or "-"), flush=True)


if __name__ == "__main__":
    main()
