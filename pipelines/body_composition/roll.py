"""The spine's axial roll: a patient lying turned on the table, or a rotated (scoliotic) vertebra.

The weight-free segmenter reasons along the slice's axes: the posterior bony floor is found column by
column, the psoas lies "behind the body's centre and in front of the processes' plane", the erector's
lateral bound is a line parallel to the midline.  A patient rolled by a few degrees (common: a pad under
one side, a painful hip, scoliosis) tilts all of that against the anatomy.  On the anatomical phantoms
turned by 8 to 15 degrees (``bench/body_composition_roll.py``: thin, average and obese, 256 x 256 at 5 mm) the
pipeline filed 13 of 20 erector sides, mean Dice 0.865 and down to 0.76 (7 held back by the gates); with the
roll it files all 20, mean 0.894, none below 0.87 (the unturned phantoms: 0.908).

So the stage measures the roll from the vertebra itself and segments each slice turned back by it:

* **measured**: the vertebra (body, pedicles, laminae, transverse and spinous processes) is mirror-symmetric
  about its mid-sagittal plane.  On one slice the bone (above ``bone_hu``) within ``lateral_mm`` of the
  vertebral body's centre, from just in front of the body to ``back_mm`` behind it, is reflected about lines
  through the body's centre (shifted sideways by up to ``shift_mm``) at angles up to ``max_deg`` from the
  anterior-posterior axis; the line whose reflection lands most bone on bone is the slice's mid-sagittal line,
  coarse to fine.  A slice whose best reflection lands less than ``min_score`` of the bone on bone (a disc, a
  slice of few bone pixels, a broken vertebra) gives no angle;
* **smoothed along the spine**: a slice's roll is the median of the angles measured on slices within
  ``window_mm`` above and below (every ``step_mm``), at least ``min_votes`` of them; fewer: no roll;
* **applied only when it matters**: below ``min_deg`` the slice is segmented as stored, so an unrolled patient's
  masks do not change at all.  The smoothed roll of the unturned phantoms (real VerSe spines, whose vertebrae are
  themselves turned by a degree or two) reached 2.0 degrees on up to 18 % of their 1 mm lumbar slices, never more;
  a roll of 3 degrees moves a point 60 mm behind the centre by 3 mm.
  At or above it only what is found relative to the vertebra's axes (the bony landmarks, the paraspinal
  compartments, psoas and erector: ``tissues.turned_named``) is found on the slice resampled (bilinear) turned
  back about the vertebral body's centre, and those masks are turned forward again with nearest-neighbour
  sampling (one source pixel per output pixel, so masks that exclude each other still do).  The trunk, the HU
  windows and every area and mean HU stay on the stored slice.

At C3 (a head and neck turned on the table) the same smoothed roll, with the same parameters, is measured on the
cervical vertebrae (the anatomical neck turned 0, 10 and -15 degrees: 0.0, +9.8 and -15.0 at C3), and
``tissues.segment_c3`` takes its regions along the vertebra's axes by turning the pixel grid's coordinates, not the
slice.  On that neck turned 10 and 15 degrees the paravertebral muscles' worse side went from Dice 0.76 / 0.70 to
0.81 / 0.82 at 160 x 160 and 3 mm, from 0.80 / 0.76 to 0.86 / 0.85 at 512 x 512 and 2 mm; the sternocleidomastoids
turned -10 degrees at 512 x 512 were held back by the gates without it, and filed at 0.78 / 0.81 with it.

Angles are in the canonical slice (rows toward the patient's back, columns toward the patient's left, see
``Volume.canonical_axial``), so a positive roll is the same turn of the patient in any stored orientation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pipelines.body_composition.types import SliceAnatomy


@dataclass(frozen=True)
class RollParams:
    enabled: bool = True
    bone_hu: float = 250.0  # cortical and dense trabecular bone (contrast-filled vessels lie in front of the crop)
    lateral_mm: float = 60.0  # the transverse processes' tips lie within this of the midline at L1-L5
    front_mm: float = 8.0  # the crop starts this far in front of the vertebral body's front
    back_mm: float = 85.0  # ... and ends this far behind its centre (the spinous process' tip)
    max_deg: float = 20.0  # rolls searched, each way
    shift_mm: float = 4.0  # the mid-sagittal line may pass this far beside the body centre the finder traced
    max_points: int = 1500  # bone pixels sampled per slice
    min_points: int = 30
    min_score: float = 0.45  # share of the bone whose mirror image lands on bone, at the best line
    window_mm: float = 20.0
    step_mm: float = 5.0
    min_votes: int = 3
    min_deg: float = 3.0


def measure_roll(hu: NDArray[np.float32], spacing: tuple[float, float], anat: SliceAnatomy,
                 p: RollParams) -> tuple[float, float] | None:
    """(roll in degrees, share of bone mirrored onto bone) on one slice, or None without enough bone or symmetry.

    Positive: the vertebra's posterior axis points toward larger columns (the patient's left) as it runs back."""
    dy, dx = spacing
    r0, c0 = anat.centre_rc
    ra = max(0, int(np.floor(r0 - (anat.half_height_mm + p.front_mm) / dy)))
    rb = min(hu.shape[0], int(np.ceil(r0 + p.back_mm / dy)) + 1)
    ca = max(0, int(np.floor(c0 - p.lateral_mm / dx)))
    cb = min(hu.shape[1], int(np.ceil(c0 + p.lateral_mm / dx)) + 1)
    if rb <= ra or cb <= ca:
        return None
    bone = np.asarray(hu[ra:rb, ca:cb] > p.bone_hu)
    rr, cc = np.nonzero(bone)
    if rr.size < p.min_points:
        return None
    if rr.size > p.max_points:  # an even subsample: the same every run
        keep = np.linspace(0, rr.size - 1, p.max_points).astype(np.intp)
        rr, cc = rr[keep], cc[keep]
    y = (rr + ra - r0) * dy  # mm behind the centre
    x = (cc + ca - c0) * dx  # mm to the patient's left

    def scores(degs: NDArray[np.floating[Any]], shifts: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """Share of the bone mirrored onto bone about each line (angles x shifts), all at once."""
        t = np.deg2rad(degs)[:, None, None]
        ux, uy = np.sin(t), np.cos(t)
        qx = x[None, None, :] - shifts[None, :, None]
        d = qx * ux + y * uy
        ri = np.rint((2.0 * d * uy - y) / dy + r0 - ra).astype(np.intp)
        ci = np.rint((shifts[None, :, None] + 2.0 * d * ux - qx) / dx + c0 - ca).astype(np.intp)
        ok = (ri >= 0) & (ri < bone.shape[0]) & (ci >= 0) & (ci < bone.shape[1])
        hit = bone[np.clip(ri, 0, bone.shape[0] - 1), np.clip(ci, 0, bone.shape[1] - 1)] & ok
        return np.asarray(hit.mean(axis=-1), dtype=np.float64)

    def best_of(degs: NDArray[np.floating[Any]], shifts: NDArray[np.floating[Any]]) -> tuple[float, float, float]:
        sc = scores(degs, shifts)
        i, j = np.unravel_index(int(np.argmax(sc)), sc.shape)  # the first best: the same every run
        return float(sc[i, j]), float(degs[i]), float(shifts[j])

    _, a0, xs0 = best_of(np.arange(-p.max_deg, p.max_deg + 1e-6, 2.0), np.linspace(-p.shift_mm, p.shift_mm, 5))
    if abs(a0) >= p.max_deg:  # the best line at the search's edge: no symmetry found within it
        return None
    best = best_of(np.arange(a0 - 1.5, a0 + 1.5 + 1e-6, 0.5), np.arange(xs0 - 1.5, xs0 + 1.5 + 1e-6, 0.5))
    s, deg, _ = best
    if s < p.min_score:
        return None
    return deg, s


class SpineRoll:
    """The smoothed roll of each slice of a volume (see the module docstring); 0.0 where it is not applied."""

    def __init__(self, hu: NDArray[np.float32], spacing: tuple[float, float], slice_mm: float,
                 anatomy: Callable[[int], SliceAnatomy], p: RollParams | None = None) -> None:
        self.hu, self.spacing, self.anatomy = hu, spacing, anatomy
        self.p = p or RollParams()
        self.stride = max(1, int(round(self.p.step_mm / slice_mm))) if slice_mm > 0 else 1
        self.reach = int(np.floor(self.p.window_mm / slice_mm + 1e-6)) if slice_mm > 0 else 0
        self._measured: dict[int, float | None] = {}
        self._at: dict[int, float] = {}
        self._lock = threading.Lock()  # the stage's threads ask for the same slices: each is measured once

    def measured(self, k: int) -> float | None:
        """The roll measured on slice ``k`` alone (degrees), or None."""
        with self._lock:
            if k not in self._measured:
                r = measure_roll(self.hu[k], self.spacing, self.anatomy(k), self.p)
                self._measured[k] = None if r is None else r[0]
            return self._measured[k]

    def at(self, k: int) -> float:
        """Slice ``k``'s roll in degrees, or 0.0 (disabled, too few votes, or below ``min_deg``)."""
        if not self.p.enabled:
            return 0.0
        if k not in self._at:
            n = self.hu.shape[0]
            lo = max(0, k - self.reach)
            lo += (-lo) % self.stride  # a grid shared by every slice (multiples of the stride): each measured once
            votes = [v for kk in range(lo, min(n, k + self.reach + 1), self.stride)
                     if (v := self.measured(kk)) is not None]
            deg = float(np.median(votes)) if len(votes) >= self.p.min_votes else 0.0
            self._at[k] = deg if abs(deg) >= self.p.min_deg else 0.0
        return self._at[k]


def _matrix(spacing: tuple[float, float], deg: float) -> NDArray[np.float64]:
    """Index-space matrix taking a turned-back pixel (r, c) offset from the centre to the stored slice's offset."""
    t = np.deg2rad(deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])  # (rows = y, columns = x), in mm
    s = np.diag(spacing)
    return np.asarray(np.linalg.inv(s) @ rot @ s)


def turn_back(hu: NDArray[np.float32], spacing: tuple[float, float], centre_rc: tuple[float, float],
              deg: float) -> NDArray[np.float32]:
    """The slice turned back by ``deg`` about ``centre_rc``: the vertebra's posterior axis runs down the rows.
    Beyond the stored slice each edge pixel is repeated (air stays air; tissue cut off by the field of view is not
    given an edge of air it does not have)."""
    m = _matrix(spacing, deg)
    c = np.asarray(centre_rc, dtype=np.float64)
    return np.asarray(ndi.affine_transform(hu, m, offset=c - m @ c, order=1, mode="nearest"), dtype=np.float32)


def turn_forward(mask: NDArray[np.bool_], spacing: tuple[float, float], centre_rc: tuple[float, float],
                 deg: float) -> NDArray[np.bool_]:
    """A mask drawn on the turned-back slice, on the stored slice (nearest neighbour)."""
    m = np.linalg.inv(_matrix(spacing, deg))
    c = np.asarray(centre_rc, dtype=np.float64)
    out = ndi.affine_transform(mask.view(np.uint8), m, offset=c - m @ c, order=0, mode="constant", cval=0)
    return np.asarray(out, dtype=bool)


def turned_anatomy(anat: SliceAnatomy, spacing: tuple[float, float], deg: float) -> SliceAnatomy:
    """``anat`` on the turned-back slice: the centre stays, the canal turns with the slice."""
    if anat.canal_rc is None:
        return anat
    m = np.linalg.inv(_matrix(spacing, deg))
    c = np.asarray(anat.centre_rc, dtype=np.float64)
    r, q = c + m @ (np.asarray(anat.canal_rc, dtype=np.float64) - c)
    return replace(anat, canal_rc=(float(r), float(q)))
