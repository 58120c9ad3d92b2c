"""Body-composition pipeline against the anatomical phantoms' truth (levels, Dice, areas, laterality).

    .venv/bin/python bench/body_composition_phantom.py [--quick] [--full] [--keep DIR] [--options JSON]

Each variant (habitus thin/average/obese, contrast on/off, geometry HFS / mirrored rows / HFP /
FFS) is built by :mod:`pipelines.body_composition.anatomy_phantom` around the real VerSe T9-L5
spine (sacrum and pelvis synthesised), written as a DICOM CT series and run through
``run_folder``.  The table prints, per variant:

- level found and its slice offset from the truth (middle of the L3 body, in slices);
- Dice of each segment at the slice the pipeline measured (against the truth on that slice), read
  from the pipeline's SEG (frames matched to the CT by SOP Instance UID, so any geometry works);
- area error % of each segment against the truth area at the true L3 middle (what a reader gets; "-" where
  the gates made the value "not evaluable", and the row ends with "gated:" and each gate that did);
- laterality: the SEG's "left" psoas and erector lie on the patient's left (LPS +x).

``--full`` writes 512 x 512 images at 1 mm (about 300 slices) instead of 256 x 256 at 5 mm.
``--quick`` runs 4 variants instead of 12.  Nothing here is tuned: the phantom is built from
anatomy, not from the algorithm, and a poor number is the finding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from pipelines.body_composition.anatomy_phantom import (  # noqa: E402
    AnatomySpec,
    Geometry,
    SeriesTruth,
    make_anatomy,
    write_series,
)

KEYS = ("skeletal_muscle", "psoas_left", "psoas_right", "erector_left", "erector_right", "sat", "vat", "imat")


def _key_of(label: str) -> str | None:
    s = label.lower()
    side = "left" if "left" in s else ("right" if "right" in s else "")
    if "skeletal" in s:
        return "skeletal_muscle"
    if "psoas" in s and side:
        return f"psoas_{side}"
    if ("erector" in s or "autochthon" in s or "paraspinal" in s) and side:
        return f"erector_{side}"
    if "subcutaneous" in s:
        return "sat"
    if "visceral" in s:
        return "vat"
    if "intermuscular" in s:
        return "imat"
    return None


def seg_masks(seg_path: Path, truth: SeriesTruth) -> dict[str, np.ndarray[Any, Any]]:
    """SEG segments as (written slices, rows, columns) masks aligned to the truth."""
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array
    if frames.ndim == 2:
        frames = frames[None]
    names = {int(s.SegmentNumber): _key_of(str(s.SegmentLabel)) for s in ds.SegmentSequence}
    out: dict[str, np.ndarray[Any, Any]] = {}
    index = {uid: i for i, uid in enumerate(truth.sop_uids)}
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    labelmap = str(ds.get("SegmentationType", "")) == "LABELMAP"

    def group(item: Any, kw: str) -> Any:
        if kw in item:
            return item[kw].value[0]
        if shared is not None and kw in shared:
            return shared[kw].value[0]
        return None

    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = group(item, "DerivationImageSequence")
        if src is None:
            continue
        uid = str(src.SourceImageSequence[0].ReferencedSOPInstanceUID)
        if labelmap:  # pixel values are segment numbers
            i = index.get(uid)
            for seg_no, key in names.items():
                if key is not None and i is not None:
                    m = out.setdefault(key, np.zeros(truth.labels.shape, dtype=bool))
                    m[i] |= frames[f] == seg_no
            continue
        ident = group(item, "SegmentIdentificationSequence")
        key = names.get(int(ident.ReferencedSegmentNumber)) if ident is not None else None
        if key is None:
            continue
        i = index.get(uid)
        if i is None:
            continue
        m = out.setdefault(key, np.zeros(truth.labels.shape, dtype=bool))
        m[i] |= frames[f].astype(bool)
    return out


def dice(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float((a & b).sum()) / s if s else float("nan")


def tissues_at_true_level(ph: object, truth: SeriesTruth) -> dict[str, object]:
    """The segmenter alone on the true L3 middle slice (as with a reader-confirmed level).

    Uses the stage API (``ClassicalBackend.segment_slice`` with the truth's vertebral body as the
    slice anatomy); the truth is sampled at the read volume's voxel centres in LPS, so it is right
    for any stored orientation.  Returns {} when that API is not there (it is being rewritten).
    """
    from pipelines.body_composition.anatomy_phantom import COMPOSITION, LABELS, Anatomy
    from pipelines.common.volume import SeriesToVolume

    assert isinstance(ph, Anatomy)
    try:
        from pipelines.body_composition.stages import ClassicalBackend
        from pipelines.body_composition.types import SliceAnatomy
    except ImportError:
        return {}
    vol = SeriesToVolume().run(truth.files)
    if hasattr(vol, "canonical_axial"):
        vol = vol.canonical_axial()[0]
    zs = np.array([s.position[2] for s in vol.slices])
    lv = "C3" if ph.spec.region == "neck" else "L3"
    k = int(np.argmin(np.abs(zs - ph.level_z[lv])))
    bx, by, _, hw, hd = ph.bodies[lv]
    _, r, c = vol.world_to_index((bx, by, zs[k]))
    try:
        seg = ClassicalBackend().segment_slice(vol.hu[k], vol.pixel_spacing, SliceAnatomy((r, c), hw, hd,
                                                  ribs_possible=None if lv == "C3" else False))
    except Exception as e:  # the stage is being rewritten in parallel: report, do not fail the bench
        return {"error": f"{type(e).__name__}: {e}"[:80]}
    rows, cols = vol.hu.shape[1:]
    rr, cc = np.mgrid[:rows, :cols]
    pts = (vol.slices[k].position + cc[..., None] * vol.pixel_spacing[1] * vol.row_direction
           + rr[..., None] * vol.pixel_spacing[0] * vol.column_direction)
    tl = ph.labels_at(pts)
    out: dict[str, object] = {}
    area_px = vol.pixel_spacing[0] * vol.pixel_spacing[1] / 100.0
    for key in KEYS:
        tkey = "c3_muscle" if (key == "skeletal_muscle" and lv == "C3") else key  # Swartz 2016 at C3
        t = np.isin(tl, [LABELS[n] for n in COMPOSITION[tkey]])
        p = seg.masks.get(key)
        if p is None:
            continue
        out[f"dice_{key}"] = dice(p, t)
        ta = float(t.sum()) * area_px
        out[f"area_{key}"] = 100.0 * (float(p.sum()) * area_px - ta) / ta if ta > 0 else None
    # laterality of the segmenter's left masks in LPS
    lat = []
    for key in ("psoas_left", "erector_left", "psoas_right", "erector_right"):
        p = seg.masks.get(key)
        if p is not None and p.any():
            x = float(pts[..., 0][p].mean())
            lat.append((x > 0) == key.endswith("left"))
    out["laterality"] = ("ok" if all(lat) else "WRONG") if lat else "n/a"
    out["offset"] = 0.0
    out["level"] = f"{lv}*"
    return out


def run_variant(base: Path, spec: AnatomySpec, geometry: Geometry, options: dict[str, object],
                cache: dict[AnatomySpec, object]) -> dict[str, object]:
    from pipelines.body_composition.pipeline import run_folder

    ph = cache.get(spec)
    if ph is None:
        ph = cache[spec] = make_anatomy(spec)
    name = (f"{spec.habitus}-{'c' if spec.contrast else 'nc'}-{geometry.position}"
            f"{'-mirror' if geometry.mirror_rows else ''}{'-' + spec.spine if spec.region == 'neck' else ''}")
    d = base / name
    truth = write_series(ph, d / "ct", geometry)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    run_folder(d / "ct", d / "out", options)
    wall = time.perf_counter() - t0
    s = json.loads((d / "out" / "summary.json").read_text())
    row: dict[str, object] = {"variant": name, "wall_s": wall, "level": s.get("level"), "slices": len(truth.files)}
    lv = "C3" if spec.region == "neck" else "L3"
    k_true = truth.level_slices.get(lv)
    sop_of = None
    if s.get("slice_index") is not None and s.get("seg"):
        segs = seg_masks(d / "out" / str(s["seg"]), truth)
        used = sorted({int(i) for m in segs.values() for i in np.nonzero(m.any(axis=(1, 2)))[0]})
        # the level slice: the one slice that holds the skeletal-muscle segment
        sm = segs.get("skeletal_muscle")
        k_found = int(np.nonzero(sm.any(axis=(1, 2)))[0][0]) if sm is not None and sm.any() else (
            used[0] if used else None)
        sop_of = k_found
        if k_found is not None and k_true is not None:
            row["offset"] = (truth.positions[k_found][2] - truth.positions[k_true][2]) / truth.slice_mm
        for key in KEYS:
            t_mask = truth.mask("c3_muscle" if (key == "skeletal_muscle" and lv == "C3") else key)
            p = segs.get(key)
            if p is None or k_found is None:
                continue
            row[f"dice_{key}"] = dice(p[k_found], t_mask[k_found])
            ta = float(t_mask[k_true].sum()) * truth.pixel_area_mm2 / 100.0 if k_true is not None else float("nan")
            pa = s["areas_cm2"].get(key, {}).get("value")
            row[f"area_{key}"] = (100.0 * (pa - ta) / ta) if (pa is not None and ta > 0) else None
        # laterality in LPS: mean x of the SEG's "left" masks must be > 0 (patient's left)
        lat = []
        for key in ("psoas_left", "erector_left", "psoas_right", "erector_right"):
            p = segs.get(key)
            if p is None or not p.any():
                continue
            ii, rr, cc = np.nonzero(p)
            x = float((truth.positions[ii][:, 0] + cc * truth.pixel_mm * truth.row_direction[0]).mean())
            lat.append((x > 0) == key.endswith("left"))
        row["laterality"] = ("ok" if all(lat) else "WRONG") if lat else "n/a"
        # what the gates kept out of the SR: the Dice columns read the SEG, so a value made "not evaluable" shows only
        # here (and as "-" in its A% column)
        failed = (s.get("plausibility") or {}).get("failed") or []
        row["gated"] = ", ".join(sorted({f"{f['key']} ({f['gate']})" for f in failed}))
    else:
        why = s.get("reason") or "; ".join(f"{k}: {v.get('not_evaluable')}" for k, v in (s.get("areas_cm2") or {}).items()
                                           if isinstance(v, dict) and v.get("not_evaluable"))
        row["reason"] = str(why or "no SEG written")[:110]
    row["k_found"] = sop_of
    row["given"] = tissues_at_true_level(ph, truth)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="512 x 512, 1 mm slices (about 300)")
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--options", default="{}")
    a = ap.parse_args(argv)
    base = a.keep or Path(tempfile.mkdtemp(prefix="bench-anat-"))
    size = dict(rows=512, slice_mm=1.0) if a.full else dict(rows=256, slice_mm=5.0)
    geoms = [Geometry("HFS"), Geometry("HFS", mirror_rows=True), Geometry("HFP"), Geometry("FFS")]
    variants: list[tuple[AnatomySpec, Geometry]] = []
    if a.quick:
        variants = [(AnatomySpec(habitus="average", **size), g) for g in geoms]  # type: ignore[arg-type]
    else:
        for hab in ("thin", "average", "obese"):
            for contrast in (True, False):
                spec = AnatomySpec(habitus=hab, contrast=contrast, seed=3, **size)  # type: ignore[arg-type]
                gs = geoms if (hab == "average" and contrast) else [Geometry("HFS")]
                variants += [(spec, g) for g in gs]
        variants.append((AnatomySpec(habitus="average", rib_pairs=11, **size), Geometry("HFS")))  # type: ignore[arg-type]
        variants.append((AnatomySpec(habitus="average", sacralised_l5=True, **size), Geometry("FFS", True)))  # type: ignore[arg-type]
        neck = dict(rows=size["rows"], slice_mm=min(float(size["slice_mm"]), 3.0))
        for spine in ("gl003", "gl017"):
            for gn in (Geometry("HFS"), Geometry("HFS", mirror_rows=True)):
                variants.append((AnatomySpec(region="neck", spine=spine, **neck), gn))  # type: ignore[arg-type]
    cache: dict[AnatomySpec, object] = {}
    rows = []
    for spec, geo in variants:
        t0 = time.perf_counter()
        r = run_variant(base, spec, geo, json.loads(a.options), cache)
        extra = ("-11ribs" if spec.rib_pairs == 11 else "") + ("-LSTV" if spec.sacralised_l5 else "") + (
            f"-neck-{spec.spine}" if spec.region == "neck" else "")
        r["variant"] = str(r["variant"]) + extra
        rows.append(r)
        print(f"... {r['variant']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    def f(v: object, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) and v == v else "-"

    head = f"{'variant':<34}{'level':>6}{'off':>6} {'lat':>5}"
    short = {"skeletal_muscle": "SM", "psoas_left": "PsL", "psoas_right": "PsR", "erector_left": "ErL",
             "erector_right": "ErR", "sat": "SAT", "vat": "VAT", "imat": "IMAT"}
    print(head + "".join(f"{'D ' + short[k]:>8}" for k in KEYS) + "".join(f"{'A% ' + short[k]:>9}" for k in KEYS))
    for r in rows:
        line = f"{str(r['variant']):<34}{str(r.get('level') or '-'):>6}{f(r.get('offset'), '+.1f'):>6} " \
               f"{str(r.get('laterality', '-')):>5}"
        line += "".join(f"{f(r.get('dice_' + k), '.2f'):>8}" for k in KEYS)
        line += "".join(f"{f(r.get('area_' + k), '+.0f'):>9}" for k in KEYS)
        if r.get("reason"):
            line += f"  not evaluable: {r['reason']}"
        elif r.get("gated"):
            line += f"  gated: {r['gated']}"
        print(line)
    print(f"(phantoms and outputs in {base}; 'off' = found minus true L3 (neck: C3) middle, in slices; D = Dice at the "
          "measured slice; A% = area error against the true level middle; at C3 'SM' truth is SCM + paravertebral, Swartz 2016)")
    print()
    print("Tissue segmentation alone at the true L3 / C3 middle (level given, as a reader-confirmed level would):")
    print(head + "".join(f"{'D ' + short[k]:>8}" for k in KEYS) + "".join(f"{'A% ' + short[k]:>9}" for k in KEYS))
    for r in rows:
        g = r.get("given") or {}
        assert isinstance(g, dict)
        line = f"{str(r['variant']):<34}{str(g.get('level') or '-'):>6}{'':>6} {str(g.get('laterality', '-')):>5}"
        line += "".join(f"{f(g.get('dice_' + k), '.2f'):>8}" for k in KEYS)
        line += "".join(f"{f(g.get('area_' + k), '+.0f'):>9}" for k in KEYS)
        if g.get("error"):
            line += f"  {g['error']}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
