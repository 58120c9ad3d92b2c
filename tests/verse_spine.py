"""Test CT volumes built around REAL vertebra label maps (VerSe, ../shared/data/verse_vertebra_masks).

The manual masks give real vertebral shapes, disc heights, lordosis/kyphosis and scoliosis; this
module gives them HU (cortical shell brighter than cancellous bone), leaves discs and the canal as
soft tissue, adds a body of fat and soft tissue, ribs that start at the transverse processes of
T1-T12 (optionally at L1 too: 13 rib pairs), a sacrum with alae and iliac wings below L5 (crest
top at the middle of L4), and a skull base above C1.  Volumes come out on patient axes (k -> head,
rows -> back, columns -> patient's left) at 1 mm in plane and the requested slice spacing (slabs
averaged, so thickness = spacing), and as a :class:`Volume` in any stored orientation.

Label numbers: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 28 T13.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from pipelines.common.volume import Slice, Volume

NAMES = {**{i: f"C{i}" for i in range(1, 8)}, **{i + 7: f"T{i}" for i in range(1, 13)},
         **{i + 19: f"L{i}" for i in range(1, 7)}, 26: "S1", 28: "T13"}
CASES = {
    "verse004": "sub-verse004_seg-vert_msk.nii.gz",  # T9-L5
    "verse010": "sub-verse010_seg-vert_msk.nii.gz",  # L1-L5
    "gl003": "sub-gl003_dir-ax_seg-vert_msk.nii.gz",  # C1-T5
    "gl017": "sub-gl017_seg-vert_msk.nii.gz",  # C1-T4
}


@dataclass(frozen=True)
class SpineCase:
    hu: NDArray[np.float32]  # canonical (k head, r back, c left)
    spacing: float  # slice spacing (mm); pixels are 1 mm
    truth_mid: dict[str, float]  # vertebra name -> slice position (fractional) of its body's centroid
    names: tuple[str, ...]


def _load(path: Path, margin_lo: float, margin_hi: float, half_x: float, ant: float, post: float,
          ) -> tuple[NDArray[np.int16], NDArray[np.float64]]:
    """Labels resampled (nearest) onto a 1 mm LPS grid around the spine; returns (labels[z, y, x], origin)."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    kk, jj, ii = np.nonzero(arr)
    idx = np.stack([ii, jj, kk], axis=1).astype(np.float64)
    d = np.asarray(img.GetDirection()).reshape(3, 3)  # type: ignore[no-untyped-call]
    sp = np.asarray(img.GetSpacing())  # type: ignore[no-untyped-call]
    org = np.asarray(img.GetOrigin())  # type: ignore[no-untyped-call]
    pts = org + (idx * sp) @ d.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    cx, cy = float(np.median(pts[:, 0])), float(np.median(pts[:, 1]))
    origin = np.array([cx - half_x, cy - ant, lo[2] - margin_lo])
    size = [int(2 * half_x), int(ant + post), int(hi[2] - lo[2] + margin_lo + margin_hi)]
    ref = sitk.Image(size, sitk.sitkInt16)
    ref.SetOrigin(tuple(origin))  # type: ignore[no-untyped-call]
    ref.SetSpacing((1.0, 1.0, 1.0))  # type: ignore[no-untyped-call]
    out = sitk.Resample(sitk.Cast(img, sitk.sitkInt16), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out).astype(np.int16), origin


def _stamp(a: NDArray[np.bool_], z: float, y: float, x: float, r: float) -> None:
    z0, z1 = max(0, int(z - r)), min(a.shape[0], int(z + r) + 2)
    y0, y1 = max(0, int(y - r)), min(a.shape[1], int(y + r) + 2)
    x0, x1 = max(0, int(x - r)), min(a.shape[2], int(x + r) + 2)
    if z0 >= z1 or y0 >= y1 or x0 >= x1:
        return
    zz, yy, xx = np.ogrid[z0:z1, y0:y1, x0:x1]
    a[z0:z1, y0:y1, x0:x1] |= (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r


def build(case: str, spacing: float = 3.0, ribs: tuple[str, ...] | None = None, sacrum: bool = True,
          skull: bool = True, noise_sd: float = 12.0, seed: int = 0, data: Path | None = None) -> SpineCase:
    """One test volume.  ``ribs``: vertebra names that carry ribs (default T1-T12 in view)."""
    base = data or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "verse_vertebra_masks"
    lumbar = case.startswith("verse")
    lab, _ = _load(base / CASES[case], margin_lo=110.0 if lumbar else 20.0, margin_hi=20.0 if lumbar else 45.0,
                   half_x=160.0, ant=150.0, post=110.0)
    nz, ny, nx = lab.shape
    present = sorted(int(v) for v in np.unique(lab) if v > 0)
    names = {v: NAMES[v] for v in present}
    # truth: centroid (z) of each vertebral body: the label's voxels in front of its own centroid
    truth: dict[str, float] = {}
    cent: dict[int, tuple[float, float, float]] = {}
    for v in present:
        z, y, x = np.nonzero(lab == v)
        cent[v] = (float(z.mean()), float(y.mean()), float(x.mean()))
        body = y < np.percentile(y, 40)
        truth[names[v]] = float(z[body].mean())
    # joints: where two vertebrae's labels touch (facets, C1-dens), a voxel of soft tissue separates them
    grown = ndi.grey_dilation(lab, size=(3, 3, 3))
    shrunk = -ndi.grey_dilation(-np.where(lab > 0, lab, 999).astype(np.int32), size=(3, 3, 3))
    joint = (lab > 0) & ((grown != lab) & (grown > 0) | (shrunk != lab) & (shrunk != 999))
    lab = np.where(joint, 0, lab).astype(lab.dtype)
    bone = lab > 0
    inner = np.zeros_like(bone)
    for v, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is not None:
            inner[sl] |= ndi.binary_erosion(lab[sl] == v, iterations=2)
    # body outline: ellipse around the spine's anterior, fat ring
    yy, xx = np.mgrid[0:ny, 0:nx]
    ycen = 150.0 - 40.0
    ell = ((xx - 160.0) / 145.0) ** 2 + ((yy - ycen) / 105.0) ** 2
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    hu[:, ell <= 1.0] = -100.0
    hu[:, ell <= 0.78] = 40.0
    extra = np.zeros_like(bone)
    extra_inner = np.zeros_like(bone)
    rib_names = set(ribs) if ribs is not None else {n for n in names.values() if n.startswith("T")}
    for v in present:
        if names[v] not in rib_names:
            continue
        z, y, x = np.nonzero(lab == v)
        cz, cy, cx = cent[v]
        zb_ = z[y < np.percentile(y, 40)]
        zmid = float(zb_.mean())
        up = float(np.percentile(zb_, 80))  # rib necks lie at the upper body / pedicles
        for sgn in (1.0, -1.0):
            side = (x - cx) * sgn
            near = (z >= zmid) & (z <= up + 4)
            if not (near & (side > 0)).any():
                continue
            j = int(np.argmax(np.where(near, side, -1e9)))
            tz, ty, tx = up, float(y[j]), float(x[j])
            # head at the body's posterolateral corner, neck in front of the transverse process to its tip
            bz = np.abs(z - tz) < 6
            body = bz & (y < np.percentile(y, 40))
            if body.any():
                hx = cx + sgn * 0.8 * float(np.abs(x[body] - cx).max())
                hy = float(np.percentile(y[body], 90))
                for t in np.linspace(0.0, 1.0, 25):
                    _stamp(extra, tz, hy + (ty - hy) * t, hx + (tx - hx) * t, 4.0)
                    _stamp(extra_inner, tz, hy + (ty - hy) * t, hx + (tx - hx) * t, 2.0)
            cy_c = ty - 70.0
            ry = 75.0
            lat = abs(tx - cx)
            phi0 = float(np.arccos(np.clip((ty - cy_c) / ry, -1, 1)))
            rx = max(60.0, (lat + 2.0) / max(np.sin(phi0), 0.2))
            for phi in np.linspace(phi0, np.deg2rad(165.0), 120):
                px_ = cx + sgn * rx * np.sin(phi)
                py_ = cy_c + ry * np.cos(phi)
                pz_ = tz - 45.0 * (phi - phi0) / (np.deg2rad(165.0) - phi0)
                _stamp(extra, pz_, py_, px_, 4.5)
                _stamp(extra_inner, pz_, py_, px_, 2.5)
    if lumbar and sacrum and 24 in cent:
        zl5 = np.nonzero(lab == 24)
        cz, cy, cx = cent[24]
        body = zl5[1] < np.percentile(zl5[1], 40)
        zb = float(zl5[0][body].min())  # bottom of the L5 body
        yb = float(zl5[1][body].mean())
        top = zb - 10.0
        crest = truth.get("L4", top + 60.0)
        for k in range(nz):
            if k > top:
                break
            depth = top - k
            w = max(20.0, 55.0 - 0.35 * depth)
            yo = yb + 0.45 * depth
            body_e = ((xx - cx) / 24.0) ** 2 + ((yy - yo) / 17.0) ** 2 <= 1.0
            ala = (np.abs(xx - cx) <= w) & (yy >= yo - 10.0) & (yy <= yo + 28.0)
            ring = ((xx - cx) / 17.0) ** 2 + ((yy - (yo + 32.0)) / 13.0) ** 2 <= 1.0
            canal = ((xx - cx) / 10.0) ** 2 + ((yy - (yo + 32.0)) / 7.0) ** 2 <= 1.0
            sec = (body_e | ala | ring) & ~canal
            extra[k] |= sec
            extra_inner[k] |= ndi.binary_erosion(sec, iterations=2)
        for k in range(nz):
            if k > crest:
                break
            for sgn in (1.0, -1.0):
                x0, y0 = cx + sgn * 58.0, yb + 25.0
                x1, y1 = cx + sgn * 140.0, yb - 45.0
                t = np.linspace(0, 1, 90)
                lx, ly = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 25.0 * np.sin(np.pi * t)
                for a_, b_ in zip(lx, ly, strict=True):
                    ia, ib = int(round(b_)), int(round(a_))
                    if 0 <= ia < ny and 0 <= ib < nx:
                        extra[k, max(0, ia - 4) : ia + 5, max(0, ib - 1) : ib + 2] = True
                        extra_inner[k, max(0, ia - 2) : ia + 3, ib] = True
    if not lumbar and skull and 1 in cent:
        z1 = np.nonzero(lab == 1)
        ztop = float(z1[0].max())
        cz, cy, cx = cent[1]
        for k in range(int(ztop) + 6, nz):
            h = k - ztop
            r_out = min(75.0, 30.0 + 3.0 * h)
            occ = (((xx - cx) / r_out) ** 2 + ((yy - (cy + 5.0)) / (0.8 * r_out)) ** 2 <= 1.0) & (yy >= cy - 20.0)
            fm = ((xx - cx) / 16.0) ** 2 + ((yy - (cy + 8.0)) / 18.0) ** 2 <= 1.0
            clivus = (np.abs(xx - cx) <= 12.0) & (yy >= cy - 40.0 + 0.5 * h) & (yy <= cy - 22.0 + 0.5 * h)
            sec = (occ & ~fm & ~(((xx - cx) / (r_out - 8)) ** 2 + ((yy - (cy + 5.0)) / (0.8 * r_out - 8)) ** 2 <= 1.0)
                   ) | clivus
            extra[k] |= sec
    allbone = bone | extra
    cortex = allbone & ~(inner | extra_inner)
    hu[allbone] = 230.0
    hu[cortex] = 650.0
    if noise_sd > 0:
        hu += np.random.default_rng(seed).normal(0, noise_sd, hu.shape).astype(np.float32)
    # slabs of `spacing` mm (thickness = spacing)
    f = max(1, int(round(spacing)))
    m = nz // f
    hu_s = hu[: m * f].reshape(m, f, ny, nx).mean(axis=1)
    mids = {n: (z - (f - 1) / 2.0) / f for n, z in truth.items()}
    return SpineCase(hu=np.ascontiguousarray(hu_s, dtype=np.float32), spacing=float(f), truth_mid=mids,
                     names=tuple(names[v] for v in present))


def as_volume(case: SpineCase, row_dir: tuple[int, int, int] = (1, 0, 0), col_dir: tuple[int, int, int] = (0, 1, 0),
              feet_first: bool = False) -> Volume:
    """The canonical array stored with another orientation (what a scanner may write)."""
    a = case.hu
    rd, cd = np.array(row_dir, float), np.array(col_dir, float)
    # canonical index (k, r, c) is at LPS (c, r, k * spacing); stored pixel (i, j) at corner + j*rd + i*cd
    stored = a
    if abs(rd[0]) < 0.5:  # rows along y: transpose
        stored = stored.transpose(0, 2, 1)
    if (rd if abs(rd[0]) > 0.5 else cd)[0] < 0:
        stored = stored[:, :, ::-1] if abs(rd[0]) > 0.5 else stored[:, ::-1, :]
    if (cd if abs(cd[1]) > 0.5 else rd)[1] < 0:
        stored = stored[:, ::-1, :] if abs(cd[1]) > 0.5 else stored[:, :, ::-1]
    n, rows, cols = stored.shape
    order = list(range(n))[::-1] if feet_first else list(range(n))
    slices = []
    for k in order:
        corner = np.array([0.0, 0.0, k * case.spacing])
        for d, size in ((rd, cols), (cd, rows)):
            if d.sum() < 0:
                corner += -d * (size - 1)
        slices.append(Slice(dataset=Dataset(), frame=None, position=corner, orientation=np.concatenate([rd, cd]),
                            pixel_spacing=(1.0, 1.0), slope=1.0, intercept=0.0, thickness=case.spacing))
    normal = np.cross(rd, cd)
    proj = np.array([float(s.position @ normal) for s in slices])
    idx = np.argsort(proj)
    slices = [slices[i] for i in idx]
    hu = np.ascontiguousarray(stored[np.array(order)[idx]])
    return Volume(series_uid="1.2.3", study_uid="1.2", hu=hu, slices=tuple(slices), row_direction=rd,
                  column_direction=cd, normal=normal, pixel_spacing=(1.0, 1.0), positions=proj[idx],
                  slice_spacing=case.spacing, spacing_uniform=True, max_spacing_deviation=0.0, tilt_degrees=0.0,
                  slice_thickness=case.spacing)


def canonical_volume(case: SpineCase) -> Volume:
    return as_volume(case)

