"""Geometry helpers between :class:`pipelines.common.volume.Volume` and SimpleITK images.

Arrays are (slices, rows, columns) = (z, y, x) throughout, which is also SimpleITK's numpy order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipelines.common.volume import Volume


def slice_image(volume: Volume, k: int, array: NDArray[Any] | None = None) -> sitk.Image:
    """A one-slice 3D SimpleITK image with the exact geometry of slice ``k`` of ``volume``."""
    rows, cols = volume.shape[1:]
    data = np.zeros((1, rows, cols), np.uint8) if array is None else array[k : k + 1]
    img = sitk.GetImageFromArray(np.ascontiguousarray(data))
    s = volume.slices[k]
    img.SetOrigin(tuple(float(v) for v in s.position))
    img.SetSpacing((volume.pixel_spacing[1], volume.pixel_spacing[0], volume.slice_spacing or 1.0))
    img.SetDirection(_direction(volume))
    return img


def _direction(volume: Volume) -> tuple[float, ...]:
    m = np.column_stack([volume.row_direction, volume.column_direction, volume.normal])
    return tuple(float(v) for v in m.ravel())


def to_sitk(volume: Volume, array: NDArray[Any] | None = None) -> sitk.Image:
    """``array`` (default: the HU array) as a SimpleITK image on the volume's grid.

    The grid is exact for untilted, uniformly spaced series; callers check
    ``volume.spacing_uniform`` and ``volume.tilted`` where it matters.
    """
    data = volume.hu if array is None else array
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data))
    img.SetOrigin(tuple(float(v) for v in volume.slices[0].position))
    img.SetSpacing((volume.pixel_spacing[1], volume.pixel_spacing[0], volume.slice_spacing or 1.0))
    img.SetDirection(_direction(volume))
    return img


def affine_to_sitk(array: NDArray[Any], affine: NDArray[np.float64]) -> sitk.Image:
    """A (z, y, x) array with a highdicom-style affine (columns: slice, row, column steps) as an image."""
    steps = np.asarray(affine, dtype=np.float64)[:3, :3]
    origin = np.asarray(affine, dtype=np.float64)[:3, 3]
    spacing = np.linalg.norm(steps, axis=0)  # (slice, row, column) step lengths
    spacing = np.where(spacing > 0, spacing, 1.0)
    dirs = steps / spacing  # columns: slice dir, row-index dir (y), column-index dir (x)
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetOrigin(tuple(float(v) for v in origin))
    img.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    direction = np.column_stack([dirs[:, 2], dirs[:, 1], dirs[:, 0]])
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img


def resample_onto(volume: Volume, image: sitk.Image, linear: bool) -> NDArray[np.float32]:
    """Sample ``image`` at every voxel centre of ``volume`` (slice by slice: exact for any spacing)."""
    out = np.zeros(volume.shape, dtype=np.float32)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    src = sitk.Cast(image, sitk.sitkFloat32)
    for k in range(volume.shape[0]):
        ref = slice_image(volume, k)
        res = sitk.Resample(src, ref, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
        out[k] = sitk.GetArrayViewFromImage(res)[0]
    return out
