"""Binary morphology on one slice, by disks and distance transforms (scipy only, cheap for large radii)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi


def disk(radius_px: float) -> NDArray[np.bool_]:
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


def _box(mask: NDArray[np.bool_], pad: int) -> tuple[slice, slice] | None:
    """The bounding box of ``mask`` grown by ``pad`` pixels (clamped to the array); None for an empty mask."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    return (slice(max(0, int(rows[0]) - pad), min(mask.shape[0], int(rows[-1]) + pad + 1)),
            slice(max(0, int(cols[0]) - pad), min(mask.shape[1], int(cols[-1]) + pad + 1)))


def erode(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Erosion by a disk, via the distance transform for large radii.

    The transform runs on the mask's box grown by one pixel only: every pixel beyond it is background, and the
    box's one-pixel rim (background as well) is at least as near to any pixel inside as anything farther out,
    so the distances, and the result, are those of the whole array."""
    box = _box(mask, 1)
    out = np.zeros(mask.shape, bool)
    if box is None:
        return out
    if radius_px <= 1.5:  # a disk of 3x3 at most: the rim is background, as beyond the array
        out[box] = ndi.binary_erosion(mask[box], disk(radius_px))
    else:
        out[box] = ndi.distance_transform_edt(mask[box]) > radius_px
    return out


def dilate(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Dilation by a disk, via the distance transform for large radii, on the mask's box grown by the radius
    (nothing beyond it is within the radius of the mask): the whole array's result."""
    box = _box(mask, int(np.ceil(radius_px)) + 1)
    out = np.zeros(mask.shape, bool)
    if box is None:
        return out
    if radius_px <= 1.5:
        out[box] = ndi.binary_dilation(mask[box], disk(radius_px))
    else:
        out[box] = ndi.distance_transform_edt(~mask[box]) <= radius_px
    return out


def opening(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    """Opening by a disk; via distance transforms for larger radii (far cheaper than binary_opening)."""
    if radius_px <= 1.5:
        return np.asarray(ndi.binary_opening(mask, disk(radius_px)))
    return dilate(erode(mask, radius_px), radius_px)


def closing(mask: NDArray[np.bool_], radius_px: float) -> NDArray[np.bool_]:
    return erode(dilate(mask, radius_px), radius_px)


def components_touching(mask: NDArray[np.bool_], seed: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The connected components of ``mask`` that share a pixel with ``seed``."""
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    ids = np.unique(lab[seed & mask])
    keep = np.zeros(n + 1, bool)
    keep[ids] = True
    keep[0] = False
    return np.asarray(keep[lab])


def label_sizes(lab: NDArray[np.integer], n: int) -> NDArray[np.float64]:
    """Pixel count of each label 1..n of ``lab`` (``ndi.sum_labels`` of ones, by one bincount)."""
    return np.bincount(lab.ravel(), minlength=n + 1)[1 : n + 1].astype(np.float64)


def label_min(values: NDArray[np.floating], lab: NDArray[np.integer], n: int) -> NDArray[np.float64]:
    """Smallest of ``values`` over each label 1..n of ``lab`` (inf for a label with no pixel)."""
    out = np.full(n + 1, np.inf)
    sel = lab > 0
    np.minimum.at(out, lab[sel], np.broadcast_to(values, lab.shape)[sel])
    return out[1:]


def largest_component(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    lab, n = ndi.label(mask)
    if n == 0:
        return np.zeros(mask.shape, bool)
    sizes = label_sizes(lab, n)
    return np.asarray(lab == int(np.argmax(sizes)) + 1)


def runs(flags: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Inclusive (first, last) index of each run of True in a 1D flag array."""
    f = np.concatenate([[False], np.asarray(flags, bool), [False]]).astype(np.int8)
    d = np.diff(f)
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0] - 1
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]
