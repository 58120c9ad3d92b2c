"""The level finder's fast array helpers give exactly what the plain numpy/scipy forms give."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from pipelines.body_composition.levels import _block_mean_max, _close_3x3_in_plane


def test_close_3x3_in_plane_is_scipy_closing_with_zero_border() -> None:
    s8 = np.zeros((3, 3, 3), bool)
    s8[1] = True
    rng = np.random.default_rng(7)
    for shape in [(1, 1, 1), (2, 1, 5), (3, 2, 2), (4, 7, 9), (3, 33, 20)]:
        for p in (0.1, 0.5, 0.9):
            m = rng.random(shape) < p
            assert np.array_equal(_close_3x3_in_plane(m), ndi.binary_closing(m, structure=s8, border_value=0))


def test_block_mean_max_is_the_one_pass_sum() -> None:
    rng = np.random.default_rng(3)
    hu = rng.normal(0.0, 300.0, (9, 12, 15)).astype(np.float32)
    for fy, fx in [(3, 3), (2, 3), (1, 2)]:
        h = hu[:, : hu.shape[1] // fy * fy, : hu.shape[2] // fx * fx]
        views = [h[:, i::fy, j::fx] for i in range(fy) for j in range(fx)]
        acc = views[0].astype(np.float32)
        gmax = acc.copy()
        for v in views[1:]:
            acc += v
            np.maximum(gmax, v, out=gmax)
        g, gm = _block_mean_max(h, fy, fx, chunk=4)
        assert np.array_equal(g, acc * np.float32(1.0 / len(views)))
        assert np.array_equal(gm, gmax)
