"""Mask outlines as SR polygons (image pixel coordinates), for planar TID 1501 groups.

OHIF 3.13 recomputes and shows the statistics of a PlanarFreehandROI polygon (area, HU inside
it) once it is drawn, so the polygon should enclose exactly the region the numbers describe.
:func:`mask_polygon` therefore traces a region *with its holes*: the outer boundary and each
hole boundary joined by zero-width slits into one closed polygon ("keyhole" polygon).  Its
shoelace area is the region's area and an even-odd (or non-zero) point-in-polygon test
excludes the holes, which is how OHIF computes area and statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["mask_polygon", "signed_area"]


def signed_area(pts: NDArray[np.floating[Any]]) -> float:
    """Shoelace signed area of a polygon (positive when counter-clockwise in x, y)."""
    x, y = pts[:, 0], pts[:, 1]
    return float(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _contour(mask: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Longest 0.5 iso-contour of a filled binary mask, open (first point not repeated), x=column, y=row.

    Works on the mask's bounding box (plus a one-pixel margin) only.
    """
    import contourpy

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("no contour found")
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    padded = np.pad(mask[r0:r1, c0:c1].astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    if not lines:
        raise ValueError("no contour found")
    longest = max(lines, key=lambda line: int(np.asarray(line).shape[0]))
    pts = np.asarray(longest, dtype=np.float64)[:, :2] - 1.0 + np.array([c0, r0], dtype=np.float64)
    if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    return pts


def _subsample(pts: NDArray[np.float64], n: int) -> NDArray[np.float64]:
    if len(pts) <= n:
        return pts
    idx = np.linspace(0, len(pts), n, endpoint=False).astype(int)
    return np.asarray(pts[idx], dtype=np.float64)


def mask_polygon(
    mask2d: NDArray[np.bool_],
    *,
    max_points: int = 1024,
    min_hole_pixels: int = 16,
    max_holes: int = 32,
) -> NDArray[np.float64]:
    """One closed polygon, (N, 2) DICOM image coordinates (column, row), of the largest region.

    The largest 8-connected region of ``mask2d`` is traced along the boundary between its
    pixels and the rest (the 0.5 iso-line between pixel centres; DICOM puts pixel centres at
    +0.5).  Holes of at least ``min_hole_pixels`` (the ``max_holes`` largest) are cut out
    through slits; smaller holes stay inside.  At most about ``max_points`` points.

    Raises ValueError for an empty mask.
    """
    from scipy import ndimage

    mask2d = np.asarray(mask2d, dtype=bool)
    labels, n = ndimage.label(mask2d, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        raise ValueError("empty mask has no outline")
    region = labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)
    filled = ndimage.binary_fill_holes(region)
    outer = _contour(filled)
    if signed_area(outer) < 0:
        outer = outer[::-1]

    hole_labels, n_holes = ndimage.label(filled & ~region)  # 4-connected holes
    holes: list[NDArray[np.float64]] = []
    if n_holes:
        sizes = np.bincount(hole_labels.ravel())[1:]
        order = [int(i) + 1 for i in np.argsort(sizes)[::-1][:max_holes] if sizes[i] >= min_hole_pixels]
        boxes = ndimage.find_objects(hole_labels)
        for label in order:
            box = boxes[label - 1]
            assert box is not None
            r0, c0 = box[0].start, box[1].start
            h = _contour(hole_labels[box] == label) + np.array([c0, r0], dtype=np.float64)
            holes.append(h[::-1] if signed_area(h) > 0 else h)  # holes run the other way round

    total = len(outer) + sum(len(h) for h in holes)
    budget = max(max_points - 2 * len(holes), 16)
    if total > budget:
        scale = budget / total
        outer = _subsample(outer, max(int(len(outer) * scale), 8))
        holes = [_subsample(h, max(int(len(h) * scale), 4)) for h in holes]

    poly = outer
    for h in holes:  # join each hole to the nearest vertex of what is built so far
        d = ((poly[:, None, :] - h[None, :, :]) ** 2).sum(axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        poly = np.vstack([poly[: i + 1], h[j:], h[: j + 1], poly[i:]])
    return poly + 0.5
