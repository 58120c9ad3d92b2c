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
}
LEVEL_CONCEPTS: Mapping[str, str] = {"L3": "l3-vertebra", "C3": "c3-vertebra"}


def polygon(mask: NDArray[np.bool_], max_points: int = 200) -> NDArray[np.float32]:
    """Closed outline (column, row image coordinates) of the largest connected part of ``mask``.

    For display only (OHIF draws it); the area reported is the mask's pixel count, not the
    polygon's.  Coordinates follow DICOM SCOORD: the first pixel's centre is (0.5, 0.5).
    """
    import contourpy
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        raise ValueError("empty mask has no outline")
    sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    part = np.pad(lab == int(np.argmax(sizes)) + 1, 1).astype(np.float64)
    lines = contourpy.contour_generator(z=part, name="serial").lines(0.5)
    best = max(lines, key=lambda a: len(a))  # type: ignore[arg-type]
    pts = np.asarray(best, dtype=np.float64) - 1.0 + 0.5  # undo the padding; pixel centres at +0.5
    if len(pts) > max_points:
        pts = pts[:: int(np.ceil(len(pts) / max_points))]
    if not np.allclose(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    return pts.astype(np.float32)
