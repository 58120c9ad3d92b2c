"""Glue between body-composition results and ``dicom_templates`` (codes, SEG and SR builders).

Only the mapping of this pipeline's structure keys to code-table keys and the outline of a
mask as a polygon live here; every DICOM object is built by ``dicom_templates`` (highdicom).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray

# this pipeline's structure keys -> dicom_templates/codes.toml segment keys
TEMPLATE_KEYS: Mapping[str, str] = {
    "skeletal_muscle": "skeletal-muscle",
    "psoas_left": "psoas-left",
    "psoas_right": "psoas-right",
    "erector_left": "erector-spinae-left",
    "erector_right": "erector-spinae-right",
    "sat": "sat",
    "vat": "vat",
    "imat": "imat",
    "sternocleidomastoid_left": "sternocleidomastoid-left",
    "sternocleidomastoid_right": "sternocleidomastoid-right",
    "paravertebral_left": "paravertebral-muscles-left",
    "paravertebral_right": "paravertebral-muscles-right",
}
LEVEL_CONCEPTS: Mapping[str, str] = {"L3": "l3-vertebra", "C3": "c3-vertebra"}


def _signed_area(pts: NDArray[np.float64]) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return float(0.5 * (np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


def polygon(mask: NDArray[np.bool_], max_points: int = 400) -> NDArray[np.float32]:
    """One closed polygon (column, row image coordinates) whose enclosed area is the mask's.

    Every boundary of the mask (outer outlines of all parts, and holes) is a loop; loops are
    chained by zero-width cuts travelled out and back, and holes run against the outlines,
    so the shoelace area of the single polygon equals the mask's area (to the half-pixel
    staircase) and OHIF, which recomputes statistics from the polygon, shows the same area.
    Coordinates follow DICOM SCOORD: the first pixel's centre is (0.5, 0.5).
    """
    import contourpy

    if not mask.any():
        raise ValueError("empty mask has no outline")
    z = np.pad(mask, 1).astype(np.float64)
    loops = [np.asarray(a, dtype=np.float64) - 1.0 + 0.5
             for a in contourpy.contour_generator(z=z, name="serial").lines(0.5)]  # type: ignore[union-attr]
    loops = [lp if np.allclose(lp[0], lp[-1]) else np.vstack([lp, lp[:1]]) for lp in loops if len(lp) >= 3]
    # outlines counter-clockwise in (column, row) = positive shoelace; holes negative
    areas = [_signed_area(lp) for lp in loops]
    order = np.argsort([-abs(a) for a in areas])
    loops = [loops[i] for i in order]
    areas = [areas[i] for i in order]
    # contourpy orients every loop with the region on the same side, so holes already run
    # against the outlines; only the overall sense is normalised at the end
    outer_sign = np.sign(areas[0]) or 1.0
    fixed = loops
    total = sum(len(lp) for lp in fixed)
    step = max(1, int(np.ceil(total / max_points)))
    thinned = []
    for lp in fixed:
        s = step if len(lp) // step >= 4 else max(1, len(lp) // 4)
        t = lp[:-1][::s]
        thinned.append(np.vstack([t, t[:1]]))
    # chain: from the current point go to the nearest remaining loop (entering it at its point
    # nearest to here), travel it round, then continue; finally retrace the cuts back home
    rest = thinned[1:]
    path = [thinned[0]]
    starts = [thinned[0][0]]
    here = thinned[0][0]
    while rest:
        dists = [np.min(np.hypot(*(lp[:-1] - here).T)) for lp in rest]
        lp = rest.pop(int(np.argmin(dists)))
        j = int(np.argmin(np.hypot(*(lp[:-1] - here).T)))
        ring = np.vstack([lp[:-1][j:], lp[:-1][:j], lp[j : j + 1]])
        path.append(ring)
        starts.append(ring[0])
        here = ring[0]
    back = np.asarray(starts[-2::-1]) if len(starts) > 1 else np.zeros((0, 2))
    pts = np.vstack([*path, back]) if len(back) else path[0]
    if not np.allclose(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    if outer_sign < 0:
        pts = pts[::-1]
    return pts.astype(np.float32)
