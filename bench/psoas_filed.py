"""What the whole body-composition pipeline files for psoas at L3 when organs touch it: every gate included.

    PYTHONPATH=$PWD .venv/bin/python bench/psoas_filed.py [--quick] [--rows 512] [--slice-mm 5] [--seeds 3,7]
                                                         [--habitus thin,average,obese] [--cases duodenum:C+,...]
                                                         [--tissue '{"psoas_lateral_waist": 0}']

Each case is an anatomical phantom (:mod:`pipelines.body_composition.anatomy_phantom`, the whole T10-S1 spine, so
the level finder runs and the 3D L5-L1 muscles are segmented) with one psoas contact, none or all of them
(``AnatomySpec.psoas_contacts``), in one phase (C- non-contrast, C+ portal venous, art arterial, oral: portal venous
with positive oral contrast, ``AnatomySpec.oral_contrast``), written as a DICOM
series and run through ``run_folder`` as the node runs it.  Per psoas side it prints the area error of the outline
on the level slice as segmented, before the gates (against the truth at the true L3 middle, as
``body_composition_phantom.py``), and whether the SR files it or which gates made it "not evaluable".

The summary counts wrong values (area error beyond 25 %) filed and caught and right values filed and gated, with
every gate and without the trend gate (a value the trend gate held back had passed every other gate: without it
that value is filed).  ``bench/psoas_contacts.py`` and ``bench/psoas_consistency.py`` run the segmenter alone on
the true L3 slice; this one shows what reaches the PACS.  ``--tissue`` overrides fields of the segmenter's
:class:`TissueParams` (a rule's switch, for a before/after in one checkout).  Nothing here is tuned: a poor number
is the finding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.body_composition import pipeline, stages  # noqa: E402
from pipelines.body_composition.anatomy_phantom import (  # noqa: E402
    PSOAS_CONTACTS,
    AnatomySpec,
    Geometry,
    make_anatomy,
    write_series,
)
from pipelines.body_composition.pipeline import run_folder  # noqa: E402
from pipelines.body_composition.stages import ClassicalBackend  # noqa: E402
from pipelines.body_composition.tissues import TissueParams  # noqa: E402
from pipelines.body_composition.types import Measurements  # noqa: E402

WRONG = 25.0  # an area error beyond this (%) is a wrong number
CASES = ("none:C+", "none:C-", "duodenum:C+", "duodenum:art", "kidney:C-", "ivc:C-", "node:C-", "crus:C-", "all:C-",
         "all:C+")
QUICK = ("none:C+", "duodenum:C+", "kidney:C-", "all:C-")


def run_case(base: Path, habitus: str, contact: str, phase: str, seed: int, rows: int, slice_mm: float,
             tissue: TissueParams | None = None) -> dict[str, tuple[float | None, str]]:
    """Per psoas side: (area error % of the level slice's outline against the true L3 middle, None where no outline;
    "filed" or the failed gates)."""
    contacts = () if contact == "none" else (PSOAS_CONTACTS if contact == "all" else (contact,))
    # phase "oral": portal venous with positive oral contrast in the stomach and bowel
    spec = AnatomySpec(habitus=habitus, contrast=phase != "C-", contrast_phase="arterial" if phase == "art" else "portal",
                       seed=seed, rows=rows, slice_mm=slice_mm, psoas_contacts=contacts, oral_contrast=phase == "oral")
    truth = write_series(make_anatomy(spec), base / "ct", Geometry("HFS"))
    seen: dict[str, float] = {}
    measure_run = stages.Measure.run

    def spy(self: stages.Measure, data: stages.MeasureInput) -> Measurements:
        # the level slice's outlines as segmented, before any gate (a gated value leaves no number and no SEG segment)
        seen.update({k: float(m.sum()) for k, m in data.segmentation.slice_seg.masks.items()})
        return measure_run(self, data)

    # the segmenter's parameters go in through the backend's own constructor argument
    with mock.patch.object(stages.Measure, "run", spy), \
            mock.patch.object(pipeline, "ClassicalBackend", lambda: ClassicalBackend(tissue)):
        run_folder(base / "ct", base / "out", {})
    s = json.loads((base / "out" / "summary.json").read_text())
    failed = (s.get("plausibility") or {}).get("failed") or []
    k_true = truth.level_slices.get("L3")
    out: dict[str, tuple[float | None, str]] = {}
    for key in ("psoas_left", "psoas_right"):
        t = float(truth.mask(key)[k_true].sum()) if k_true is not None else 0.0
        err = 100.0 * (seen[key] - t) / t if seen.get(key) and t > 0 else None
        value = (s.get("areas_cm2") or {}).get(key, {})
        gates = sorted({f["gate"] for f in failed if f["key"] == key})
        why = value.get("not_evaluable") if isinstance(value, dict) else None
        status = "filed" if isinstance(value, dict) and value.get("value") is not None else (
            ",".join(gates) or str(why or "") or s.get("reason", ""))
        out[key] = (err, status)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="average habitus, seed 3, four cases")
    ap.add_argument("--rows", type=int, default=512, help="pixels across the 500 mm field (512: ~1 mm pixels)")
    ap.add_argument("--slice-mm", type=float, default=5.0)
    ap.add_argument("--seeds", default="3,7")
    ap.add_argument("--habitus", default="thin,average,obese")
    ap.add_argument("--cases", default="", help="contact:phase pairs (default: " + ",".join(CASES) + ")")
    ap.add_argument("--tissue", default="{}", help="TissueParams fields to override, as JSON")
    a = ap.parse_args()
    overrides = json.loads(a.tissue)
    tissue = dataclasses.replace(TissueParams(), **overrides) if overrides else None
    habs = ["average"] if a.quick else a.habitus.split(",")
    seeds = [3] if a.quick else [int(x) for x in a.seeds.split(",")]
    cases = [c.split(":") for c in (a.cases.split(",") if a.cases else (QUICK if a.quick else CASES))]
    print(f"{'habitus':8s} {'contact':9s} {'phase':5s} {'seed':>4s}  {'psoas left':>30s}  {'psoas right':>30s}")
    with_all = {"wrong filed": 0, "wrong caught": 0, "right filed": 0, "right gated": 0}
    no_trend = dict(with_all)
    by_trend = 0
    # gate -> [wrong, right] values it alone held back
    alone = {"outline": [0, 0], "trend": [0, 0], "continuity at the level": [0, 0]}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-psoas-filed-"))
    try:
        for hab in habs:
            for contact, phase in cases:
                for seed in seeds:
                    r = run_case(tmp / f"{hab}-{contact}-{phase}-{seed}", hab, contact, phase, seed, a.rows, a.slice_mm,
                                 tissue)
                    cells = []
                    for key in ("psoas_left", "psoas_right"):
                        err, status = r[key]
                        cells.append(f"{'-' if err is None else f'{err:+.0f} %':>7s} {status[:22]:>22s}")
                        if err is None:
                            continue
                        wrong, filed = abs(err) > WRONG, status == "filed"
                        with_all[("wrong " if wrong else "right ") + ("filed" if filed else
                                                                       ("caught" if wrong else "gated"))] += 1
                        filed_nt = filed or status == "trend"
                        no_trend[("wrong " if wrong else "right ") + ("filed" if filed_nt else
                                                                       ("caught" if wrong else "gated"))] += 1
                        by_trend += status == "trend"
                        if status in alone:
                            alone[status][0 if wrong else 1] += 1
                    print(f"{hab:8s} {contact:9s} {phase:5s} {seed:4d}  {cells[0]:>30s}  {cells[1]:>30s}", flush=True)
                    shutil.rmtree(tmp / f"{hab}-{contact}-{phase}-{seed}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"psoas values at L3 (wrong = area error beyond {WRONG:.0f} %): every gate: "
          + ", ".join(f"{k} {v}" for k, v in with_all.items()))
    print("                                  without the trend gate: "
          + ", ".join(f"{k} {v}" for k, v in no_trend.items()) + f"  ({by_trend} held back by the trend gate alone)")
    print("held back by one gate alone: " + ", ".join(f"{g} {w} wrong and {r} right" for g, (w, r) in alone.items()))
    print(f"({time.perf_counter() - t0:.0f} s; {a.rows} rows, {a.slice_mm:g} mm slices"
          + (f"; TissueParams {a.tissue}" if tissue is not None else "") + ")")


if __name__ == "__main__":
    main()
