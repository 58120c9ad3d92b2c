"""Mask outlines for planar SR groups: the polygon encloses the region and excludes its holes."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as MPath

from dicom_templates.geometry import mask_polygon, signed_area


def _inside(poly: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres = np.c_[cols.ravel() + 0.5, rows.ravel() + 0.5]  # DICOM pixel centres
    return np.asarray(MPath(poly).contains_points(centres).reshape(shape))


def test_ring_with_hole_is_cut_out() -> None:
    yy, xx = np.mgrid[:120, :160]
    outer = ((xx - 80) / 60.0) ** 2 + ((yy - 60) / 45.0) ** 2 <= 1
    inner = ((xx - 80) / 45.0) ** 2 + ((yy - 60) / 30.0) ** 2 <= 1
    ring = outer & ~inner
    ring[5:8, 5:8] = True  # a smaller separate region is not the largest
    poly = mask_polygon(ring)
    region = outer & ~inner
    assert abs(signed_area(poly)) == pytest.approx(region.sum(), rel=0.03)
    inside = _inside(poly, ring.shape)
    assert (inside & region).sum() / (inside | region).sum() > 0.95
    assert not inside[60, 80], "the hole is outside the polygon"
    assert not inside[6, 6]


def test_orientation_and_coordinates() -> None:
    m = np.zeros((20, 30), dtype=bool)
    m[4:10, 12:25] = True  # rows 4-9, columns 12-24
    poly = mask_polygon(m)
    assert poly[:, 0].min() == pytest.approx(12.0, abs=0.51) and poly[:, 0].max() == pytest.approx(25.0, abs=0.51)
    assert poly[:, 1].min() == pytest.approx(4.0, abs=0.51) and poly[:, 1].max() == pytest.approx(10.0, abs=0.51)
    assert np.array_equal(_inside(poly, m.shape), m)
    with pytest.raises(ValueError, match="empty"):
        mask_polygon(np.zeros((5, 5), dtype=bool))


def test_point_budget() -> None:
    rng = np.random.default_rng(7)
    m = np.ones((200, 200), dtype=bool)
    m[rng.random((200, 200)) < 0.02] = False  # many 1-pixel holes, all below the hole minimum
    m[50:90, 50:90] = False  # one big hole
    poly = mask_polygon(m, max_points=300)
    assert len(poly) <= 300
    assert not _inside(poly, m.shape)[70, 70]
