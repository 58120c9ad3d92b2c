"""Weight-free backend: HU windows plus anatomical reasoning (CPU, no model files).

Level finding: bone (HU > ``bone_hu``) is projected along the stack to find the spine
column; per slice the bone area around it separates vertebral bodies from discs; runs of
bone slices are vertebrae.  Landmarks name them: the sacrum (a vertebral run whose bone
component is far wider than a vertebral body) and rib-bearing vertebrae (a separate bone
component whose nearest point lies within ``rib_gap_mm`` of the vertebra).  L5 is the run
above the sacrum, T12 the lowest rib-bearing run with a rib-free run below it, T1 the
highest rib-bearing run with a rib-free run above it; the rest are counted from them.

Slice segmentation: body = largest non-air component; fat -190..-30 HU, muscle -29..150 HU
(Mitsiopoulos 1998 windows).  The abdominal envelope is the filled region enclosed by the
non-fat tissue inside the skin; SAT is fat outside it.  Skeletal muscle is muscle-HU tissue
in the wall (connected to the envelope's rim) and in the compartments named relative to the
vertebra: psoas (beside the vertebral body) and erector spinae (beside the spinous process,
behind the vertebra).  IMAT is fat enclosed by muscle; VAT is the remaining fat inside the
envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pipelines.body_composition.types import (
    NAMED_MUSCLES,
    SEGMENT_KEYS,
    LevelResult,
    SliceAnatomy,
    SliceSegmentation,
    Vertebra,
)
from pipelines.common.volume import Volume

log = logging.getLogger(__name__)

ORDER = (["S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)]
         + [f"C{i}" for i in range(7, 1, -1)])


@dataclass(frozen=True)
class ClassicalParams:
    bone_hu: float = 200.0
    spine_roi_mm: float = 20.0
    min_vertebra_mm: float = 8.0
    sacrum_width_factor: float = 2.5
    rib_gap_mm: float = 15.0
    fat_hu: tuple[float, float] = (-190.0, -30.0)
    muscle_hu: tuple[float, float] = (-29.0, 150.0)
    skin_mm: float = 4.0
    close_mm: float = 4.0
    psoas_lateral_mm: float = 70.0
    erector_lateral_mm: float = 70.0
    imat_max_hole_mm2: float = 1000.0
    named_core_max_hu: float = 100.0  # stricter window for separating named muscles from enhancing organs
    core_smooth_max_hu: float = 80.0  # ... applied to a lightly smoothed image (sigma core_smooth_mm) as well
    core_smooth_mm: float = 1.0
    envelope_min_lat_mm: float = 8.0  # bone this far from the midline (laminae, transverse processes, ribs)
    envelope_max_depth_mm: float = 70.0  # ... and at most this far behind the vertebral body centre + half height
    floor_hold_mm: float = 10.0  # the floor beyond the vertebra's outermost bone is held at its last 10 mm
    rib_margin_mm: float = 5.0  # erector spinae stays medial to the rib angle (+ this margin)
    rib_angle_min_lat_mm: float = 40.0  # a rib angle lies this far or more from the midline
    erector_open_mm: float = 4.0  # thinner sheets (latissimus dorsi, serratus posterior) are cut off the erector
    min_bone_piece_mm2: float = 20.0  # smaller pieces above bone_hu are vessels or noise, not a bony landmark
    bridge_mm: float = 2.0  # connections thinner than about twice this are cut between components  # larger fat regions enclosed by muscle are visceral (the cavity)


def _disk(radius_px: float) -> NDArray[np.bool_]:
    r = max(1, int(np.ceil(radius_px)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(xx**2 + yy**2 <= radius_px**2 + 1e-9)


def fill_holes(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """Binary hole filling by labelling the background once (much faster than iterative dilation)."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([lab[0, :], lab[-1, :], lab[:, 0], lab[:, -1]]))
    keep = np.zeros(n + 1, bool)
    keep[border] = True
    keep[0] = True
    return np.asarray(mask | ~keep[lab])


def _erode(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Erosion by a disk, via the distance transform for large radii."""
    if radius_px <= 1.5:
        return np.asarray(ndi.binary_erosion(mask, _disk(radius_px)))
    return np.asarray(ndi.distance_transform_edt(mask) > radius_px)


def _dilate(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    if radius_px <= 1.5:
        return np.asarray(ndi.binary_dilation(mask, _disk(radius_px)))
    return np.asarray(ndi.distance_transform_edt(~mask) <= radius_px)


def _open(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Opening by a disk; via distance transforms for larger radii (far cheaper than binary_opening)."""
    if radius_px <= 1.5:
        return np.asarray(ndi.binary_opening(mask, _disk(radius_px)))
    return _dilate(_erode(mask, radius_px), radius_px)


def _runs(flags: NDArray[np.bool_]) -> list[tuple[int, int]]:
    out = []
    k = 0
    n = len(flags)
    while k < n:
        if flags[k]:
            j = k
            while j + 1 < n and flags[j + 1]:
                j += 1
            out.append((k, j))
            k = j + 1
        else:
            k += 1
    return out


class ClassicalLevelFinder:
    """Find and name vertebrae in a volume by counting from landmarks."""

    def __init__(self, params: ClassicalParams | None = None) -> None:
        params = params or ClassicalParams()
        self.p = params

    def vertebrae(self, vol: Volume) -> tuple[list[Vertebra], tuple[float, float], list[str]]:
        """Vertebral runs (unnamed landmarks flagged), the spine centre (row, col), notes."""
        p = self.p
        bone = vol.hu > p.bone_hu
        dy, dx = vol.pixel_spacing
        notes: list[str] = []
        count = bone.sum(axis=0).astype(np.float32)
        count = ndi.gaussian_filter(count, sigma=(10.0 / dy, 10.0 / dx))
        if count.max() <= 0:
            return [], (0.0, 0.0), ["no bone in the series"]
        r0, c0 = np.unravel_index(int(np.argmax(count)), count.shape)
        yy, xx = np.mgrid[0 : vol.shape[1], 0 : vol.shape[2]]
        roi = ((yy - r0) * dy) ** 2 + ((xx - c0) * dx) ** 2 <= p.spine_roi_mm**2
        signal = bone[:, roi].sum(axis=1).astype(np.float64) * dy * dx
        ref = float(np.percentile(signal, 90)) if signal.size else 0.0
        flags = signal > 0.3 * ref if ref > 0 else np.zeros(len(signal), bool)
        runs = [(a, b) for a, b in _runs(flags) if (b - a + 1) * vol.slice_spacing >= p.min_vertebra_mm
                or a == 0 or b == len(flags) - 1]
        verts: list[Vertebra] = []
        # per-run analysis on a crop around the spine, on a few slices per run
        ra, rb = max(0, int(r0 - 80.0 / dy)), min(vol.shape[1], int(r0 + 100.0 / dy) + 1)
        ca, cb = max(0, int(c0 - 130.0 / dx)), min(vol.shape[2], int(c0 + 130.0 / dx) + 1)
        roi_c = roi[ra:rb, ca:cb]
        for a, b in runs:
            width = 0.0
            ribs = False
            body_c: list[tuple[float, float]] = []
            half_w: list[float] = []
            half_h: list[float] = []
            sample = sorted(set(np.linspace(a, b, num=min(5, b - a + 1)).round().astype(int).tolist()))
            for k in sample:
                bk = bone[k, ra:rb, ca:cb]
                lab, n = ndi.label(bk)
                if n == 0:
                    continue
                spine_ids = np.unique(lab[roi_c & bk])
                spine_ids = spine_ids[spine_ids > 0]
                if spine_ids.size == 0:
                    continue
                spine = np.isin(lab, spine_ids)
                cols = np.nonzero(spine.any(axis=0))[0]
                width = max(width, float(cols[-1] - cols[0] + 1) * dx)
                body = spine & roi_c
                rr, cc = np.nonzero(body)
                body_c.append((float(rr.mean()) + ra, float(cc.mean()) + ca))
                half_w.append((cc.max() - cc.min() + 1) * dx / 2.0)
                half_h.append((rr.max() - rr.min() + 1) * dy / 2.0)
                if not ribs and n > spine_ids.size:
                    dist = ndi.distance_transform_edt(~spine, sampling=(dy, dx))
                    near = ndi.minimum(dist, lab, index=np.arange(1, n + 1))
                    for i in range(1, n + 1):
                        if i in spine_ids or float(near[i - 1]) > p.rib_gap_mm:
                            continue
                        _, ccc = np.nonzero(lab == i)
                        if abs(float(ccc.mean()) + ca - c0) * dx > 15.0:
                            ribs = True
                            break
            if not body_c:
                continue
            centre = (float(np.median([c[0] for c in body_c])), float(np.median([c[1] for c in body_c])))
            verts.append(Vertebra(name="", first=a, last=b, width_mm=width, rib_bearing=ribs,
                                  centre_rc=centre, half_width_mm=float(np.median(half_w)),
                                  half_height_mm=float(np.median(half_h)),
                                  touches_edge=a == 0 or b == len(flags) - 1))
        return verts, (float(r0), float(c0)), notes

    def name(self, verts: list[Vertebra]) -> tuple[list[Vertebra], list[str]]:
        """Name vertebral runs by counting from the sacrum and the rib-bearing vertebrae."""
        p = self.p
        notes: list[str] = []
        if not verts:
            return verts, ["no vertebrae found"]
        widths = [v.width_mm for v in verts if not v.touches_edge] or [v.width_mm for v in verts]
        median_w = float(np.median(widths))
        anchors: dict[str, int] = {}
        # sacrum: lowest runs much wider than a vertebral body
        sacral = [i for i, v in enumerate(verts) if v.width_mm > p.sacrum_width_factor * min(widths)]
        if sacral and sacral[0] == 0:
            top = 0
            while top + 1 in sacral:
                top += 1
            if top + 1 < len(verts):
                anchors["sacrum"] = ORDER.index("L5") - (top + 1)
                notes.append(f"sacrum at slices {verts[top].first}-{verts[top].last}")
        ribs = [v.rib_bearing for v in verts]
        for i in range(len(verts) - 1):
            if ribs[i + 1] and not ribs[i] and not any(ribs[: i + 1]):
                anchors["T12"] = ORDER.index("T12") - (i + 1)
                notes.append(f"lowest rib-bearing vertebra (T12) at slices {verts[i + 1].first}-{verts[i + 1].last}")
                break
        for i in range(len(verts) - 1, 0, -1):
            if ribs[i - 1] and not ribs[i] and not any(ribs[i:]) and "T12" not in anchors:
                anchors["T1"] = ORDER.index("T1") - (i - 1)
                notes.append(f"highest rib-bearing vertebra (T1) at slices {verts[i - 1].first}-{verts[i - 1].last}")
                break
        del median_w
        if not anchors:
            return [], ["no landmark (sacrum or rib-bearing vertebra) in the field of view: cannot count vertebrae"]
        offsets = set(anchors.values())
        if len(offsets) > 1:
            return [], [f"landmarks disagree ({anchors}): transitional vertebra suspected, level not named"]
        off = offsets.pop()
        named = []
        for i, v in enumerate(verts):
            j = i + off
            nm = ORDER[j] if 0 <= j < len(ORDER) else "?"
            named.append(Vertebra(**{**v.__dict__, "name": nm}))
        return named, notes

    def run(self, vol: Volume, levels: Sequence[str]) -> LevelResult:
        verts, centre, notes = self.vertebrae(vol)
        named, notes2 = self.name(verts)
        notes = notes + notes2
        for level in levels:
            for v in named:
                if v.name == level:
                    if v.touches_edge:
                        notes.append(f"{level} touches the edge of the field of view")
                        continue
                    return LevelResult(level=level, slice_index=(v.first + v.last) // 2, vertebrae=tuple(named),
                                       spine_centre_rc=centre, notes=tuple(notes), method="classical")
        if named:
            seen = ", ".join(v.name for v in named)
            notes.append(f"{' or '.join(levels)} not in the field of view (vertebrae seen: {seen})")
        return LevelResult(level=None, slice_index=None, vertebrae=tuple(named), spine_centre_rc=centre,
                           notes=tuple(notes), method="classical")


def anatomy_for_slice(level: LevelResult, k: int) -> SliceAnatomy:
    """Vertebral body centre and size at slice ``k`` (nearest named vertebra)."""
    best = min(level.vertebrae, key=lambda v: 0 if v.first <= k <= v.last else min(abs(k - v.first), abs(k - v.last)))
    return SliceAnatomy(centre_rc=best.centre_rc, half_width_mm=best.half_width_mm, half_height_mm=best.half_height_mm)


def named_muscles(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
                  p: ClassicalParams) -> dict[str, NDArray[np.bool_]]:
    """Psoas and erector spinae, left and right, found relative to the vertebra.

    Works on a crop around the vertebral body (cheap enough for every slice of the lumbar
    spine).  Each muscle is the muscle-HU component in its compartment nearest its seed:
    psoas beside the vertebral body, erector spinae beside the spinous process behind it.
    """
    dy, dx = spacing
    r0, c0 = anat.centre_rc
    hw, hh = anat.half_width_mm, anat.half_height_mm
    lat_max = max(hw + p.psoas_lateral_mm, p.erector_lateral_mm) + 5.0
    top, bottom = -hh - 50.0, hh + 120.0
    ra = max(0, int(np.floor(r0 + top / dy)))
    rb = min(hu.shape[0], int(np.ceil(r0 + bottom / dy)) + 1)
    ca = max(0, int(np.floor(c0 - lat_max / dx)))
    cb = min(hu.shape[1], int(np.ceil(c0 + lat_max / dx)) + 1)
    crop = hu[ra:rb, ca:cb]
    out = {k: np.zeros(hu.shape, bool) for k in NAMED_MUSCLES}
    if crop.size == 0:
        return out
    soft = (crop >= p.muscle_hu[0]) & (crop <= p.muscle_hu[1])
    bone = crop > p.muscle_hu[1]
    soft &= ~fill_holes(np.asarray(ndi.binary_closing(bone, _disk(1.5))))
    bone_env = crop > p.bone_hu
    ymm = ((np.arange(ra, rb) - r0) * dy)[:, None]
    xmm = ((np.arange(ca, cb) - c0) * dx)[None, :]

    # components are separated on a stricter window and with thin bridges cut, so enhancing
    # organs (liver, spleen) and the diaphragm crura do not join a muscle; the chosen core is
    # then grown back into the full muscle window
    strict = soft & (crop <= p.named_core_max_hu)
    if p.core_smooth_mm > 0:
        # enhancing liver, spleen and kidney sit at 80-150 HU, muscle at 20-60 HU: on a lightly smoothed
        # image (noise down) the organ interior leaves the core window while muscle stays in it
        smooth = ndi.gaussian_filter(crop, sigma=(p.core_smooth_mm / dy, p.core_smooth_mm / dx))
        strict &= smooth <= p.core_smooth_max_hu
    bridge_px = p.bridge_mm / float(np.sqrt(dy * dx))

    def pick(region_full: NDArray[np.bool_], seed: tuple[float, float], max_dist_mm: float = 25.0,
             largest: bool = False, open_px: float = 0.0) -> NDArray[np.bool_]:
        out_full = np.zeros(crop.shape, bool)
        rows, cols = np.nonzero(region_full.any(axis=1))[0], np.nonzero(region_full.any(axis=0))[0]
        if rows.size == 0:
            return out_full
        # everything below runs on the region's bounding box only (the result lies inside it)
        bb = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        region, ym, xm = region_full[bb], ymm[bb[0]], xmm[:, bb[1]]
        # openings by disks compose to the larger one, so the wider erector opening replaces the bridge cut
        r_open = max(bridge_px, open_px)
        cand = (_open(strict[bb], r_open) if r_open >= 1.0 else strict[bb]) & region
        cl, cn = ndi.label(cand)
        if cn == 0:
            return out_full
        # labelled pixels near the seed, searched in a window around it
        sr_, sc_ = (seed[1] - ym[0, 0]) / dy, (seed[0] - xm[0, 0]) / dx
        wa, wb = max(0, int(sr_ - max_dist_mm / dy)), min(cl.shape[0], int(sr_ + max_dist_mm / dy) + 2)
        va, vb = max(0, int(sc_ - max_dist_mm / dx)), min(cl.shape[1], int(sc_ + max_dist_mm / dx) + 2)
        if wa >= wb or va >= vb:
            return out_full
        win = cl[wa:wb, va:vb]
        dist = np.hypot(xm[:, va:vb] - seed[0], ym[wa:wb, :] - seed[1])
        near = (dist <= max_dist_mm) & (win > 0)
        if not near.any():
            return out_full
        if largest:  # the biggest muscle mass inside the search disc (thin strips beside it lose)
            ids = np.unique(win[near])
            best = ids[int(np.argmax(ndi.sum_labels(near, win, index=ids)))]
        else:
            best = win[near][int(np.argmin(dist[near]))]
        core = cl == best
        grow = max(1.0, max(bridge_px, open_px) + 1.0)
        grown = _dilate(core, grow) & soft[bb] & region
        if open_px > bridge_px:
            # after a wider opening, grow back only what is joined to the core (not across a fat plane)
            gl, _ = ndi.label(grown)
            ids = np.unique(gl[core & grown])
            grown = np.isin(gl, ids[ids > 0])
        out_full[bb] = grown
        return out_full

    for side, sgn in (("left", 1.0), ("right", -1.0)):
        lat = sgn * xmm
        psoas_box = (lat > hw * 0.5) & (lat < hw + p.psoas_lateral_mm) & (ymm > -hh - 45.0) & (ymm < hh + 20.0)
        erector_box = (lat > 0.0) & (lat < p.erector_lateral_mm) & (ymm > hh + 12.0)
        erector_box &= _posterior_compartment(bone_env, ymm, lat, hh, dy * dx, p)
        out[f"psoas_{side}"][ra:rb, ca:cb] = pick(np.asarray(psoas_box), (sgn * (hw + 20.0), 0.0))
        # erector spinae: the largest muscle mass of the posterior compartment near its usual place
        out[f"erector_{side}"][ra:rb, ca:cb] = pick(np.asarray(erector_box), (sgn * 40.0, hh + 35.0), 35.0, True,
                                                    p.erector_open_mm / float(np.sqrt(dy * dx)))
    return out


def _posterior_compartment(bone: NDArray[np.bool_], ymm: NDArray[np.floating[Any]], lat: NDArray[np.floating[Any]],
                           hh: float, px_area_mm2: float, p: ClassicalParams) -> NDArray[np.bool_]:
    """Where one side's erector spinae may lie: behind the posterior bony envelope, medial to the rib angle.

    Anatomy: the erector spinae (and transversospinales) fill the groove behind the laminae and
    transverse processes, and in the thorax behind the rib necks, medial to the rib angles; the
    liver, kidney and quadratus lumborum lie in front of that bony floor.  Per column, the floor is
    the most posterior bone pixel (laminae, transverse processes, ribs; the spinous process in the
    midline is left out), linearly interpolated across columns without bone and held constant
    beyond the outermost one.  A bone component that is not joined to the vertebra in this slice
    (a rib, or the iliac crest low in the lumbar spine) bounds the compartment laterally at its
    most posterior point (the rib angle).  Without lateral bone (a disc slice) nothing is removed.
    """
    side = (lat > p.envelope_min_lat_mm) & (ymm > -hh) & (ymm < hh + p.envelope_max_depth_mm)
    b = bone & side
    ok = np.ones(bone.shape, bool)
    if not b.any():
        return ok
    # enhancing vessels (segmental, intercostal) are small: keep bone pieces of rib size and up
    lab, n = ndi.label(b)
    sizes = ndi.sum_labels(np.ones(b.shape), lab, index=np.arange(1, n + 1)) * px_area_mm2
    b = np.concatenate([[False], sizes >= p.min_bone_piece_mm2])[lab]
    if not b.any():
        return ok
    # pieces less than ~2 mm apart (a transverse process split by partial volume) count as one
    join = max(1.0, 1.0 / float(np.sqrt(px_area_mm2)))
    lab, n = ndi.label(_dilate(b, join))
    lab = np.where(b, lab, 0)
    medial_lat = ndi.minimum(np.broadcast_to(lat, b.shape), lab, index=np.arange(1, n + 1))
    # pieces joined to the vertebra reach the midline cut (body, lamina: a few mm apart at most)
    vert_ids = np.nonzero(medial_lat <= float(medial_lat.min()) + 3.0)[0] + 1
    vmask = np.isin(lab, vert_ids)
    lat_row = lat[0]
    ymm_b = np.broadcast_to(ymm, b.shape)
    cols = np.nonzero(b.any(axis=0))[0]
    ys = np.where(b, ymm_b, -np.inf).max(axis=0)[cols]
    # lateral to the vertebra's outermost bone (transverse process tip, or the pedicle between
    # processes) the floor is held at the most posterior bone of its last hold_mm, not let fall
    # forward to the lateral edge of the vertebral body
    vcols = np.nonzero(vmask.any(axis=0))[0]
    if vcols.size:
        lat_out = float(lat_row[vcols].max())
        tip = vmask & (np.broadcast_to(lat, b.shape) >= lat_out - p.floor_hold_mm)
        hold = float(ymm_b[tip].max())
        in_tip = lat_row[cols] >= lat_out - p.floor_hold_mm
        ys = np.where(in_tip, np.maximum(ys, hold), ys)
    order = np.argsort(lat_row[cols])
    floor = np.interp(lat_row, lat_row[cols][order], ys[order])
    ok &= ymm > floor[None, :]
    # lateral bound at the rib angle of bone components not joined to the vertebra
    if n > 1:
        bounds = []
        for i in range(1, n + 1):
            if i in vert_ids or not (lab == i).any():
                continue
            rr, cc = np.nonzero(lab == i)
            j = int(np.argmax(ymm[rr, 0]))
            if lat_row[cc[j]] >= p.rib_angle_min_lat_mm:
                bounds.append(float(lat_row[cc[j]]))
        if bounds:
            ok &= lat < min(bounds) + p.rib_margin_mm
    return ok


class ClassicalSliceSegmenter:
    """HU windows plus compartments relative to the vertebra, on one axial slice."""

    def __init__(self, params: ClassicalParams | None = None) -> None:
        params = params or ClassicalParams()
        self.p = params

    def named(self, hu: NDArray[np.float32], spacing: tuple[float, float],
              anat: SliceAnatomy) -> dict[str, NDArray[np.bool_]]:
        return named_muscles(hu, spacing, anat, self.p)

    def run(self, hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy) -> SliceSegmentation:
        p = self.p
        dy, dx = spacing
        px = float(np.sqrt(dy * dx))
        lab, n = ndi.label(hu > -500)
        if n == 0:
            empty = np.zeros(hu.shape, bool)
            return SliceSegmentation(masks={k: empty for k in SEGMENT_KEYS}, body=empty)
        sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
        body = fill_holes(np.asarray(lab == (int(np.argmax(sizes)) + 1)))
        fat = body & (hu >= p.fat_hu[0]) & (hu <= p.fat_hu[1])
        muscle_hu = body & (hu >= p.muscle_hu[0]) & (hu <= p.muscle_hu[1])
        bone = body & (hu > p.muscle_hu[1])
        bone_hull = fill_holes(np.asarray(ndi.binary_closing(bone, _disk(1.5))))
        inner = _erode(body, p.skin_mm / px)
        nonfat = inner & ~fat & (hu > -500)
        nonfat = _erode(_dilate(nonfat, p.close_mm / px), p.close_mm / px) & inner
        envelope = fill_holes(nonfat)
        sat = fat & ~envelope
        soft = muscle_hu & envelope & ~bone_hull
        # wall: soft tissue components touching the envelope's rim
        rim = envelope & ~_erode(envelope, 1.5)
        slab, sn = ndi.label(soft)
        wall_ids = np.unique(slab[rim & soft])
        wall = np.isin(slab, wall_ids[wall_ids > 0])
        masks: dict[str, NDArray[np.bool_]] = {k: v & envelope for k, v in self.named(hu, spacing, anat).items()}
        named = masks["psoas_left"] | masks["psoas_right"] | masks["erector_left"] | masks["erector_right"]
        muscle = (wall | named) & soft
        holes = fill_holes(muscle) & ~muscle
        hl, hn = ndi.label(holes)
        if hn:
            hs = ndi.sum_labels(np.ones_like(hl), hl, index=np.arange(1, hn + 1)) * dy * dx
            small = np.concatenate([[False], hs <= p.imat_max_hole_mm2])
            holes = small[hl]
        imat = fat & holes & envelope
        vat = fat & envelope & ~imat
        masks["skeletal_muscle"] = muscle
        masks["sat"] = sat
        masks["vat"] = vat
        masks["imat"] = imat
        truncated = bool(body[0, :].any() or body[-1, :].any() or body[:, 0].any() or body[:, -1].any())
        return SliceSegmentation(masks={k: np.asarray(masks[k]) for k in SEGMENT_KEYS}, body=np.asarray(body),
                                 truncated=truncated)
