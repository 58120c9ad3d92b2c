"""Psoas major at L3 when the structures that touch it in real patients do: Dice and area per contact.

    PYTHONPATH=$PWD .venv/bin/python bench/psoas_contacts.py [--quick] [--contacts ivc,kidney] [--habitus average]
                                                            [--rows 512] [--slice-mm 5] [--seeds 3,7]

Each row is an anatomical phantom (:mod:`pipelines.body_composition.anatomy_phantom`, L2-L4, seed 3, the
tests' setting) with one psoas contact (``AnatomySpec.psoas_contacts``), none, or all of them together, for
each habitus and phase: non-contrast (C-), portal venous (C+) and arterial (art: the infrarenal IVC not yet
opacified).  The tissue segmenter runs alone on the true L3 middle slice (the truth's vertebral body as the
slice anatomy, as with a reader-confirmed level), and the table prints per psoas side:

- Dice against the truth psoas (with its intramuscular fat, :data:`COMPOSITION`);
- area error % against the truth area;
- "taken": mm2 of the contact's own truth labels (:data:`CONTACT_LABELS`) inside that side's psoas mask;
- "front": mm the psoas mask reaches in front of the vertebral body's anterior surface (negative: behind it; the
  truth's psoas lies 2-5 mm behind it on these phantoms), the left side / the right side;
- "gated": the sides whose area the plausibility gates (``plausibility.toml``: psoas area range, psoas to
  vertebral body ratio, left/right symmetry) would make "not evaluable" instead of filing it.

``--quick`` runs the average habitus only; ``--rows`` (256: ~2 mm pixels, 512: ~1 mm as clinical abdominal CT),
``--slice-mm`` and ``--seeds`` (the intramuscular fat and the noise differ) choose the phantoms.  Nothing here is
tuned: the contacts are placed where anatomy puts them, and a poor number is the finding.
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
    CONTACT_LABELS,
    LABELS,
    PSOAS_CONTACTS,
    AnatomySpec,
    make_anatomy,
)
from pipelines.body_composition.plausibility import apply_gates, load_gates  # noqa: E402
from pipelines.body_composition.tissues import TissueSlicer  # noqa: E402
from pipelines.body_composition.types import L3_KEYS, Value  # noqa: E402

PHASES = {"C-": (False, "portal"), "C+": (True, "portal"), "art": (True, "arterial")}


def measure(habitus: str, phase: str, contacts: tuple[str, ...], rows: int = 256, slice_mm: float = 5.0,
            seed: int = 3) -> dict[str, Any]:
    """Psoas Dice, area error, contact area taken as psoas and reach in front of the vertebral body, per side, at the
    true L3 middle."""
    contrast, cphase = PHASES[phase]
    ph = make_anatomy(AnatomySpec(habitus=habitus, contrast=contrast, contrast_phase=cphase, top="L2",
                                  bottom="L4", seed=seed, rows=rows, slice_mm=slice_mm, psoas_contacts=contacts))
    k, anat = ph.at_level("L3")
    px = ph.spec.pixel_mm
    seg = TissueSlicer().run(ph.hu[k], (px, px), anat)
    lab = ph.labels[k]
    names = sorted({n for c in contacts for n in CONTACT_LABELS[c]})
    contact = np.isin(lab, [LABELS[n] for n in names]) if names else np.zeros(lab.shape, bool)
    out: dict[str, Any] = {}
    cm2 = px * px / 100.0
    hu = ph.hu[k]
    areas = {key: Value(float(seg.masks[key].sum()) * cm2, "cm2") for key in L3_KEYS}
    means = {key: Value(float(hu[seg.masks[key]].mean()) if seg.masks[key].any() else 0.0, "HU") for key in L3_KEYS}
    gated, _, _ = apply_gates("L3", areas, means, seg, load_gates())
    out["gated"] = "".join(n[0].upper() for n in ("left", "right") if gated[f"psoas_{n}"].value is None) or "-"
    for side in ("left", "right"):
        key = f"psoas_{side}"
        t = np.isin(lab, [LABELS[n] for n in COMPOSITION[key]])
        m = seg.masks[key]
        s = int(t.sum()) + int(m.sum())
        out[f"dice_{side}"] = 2.0 * float((t & m).sum()) / s if s else float("nan")
        out[f"area_{side}"] = 100.0 * (float(m.sum()) - float(t.sum())) / float(t.sum())
        out[f"taken_{side}"] = float((m & contact).sum()) * px * px
        # mm in front of the vertebral body's anterior surface (rows grow toward the back)
        rr = np.nonzero(m.any(axis=1))[0]
        front = (anat.centre_rc[0] - float(rr[0])) * px - anat.half_height_mm if rr.size else float("nan")
        out[f"front_{side}"] = front
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="average habitus only")
    ap.add_argument("--habitus", default="", help="comma-separated habitus (default thin,average,obese)")
    ap.add_argument("--contacts", default="", help="comma-separated contacts (default: none, each, all)")
    ap.add_argument("--phases", default="C-,C+,art")
    ap.add_argument("--rows", type=int, default=256, help="pixels across the 500 mm field (512: ~1 mm pixels)")
    ap.add_argument("--slice-mm", type=float, default=5.0)
    ap.add_argument("--seeds", default="3", help="comma-separated phantom seeds")
    args = ap.parse_args()
    habs = args.habitus.split(",") if args.habitus else (["average"] if args.quick else ["thin", "average", "obese"])
    rows: list[tuple[str, tuple[str, ...]]] = [("none", ())]
    if args.contacts:
        rows += [(c, (c,)) if c != "all" else ("all", PSOAS_CONTACTS) for c in args.contacts.split(",")]
    else:
        rows += [(c, (c,)) for c in PSOAS_CONTACTS] + [("all", PSOAS_CONTACTS)]
    phases = args.phases.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    print(f"{'contact':10s} {'habitus':8s} {'phase':5s} {'seed':>4s} {'Dice L':>7s} {'Dice R':>7s} {'area L%':>8s}"
          f" {'area R%':>8s} {'taken L':>8s} {'taken R':>8s} {'front mm':>11s} {'gated':>5s}")
    t0 = time.perf_counter()
    worst: dict[str, float] = {}
    for name, contacts in rows:
        for hab in habs:
            for phase in phases:
                for seed in seeds:
                    r = measure(hab, phase, contacts, args.rows, args.slice_mm, seed)
                    flag = " <" if min(r["dice_left"], r["dice_right"]) < 0.90 else ""
                    front = f"{r['front_left']:+.0f}/{r['front_right']:+.0f}"
                    print(f"{name:10s} {hab:8s} {phase:5s} {seed:4d} {r['dice_left']:7.3f} {r['dice_right']:7.3f} "
                          f"{r['area_left']:+8.1f} {r['area_right']:+8.1f} {r['taken_left']:8.0f} "
                          f"{r['taken_right']:8.0f} {front:>11s} {r['gated']:>5s}{flag}", flush=True)
                    worst[name] = min(worst.get(name, 1.0), r["dice_left"], r["dice_right"])
    print("lowest psoas Dice per contact: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
    print(f"({time.perf_counter() - t0:.0f} s; taken = mm2 of the contact's truth labels inside the psoas mask; "
          f"< marks a Dice below 0.90)")


if __name__ == "__main__":
    main()
