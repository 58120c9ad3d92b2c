"""Real spines for the anatomical phantom: VerSe vertebra label maps made into a bone model.

The VerSe masks (``../shared/data/verse_vertebra_masks``) label whole vertebrae only.  This
module resamples one of them onto a 1 mm LPS grid (labels interpolated one by one, so the
2 mm sagittal sources get smooth outlines), then derives what the masks do not hold:

- the spinal canal: the hole each vertebral ring encloses, its centre line interpolated across
  the discs; the cord above the conus (L1), cerebrospinal fluid around it and below it;
- the vertebral body: the part of each vertebra in front of the canal; per vertebra its centroid,
  half width and depth, the tips of the transverse processes and of the spinous process;
- intervertebral discs of the real height: the voxels between two neighbouring bodies whose
  distances to the two bodies add up to no more than the local gap (a point between two
  endplates has ``d_upper + d_lower`` equal to the disc height there; points beside the
  bodies' waists have a much larger sum), inside the bodies' outline seen from above;
- a sacrum (S1-S5, ala, sacral canal) synthesised below L5 (or L6) when the source has none,
  tilted by a sacral slope of 35 degrees and curving forward, with an L5-S1 disc that is
  taller in front, and optionally a sacralised L5 (transverse processes fused to the ala).

Everything is in LPS millimetres: ``x`` to the patient's left, ``y`` posterior, ``z`` superior;
arrays are indexed ``[z, y, x]`` with ``z`` increasing superiorly.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "verse_vertebra_masks"

# VerSe label numbers
NAMES: dict[int, str] = {**{i: f"C{i}" for i in range(1, 8)}, **{i + 7: f"T{i}" for i in range(1, 13)},
                         **{i + 19: f"L{i}" for i in range(1, 7)}, 26: "S1", 28: "T13"}
NUMBERS: dict[str, int] = {v: k for k, v in NAMES.items()}
SACRUM = 26

SOURCES: dict[str, str] = {
    "verse004": "sub-verse004_seg-vert_msk.nii.gz",  # T9-L5
    "verse010": "sub-verse010_seg-vert_msk.nii.gz",  # L1-L5
    "gl003": "sub-gl003_dir-ax_seg-vert_msk.nii.gz",  # C1-T5
    "gl017": "sub-gl017_seg-vert_msk.nii.gz",  # C1-T4
}


def order_key(vid: int) -> float:
    """Cranio-caudal rank of a VerSe label (T13 sits between T12 and L1)."""
    return 19.5 if vid == 28 else float(vid)


@dataclass(frozen=True)
class VertebraInfo:
    vid: int
    name: str
    body_centre: tuple[float, float, float]  # (x, y, z) mm
    body_z: tuple[float, float]  # inferior and superior end of the body (mm)
    half_width: float
    half_depth: float
    tp_left: tuple[float, float, float]  # tip of the left transverse process
    tp_right: tuple[float, float, float]
    spinous_y: float  # most posterior point of the vertebra (y, mm)
    synthetic: bool = False


@dataclass(frozen=True)
class Sacrum:
    top: tuple[float, float, float]  # centre of the S1 superior endplate
    slope_deg: float
    length: float
    half_width: float  # S1 body half width
    half_depth: float
    ala_half_width: float  # sacroiliac joint distance from the midline at S1


@dataclass(frozen=True)
class SpineModel:
    """Bone model on a 1 mm LPS grid: ``origin`` is the (x, y, z) of voxel [0, 0, 0]."""

    source: str
    origin: tuple[float, float, float]
    vid: NDArray[np.uint8]  # VerSe number per voxel (26 = sacrum), 0 elsewhere
    body: NDArray[np.bool_]  # vertebral body part
    disc: NDArray[np.uint8]  # VerSe number of the vertebra above the disc, 0 elsewhere
    canal: NDArray[np.bool_]  # spinal canal (CSF + cord)
    cord: NDArray[np.bool_]
    vertebrae: dict[int, VertebraInfo]
    sacrum: Sacrum | None
    canal_line: NDArray[np.float64]  # (n, 4): z, x, y, radius of the canal per grid z
    endplate: NDArray[np.uint8] | None = None  # aged spines: 1 cortical endplate, 2 sclerotic endplate
    gas: NDArray[np.bool_] | None = None  # aged spines: vacuum phenomenon (gas) inside discs

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.vid.shape
        return (int(z), int(y), int(x))

    def ordered(self) -> list[VertebraInfo]:
        """Vertebrae from head to feet."""
        return [self.vertebrae[v] for v in sorted(self.vertebrae, key=order_key)]


@dataclass(frozen=True)
class Aging:
    """Degenerative changes of an old spine, applied to the bone model (all optional; see :func:`load_spine`).

    ``narrowed``: discs (named ``"L3/L4"``, by the bodies above and below) whose height at the centre is
    brought to the given millimetres by moving every vertebra above down (the column shortens, as it does);
    ``wedge``: a vertebra whose body collapses in front to ``wedge[1]`` of its height (posterior wall kept,
    the space left filled by the disc above bulging into it); ``osteophytes``: discs bridged by a bone lip
    around their anterior and lateral rim, joining the two bodies; ``vacuum``: discs with a gas cleft in the
    nucleus; ``sclerosis``: discs whose endplates are sclerotic (a thicker, dense endplate band).
    """

    narrowed: tuple[tuple[str, float], ...] = ()
    wedge: tuple[str, float] | None = None
    osteophytes: tuple[str, ...] = ()
    vacuum: tuple[str, ...] = ()
    sclerosis: tuple[str, ...] = ()
    endplate_mm: float = 1.0  # cortical endplate thickness (sclerotic endplates: twice this)


def _disc_pair(name: str) -> tuple[int, int]:
    up, _, lo = name.partition("/")
    if up not in NUMBERS or lo not in NUMBERS:
        raise ValueError(f"anatomical phantom: disc {name!r}; name it by its two vertebrae, e.g. 'L3/L4'")
    return NUMBERS[up], NUMBERS[lo]


def _central_gap(vid: NDArray[np.uint8], body: NDArray[np.bool_], up: int, lo: int) -> float:
    """Disc height (mm) between the bodies of ``up`` and ``lo`` on the columns around the two bodies' mid axis."""
    a, b = body & (vid == up), body & (vid == lo)
    zz = np.arange(vid.shape[0])[:, None, None]
    ca = np.argwhere(a)
    cb = np.argwhere(b)
    cy, cx = (0.5 * (ca[:, 1:].mean(axis=0) + cb[:, 1:].mean(axis=0))).round().astype(int)
    sa, sb = a[:, cy - 3 : cy + 4, cx - 3 : cx + 4], b[:, cy - 3 : cy + 4, cx - 3 : cx + 4]
    ok = sa.any(axis=0) & sb.any(axis=0)
    bottom = np.where(sa, zz, 10**6).min(axis=0)
    top = np.where(sb, zz, -1).max(axis=0)
    return float(np.median((bottom - top - 1)[ok])) if ok.any() else 0.0


def _narrow(vid: NDArray[np.uint8], body: NDArray[np.bool_], ids: list[int],
            narrowed: tuple[tuple[str, float], ...]) -> NDArray[np.uint8]:
    """Move every vertebra above each narrowed disc down so that the disc keeps the given central height."""
    drop = dict.fromkeys(ids, 0)
    for name, height in narrowed:
        up, lo = _disc_pair(name)
        if up not in ids or lo not in ids:
            raise ValueError(f"anatomical phantom: disc {name} is not in this spine")
        gap = _central_gap(vid, body, up, lo)
        d = max(0, int(round(gap - height)))
        for v in ids:
            if order_key(v) <= order_key(up):
                drop[v] += d
    out = np.zeros_like(vid)
    for v in sorted(ids, key=order_key, reverse=True):  # feet first: the vertebra above wins an overlap
        m = vid == v
        d = drop[v]
        if d:
            m = np.concatenate([m[d:], np.zeros((d, *m.shape[1:]), dtype=bool)])
        out[m] = v
    return out


def _wedge(vid: NDArray[np.uint8], body: NDArray[np.bool_], v: int, front_fraction: float) -> NDArray[np.bool_]:
    """Collapse the body of ``v`` from above, to ``front_fraction`` of its height in front (posterior wall intact).

    Returns the voxels the body lost (set to 0 in ``vid``)."""
    b = body & (vid == v)
    if not b.any():
        raise ValueError(f"anatomical phantom: no body for the wedge fracture of {NAMES.get(v, v)}")
    zz = np.arange(b.shape[0])[:, None, None]
    has = b.any(axis=0)
    lo = np.where(has, np.argmax(b, axis=0), 0)
    hi = np.where(has, b.shape[0] - 1 - np.argmax(b[::-1], axis=0), -1)
    ys = np.nonzero(has.any(axis=1))[0]
    y_front, y_back = float(ys.min()), float(ys.max())
    t = np.clip((y_back - np.arange(b.shape[1])) / max(1.0, y_back - y_front), 0.0, 1.0)[:, None]  # 1 in front
    keep = 1.0 - (1.0 - front_fraction) * t
    top = lo + np.floor((hi - lo + 1) * keep) - 1
    lost = b & (zz > top[None])
    vid[lost] = 0
    return np.asarray(lost)


def _osteophytes(vid: NDArray[np.uint8], disc: NDArray[np.uint8], up: int, lo: int, canal_y: float) -> None:
    """Bridge the disc between ``up`` and ``lo`` with a bone lip around its anterior and lateral rim."""
    d = disc == up
    if not d.any():
        return
    zs = np.nonzero(d.any(axis=(1, 2)))[0]
    foot = d.any(axis=0)
    plane = ndimage.generate_binary_structure(2, 1)
    rim = ndimage.binary_dilation(foot, plane, iterations=3) & ~ndimage.binary_erosion(foot, plane, iterations=2)
    yy = np.arange(foot.shape[0])[:, None]
    rim &= yy < canal_y - 8.0  # not behind the body (the canal and the foramina stay open)
    z0, z1 = max(0, int(zs.min()) - 3), min(vid.shape[0], int(zs.max()) + 4)
    mid = 0.5 * (zs.min() + zs.max())
    for z in range(z0, z1):
        free = rim & ((vid[z] == 0) | (disc[z] == up))
        vid[z][free] = up if z > mid else lo
        disc[z][free] = 0


def _vacuum(disc: NDArray[np.uint8], up: int) -> NDArray[np.bool_]:
    """A gas cleft in the nucleus: the middle 2 mm of the disc's height, over its central half, in front."""
    d = disc == up
    out = np.zeros(d.shape, dtype=bool)
    if not d.any():
        return out
    zz = np.arange(d.shape[0])[:, None, None]
    cnt = d.sum(axis=0)
    has = cnt >= 2
    mid = np.where(has, (d * zz).sum(axis=0) / np.maximum(cnt, 1), -10.0)
    foot_y, foot_x = np.nonzero(has)
    cy, cx = float(foot_y.mean()), float(foot_x.mean())
    hy, hx = 0.5 * (foot_y.max() - foot_y.min()), 0.5 * (foot_x.max() - foot_x.min())
    yy, xx = np.ogrid[: d.shape[1], : d.shape[2]]
    core = ((xx - cx) / (0.5 * hx + 1e-3)) ** 2 + ((yy - (cy - 0.15 * hy)) / (0.35 * hy + 1e-3)) ** 2 <= 1.0
    out = d & core[None] & (np.abs(zz - mid[None]) <= 1.0)
    return np.asarray(out)


def _endplates(vid: NDArray[np.uint8], body: NDArray[np.bool_], thick: int) -> NDArray[np.bool_]:
    """Body voxels within ``thick`` mm of the end of their vertebra's bone along z (the cortical endplates)."""
    out = np.zeros(vid.shape, dtype=bool)
    for i in range(1, max(1, thick) + 1):
        out[i:] |= vid[i:] != vid[:-i]
        out[:-i] |= vid[:-i] != vid[i:]
    return np.asarray(out & body & (vid > 0))


def _read_on_grid(path: Path, margin: tuple[float, float, float, float, float, float]
                  ) -> tuple[NDArray[np.uint8], tuple[float, float, float]]:
    """Labels resampled to 1 mm LPS (identity direction), each label interpolated on its own."""
    import SimpleITK as sitk

    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkUInt8)
    sp = img.GetSpacing()
    if min(sp) < 0.6:  # sub-millimetre sources: nearest-neighbour shrink first (speed), then interpolate
        f = [max(1, int(1.0 // s)) for s in sp]
        img = sitk.Resample(img, [int(n // k) for n, k in zip(img.GetSize(), f, strict=True)], sitk.Transform(),
                            sitk.sitkNearestNeighbor, img.GetOrigin(), tuple(s * k for s, k in zip(sp, f, strict=True)),
                            img.GetDirection(), 0, sitk.sitkUInt8)
    arr = sitk.GetArrayViewFromImage(img)
    ids = [int(v) for v in np.unique(arr) if v > 0]
    # the labels' bounding box (not the source's field of view) sets the grid
    nzk = [np.nonzero(arr.any(axis=ax))[0] for ax in ((0, 1), (0, 2), (1, 2))]  # i, j, k index ranges
    box = [(int(a.min()) - 2, int(a.max()) + 2) for a in nzk]
    corners = np.array([img.TransformContinuousIndexToPhysicalPoint((float(box[0][i]), float(box[1][j]),
                                                                     float(box[2][k])))
                        for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    lo = np.floor(corners.min(0)) - np.array(margin[0::2])
    hi = np.ceil(corners.max(0)) + np.array(margin[1::2])
    n = [int(v) for v in (hi - lo + 1)]
    best = np.zeros(n[::-1], dtype=np.float32)
    out = np.zeros(n[::-1], dtype=np.uint8)
    for v in ids:
        one = sitk.Cast(img == v, sitk.sitkFloat32)
        res = sitk.Resample(one, n, sitk.Transform(), sitk.sitkLinear, tuple(float(c) for c in lo), (1.0, 1.0, 1.0),
                            (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), 0.0, sitk.sitkFloat32)
        a = sitk.GetArrayViewFromImage(res)
        win = (a > 0.5) & (a > best)
        out[win] = v
        np.maximum(best, a, out=best)
    return out, (float(lo[0]), float(lo[1]), float(lo[2]))


_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _canal_line(vid: NDArray[np.uint8]) -> NDArray[np.float64]:
    """(z index, x index, y index, equivalent radius) of the canal per z, holes enclosed by bone, interpolated."""
    bone = vid > 0
    holes = ndimage.binary_fill_holes(bone, structure=_PLANE) & ~bone
    lab, n = ndimage.label(holes, structure=_PLANE)
    nz = vid.shape[0]
    found: dict[int, tuple[float, float, float]] = {}
    if n:
        objs = ndimage.find_objects(lab)
        cx_mid = vid.shape[2] / 2.0
        for i, sl in enumerate(objs, start=1):
            if sl is None:
                continue
            m = lab[sl] == i
            area = float(m.sum())
            if not 40.0 <= area <= 700.0:
                continue
            zz, yy, xx = np.nonzero(m)
            z = int(sl[0].start)
            hy, hx = float(yy.mean() + sl[1].start), float(xx.mean() + sl[2].start)
            # the canal is the largest hole near the body's midline in that plane
            prev = found.get(z)
            score = area - 2.0 * abs(hx - cx_mid)
            if prev is None or score > prev[2] - 2.0 * abs(prev[1] - cx_mid):
                found[z] = (hy, hx, area)
    if not found:
        raise ValueError("anatomical phantom: no spinal canal found in the vertebra masks")
    zs = np.array(sorted(found), dtype=np.float64)
    cy: NDArray[np.float64] = np.array([found[int(z)][0] for z in zs])
    cx: NDArray[np.float64] = np.array([found[int(z)][1] for z in zs])
    r: NDArray[np.float64] = np.sqrt(np.array([found[int(z)][2] for z in zs]) / np.pi)
    # smooth along z (5 mm) to drop holes that are not the canal (foramina, partial rings)
    k = np.ones(5) / 5.0
    if len(zs) >= 5:
        cy = np.asarray(np.convolve(np.pad(cy, 2, mode="edge"), k, "valid"), dtype=np.float64)
        cx = np.asarray(np.convolve(np.pad(cx, 2, mode="edge"), k, "valid"), dtype=np.float64)
        r = np.asarray(np.convolve(np.pad(r, 2, mode="edge"), k, "valid"), dtype=np.float64)
    allz = np.arange(nz, dtype=np.float64)
    return np.stack([allz, np.interp(allz, zs, cx), np.interp(allz, zs, cy), np.interp(allz, zs, r)], axis=1)


def _ellipse_mask(shape: tuple[int, int], cx: float, cy: float, ax: float, ay: float) -> NDArray[np.bool_]:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.asarray(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0)


def _vertebra_info(vid_arr: NDArray[np.uint8], body: NDArray[np.bool_], v: int,
                   origin: tuple[float, float, float], synthetic: bool = False) -> VertebraInfo:
    ox, oy, oz = origin
    sl = ndimage.find_objects((vid_arr == v).astype(np.uint8))[0]
    off = np.array([s.start for s in sl])
    sub = vid_arr[sl] == v
    b = tuple(a + o for a, o in zip(np.nonzero(body[sl] & sub), off, strict=True))
    allv = tuple(a + o for a, o in zip(np.nonzero(sub), off, strict=True))
    bz, by, bx = (b[0], b[1], b[2]) if len(b[0]) else (allv[0], allv[1], allv[2])
    cz, cy, cx = float(bz.mean()), float(by.mean()), float(bx.mean())
    # body height at its centre: voxels within 6 mm of the centre axis
    near = (np.abs(by - cy) <= 6) & (np.abs(bx - cx) <= 6)
    zlo, zhi = (float(bz[near].min()), float(bz[near].max())) if near.any() else (float(bz.min()), float(bz.max()))
    hw = float(np.percentile(np.abs(bx - cx), 98))
    hd = float(np.percentile(np.abs(by - cy), 98))
    az, ay, ax = allv
    post = ay >= cy + hd * 0.6
    if not post.any():
        post = np.ones_like(ay, dtype=bool)
    il = int(np.argmax(np.where(post, ax, -1)))
    ir = int(np.argmin(np.where(post, ax, 10**9)))
    return VertebraInfo(
        vid=v, name=NAMES.get(v, str(v)), body_centre=(cx + ox, cy + oy, cz + oz), body_z=(zlo + oz, zhi + oz),
        half_width=hw, half_depth=hd,
        tp_left=(float(ax[il]) + ox, float(ay[il]) + oy, float(az[il]) + oz),
        tp_right=(float(ax[ir]) + ox, float(ay[ir]) + oy, float(az[ir]) + oz),
        spinous_y=float(ay[post].max()) + oy, synthetic=synthetic)


def _synth_sacrum(vid: NDArray[np.uint8], l5: VertebraInfo, origin: tuple[float, float, float],
                  sacralised: bool, gap: float = 11.0) -> Sacrum:
    """Paint S1-S5 (label 26) below ``l5`` in ``vid`` and return its geometry."""
    ox, oy, oz = origin
    slope = np.deg2rad(35.0)
    # gap: L5-S1 disc height at the centre, 11 mm (taller in front, thinner behind: the slope does it)
    top = np.array([l5.body_centre[0], l5.body_centre[1] + 3.0, l5.body_z[0] - gap])
    axis = np.array([0.0, np.sin(slope), -np.cos(slope)])  # down the sacrum (posterior-inferior)
    perp = np.array([0.0, np.cos(slope), np.sin(slope)])  # toward the back, in the sagittal plane
    length, hw, hd = 105.0, l5.half_width * 1.02, l5.half_depth * 0.95
    ala = hw + 34.0
    nz, ny, nx = vid.shape
    z = np.arange(nz)[:, None, None] + oz
    y = np.arange(ny)[None, :, None] + oy
    x = np.arange(nx)[None, None, :] + ox
    zlo = int(max(0, np.floor(top[2] - length * np.cos(slope) - 40 - oz)))
    zhi = int(min(nz, np.ceil(top[2] + 25 - oz)))
    zz = z[zlo:zhi]
    u = (y - top[1]) * axis[1] + (zz - top[2]) * axis[2]  # along the sacrum, 0 at the S1 endplate
    v = (y - top[1]) * perp[1] + (zz - top[2]) * perp[2]  # toward the back
    dx = x - top[0]
    t = np.clip(u / length, 0.0, 1.0)
    vc = -0.0035 * u**2  # the sacrum curves forward (concave in front)
    vv = v - vc
    inside = (u >= 0) & (u <= length)
    bw, bd = hw * (1 - 0.55 * t), hd * (1 - 0.55 * t)
    body = ((dx / bw) ** 2 + (vv / bd) ** 2 <= 1.0)
    ala_w = ala * np.clip(1.0 - 0.9 * np.clip((u - 35.0) / 45.0, 0, 1), 0.15, 1)
    # ala: wings that thin and slope backward toward the sacroiliac joint, rounded at the joint
    lat = np.clip(np.abs(dx) - bw, 0.0, None)
    v_lo = -0.2 * bd + 0.45 * lat
    v_hi = bd + 20.0 - 10.0 * t - 0.12 * lat
    alae = (np.abs(dx) <= ala_w) & (vv >= v_lo) & (vv <= v_hi) & (
        ((np.abs(dx) - ala_w + 8.0).clip(0) / 8.0) ** 2 + ((vv - 0.5 * (v_lo + v_hi)) / (0.5 * (v_hi - v_lo) + 1e-3)) ** 2
        <= 1.0)
    # sacral canal and its dorsal wall (laminae, median crest)
    cv = bd + 8.0 - 2.0 * t
    crx, cry = 11.0 * (1 - 0.5 * t), 5.5 * (1 - 0.4 * t)
    canal = ((dx / crx) ** 2 + ((vv - cv) / cry) ** 2 <= 1.0)
    dorsal = ((dx / (crx + 9.0)) ** 2 + ((vv - cv - 2.0) / (cry + 7.0)) ** 2 <= 1.0)
    bone = inside & (body | alae | dorsal) & ~canal
    sub = vid[zlo:zhi]
    sub[bone & (sub == 0)] = SACRUM
    if sacralised:
        # L5 transverse processes broadened and fused to the ala (a lumbosacral transitional vertebra)
        l5z = l5.body_centre[2]
        for tp in (l5.tp_left, l5.tp_right):
            side = np.sign(tp[0] - top[0]) or 1.0
            w = ((zz >= top[2] - 15.0) & (zz <= l5z - 5.0) & (np.abs(dx) >= l5.half_width)
                 & (np.abs(dx) <= abs(tp[0] - top[0]) + 6.0) & (np.sign(dx) == side)
                 & (np.abs(y - tp[1]) <= 9.0))
            sub[w & (sub == 0)] = SACRUM
    return Sacrum(top=(float(top[0]), float(top[1]), float(top[2])), slope_deg=35.0, length=length,
                  half_width=float(hw), half_depth=float(hd), ala_half_width=float(ala))


def _disc(vid: NDArray[np.uint8], body: NDArray[np.bool_], upper: int, lower: int) -> tuple[
        tuple[slice, slice, slice], NDArray[np.bool_]] | None:
    """Disc voxels between the bodies of ``upper`` and ``lower`` (see the module docstring)."""
    a = body & (vid == upper)
    b = body & (vid == lower) if lower != SACRUM else (vid == lower)
    if not a.any() or not b.any():
        return None
    both = a | b
    sl = ndimage.find_objects(both.astype(np.uint8))[0]
    sl = tuple(slice(max(0, s.start - 3), s.stop + 3) for s in sl)
    a_, b_ = a[sl], b[sl]
    da = ndimage.distance_transform_edt(~a_)
    db = ndimage.distance_transform_edt(~b_)
    s = da + db
    between = ~(a_ | b_)
    if not between.any():
        return None
    gmin = float(s[between].min())
    thresh = max(2.4 * gmin, gmin + 8.0)
    thresh = min(thresh, 17.0)
    # outline seen along z: the two bodies' projections, so the disc does not spill into canal or foramina
    foot = (a_.any(axis=0) | b_.any(axis=0))[None]
    disc = between & (s <= thresh) & foot & (da <= thresh) & (db <= thresh)
    # not above the upper body's top or below the lower body's bottom
    za = np.nonzero(a_.any(axis=(1, 2)))[0]
    zb = np.nonzero(b_.any(axis=(1, 2)))[0]
    disc[za.max() + 1:] = False
    disc[: zb.min()] = False
    return sl, disc  # type: ignore[return-value]


def load_spine(source: str, sacrum: bool = True, sacralised_l5: bool = False, aging: Aging | None = None
               ) -> SpineModel:
    """The bone model of one VerSe spine (cached: a phantom's variants share it).

    ``aging`` (:class:`Aging`) makes it an old spine: narrowed discs (the vertebrae above move down),
    a wedge fracture, then the truth (body centres and heights) is measured on the changed bones as on
    any spine; cortical endplates (and sclerotic ones), bridging osteophytes and disc gas are added
    after it, so they do not move a body's recorded middle.
    """
    return _load_spine(source, bool(sacrum), bool(sacralised_l5), aging)


@functools.lru_cache(maxsize=8)
def _load_spine(source: str, sacrum: bool, sacralised_l5: bool, aging: Aging | None = None) -> SpineModel:
    if source not in SOURCES:
        raise ValueError(f"anatomical phantom: unknown spine source {source!r}; known: {sorted(SOURCES)}")
    path = DATA / SOURCES[source]
    if not path.exists():
        raise FileNotFoundError(f"anatomical phantom: {path} is missing (../shared/data/verse_vertebra_masks)")
    # margins (x-, x+, y-, y+, z-, z+) leave room for the sacrum, the canal and the posterior elements
    lumbar = source.startswith("verse")
    raw = _read_on_grid(path, (30.0, 30.0, 15.0, 45.0, 140.0 if lumbar else 10.0, 10.0))
    vid, origin = raw
    ids = sorted({int(v) for v in np.unique(vid) if v > 0}, key=order_key)
    nz, ny, nx = vid.shape
    yy = np.arange(ny)[None, :, None]
    s1_gap = 11.0
    lost: NDArray[np.bool_] | None = None
    if aging is not None:
        lumbar_discs = tuple((d, h) for d, h in aging.narrowed if not d.endswith("/S1"))
        s1_gap = next((h + 1.0 for d, h in aging.narrowed if d.endswith("/S1")), s1_gap)
        if lumbar_discs:
            line0 = _canal_line(vid)
            body0 = (vid > 0) & (yy < (line0[:, 2] - 0.9 * line0[:, 3])[:, None, None])
            vid = _narrow(vid, body0, ids, lumbar_discs)
        if aging.wedge is not None:
            line0 = _canal_line(vid)
            body0 = (vid > 0) & (yy < (line0[:, 2] - 0.9 * line0[:, 3])[:, None, None])
            lost = _wedge(vid, body0, NUMBERS[aging.wedge[0]], aging.wedge[1])
    line = _canal_line(vid)
    # the body is the part of each vertebra in front of the canal
    front = (line[:, 2] - 0.9 * line[:, 3])[:, None, None]
    body = (vid > 0) & (yy < front)
    infos = {v: _vertebra_info(vid, body, v, origin) for v in ids}
    sac: Sacrum | None = None
    lowest = ids[-1]
    if sacrum and SACRUM not in ids and lowest in (24, 25):
        sac = _synth_sacrum(vid, infos[lowest], origin, sacralised_l5, s1_gap)
        ids.append(SACRUM)
        # the canal continues in the sacrum: re-derive the line below L5
        top_z = sac.top[2] - origin[2]
        zs = np.arange(nz, dtype=np.float64)
        below = zs < top_z
        sn, cs = np.sin(np.deg2rad(sac.slope_deg)), np.cos(np.deg2rad(sac.slope_deg))
        u = (top_z - zs[below]) / cs
        for _ in range(3):  # the canal's (u, v) in sacral coordinates for each grid z (fixed point)
            t = np.clip(u / sac.length, 0, 1)
            v = sac.half_depth * (1 - 0.55 * t) + 8.0 - 2.0 * t - 0.0035 * u**2
            u = (top_z - zs[below] + v * sn) / cs
        line[below, 1] = sac.top[0] - origin[0]
        line[below, 2] = sac.top[1] - origin[1] + u * sn + v * cs
        line[below, 3] = np.maximum(3.0, 7.0 * (1 - 0.6 * t))
        front = (line[:, 2] - 0.9 * line[:, 3])[:, None, None]
        body = (vid > 0) & (yy < front)
        body[vid == SACRUM] = True
        infos[SACRUM] = _vertebra_info(vid, body, SACRUM, origin, synthetic=True)
    # discs between neighbours
    disc = np.zeros_like(vid)
    for up, lo in zip(ids[:-1], ids[1:], strict=False):
        if lo != SACRUM and order_key(lo) - order_key(up) > 1.01 and not (up == 19 and lo == 20):
            continue
        got = _disc(vid, body, up, lo)
        if got is None:
            continue
        sl, d = got
        sub = disc[sl]
        sub[d & (vid[sl] == 0)] = up
    endplate: NDArray[np.uint8] | None = None
    gas: NDArray[np.bool_] | None = None
    if aging is not None:
        if lost is not None and aging.wedge is not None:
            # the disc above bulges into the collapsed front of the body (its nucleus and annulus follow the endplate)
            w = NUMBERS[aging.wedge[0]]
            above = [v for v in ids if order_key(v) < order_key(w)]
            disc[lost & (vid == 0)] = max(above, key=order_key) if above else w
        thick = max(1, int(round(aging.endplate_mm)))
        endplate = _endplates(vid, body, thick).astype(np.uint8)
        st = np.zeros((3, 3, 3), dtype=bool)
        st[:, 1, 1] = True
        for name in aging.sclerosis:
            up, lo = _disc_pair(name)
            near = ndimage.binary_dilation(disc == up, structure=st, iterations=2 * thick)
            endplate[near & body & np.isin(vid, (up, lo))] = 2
        for name in aging.osteophytes:
            up, lo = _disc_pair(name)
            dz_ = np.nonzero((disc == up).any(axis=(1, 2)))[0]
            wall = float(np.median(line[dz_, 2] - 0.9 * line[dz_, 3])) if dz_.size else float(ny)
            _osteophytes(vid, disc, up, lo, wall)
        gas = np.zeros(vid.shape, dtype=bool)
        for name in aging.vacuum:
            gas |= _vacuum(disc, _disc_pair(name)[0])
    # canal and cord: an ellipse on the canal line plus the holes, never bone or disc
    zz = np.arange(nz)[:, None, None]
    xx = np.arange(nx)[None, None, :]
    cx, cy, r = line[:, 1][:, None, None], line[:, 2][:, None, None], line[:, 3][:, None, None]
    zmin = min(i.body_z[0] for i in infos.values()) - origin[2] - 5
    zmax = max(i.body_z[1] for i in infos.values()) - origin[2] + 5
    inz = (zz >= zmin) & (zz <= zmax)
    canal = inz & (((xx - cx) / (1.15 * r)) ** 2 + ((yy - cy) / (0.9 * r)) ** 2 <= 1.0) & (vid == 0) & (disc == 0)
    conus_z = infos[20].body_z[0] - origin[2] if 20 in infos else (zmin - 1.0)
    cord = canal & (zz >= conus_z) & (((xx - cx) / (0.55 * r)) ** 2 + ((yy - cy) / (0.45 * r)) ** 2 <= 1.0)
    return SpineModel(source=source, origin=origin, vid=vid, body=body, disc=disc, canal=canal, cord=cord,
                      vertebrae=infos, sacrum=sac, canal_line=line, endplate=endplate, gas=gas)
