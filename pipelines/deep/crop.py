"""Stage ``roi-crop``: a fixed-size, isotropic patch of the CT around the tumour (2D or 3D).

The patch is a cube (3D) or square on the tumour's largest slice (2D) of ``crop_mm`` side,
centred on the tumour's centroid, sampled on ``size`` voxels per side in the CT's own
orientation (SimpleITK resampling, linear), HU windowed to [0, 1].  The patch keeps its
geometry (a SimpleITK reference image), so maps computed on it go back onto the CT grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipelines.common.volume import Volume
from pipelines.roi.geometry import resample_onto, to_sitk


@dataclass(frozen=True)
class Patch:
    array: NDArray[np.float32]  # (size, size, size) or (size, size), values in [0, 1]
    reference: sitk.Image  # the patch grid (3D; one slice thick for 2D patches)
    slice_index: int | None  # CT slice of a 2D patch


class RoiCrop:
    name = "roi-crop"

    def __init__(self, dims: int, size: int = 64, crop_mm: float = 64.0, window: tuple[float, float] = (-200.0, 300.0)) -> None:
        if dims not in (2, 3):
            raise ValueError(f"dims {dims}: expected 2 or 3")
        self.dims, self.size, self.crop_mm, self.window = dims, size, crop_mm, window

    def run(self, volume: Volume, mask: NDArray[np.bool_]) -> Patch:
        image = to_sitk(volume)
        spacing = self.crop_mm / self.size
        if self.dims == 3:
            idx = np.argwhere(mask).mean(axis=0)  # (k, row, col)
            k_slice = None
            size = [self.size] * 3
        else:
            k_slice = int(np.argmax(mask.sum(axis=(1, 2))))
            rc = np.argwhere(mask[k_slice]).mean(axis=0)
            idx = np.array([float(k_slice), rc[0], rc[1]])
            size = [self.size, self.size, 1]
        centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(idx[2]), float(idx[1]), float(idx[0])]))
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        half = np.array([(s - 1) / 2 * spacing for s in size])
        if self.dims == 2:
            half[2] = 0.0
        origin = centre - direction @ half
        ref = sitk.Image(size, sitk.sitkFloat32)
        ref.SetSpacing((spacing, spacing, spacing if self.dims == 3 else volume.slice_spacing or 1.0))
        ref.SetDirection(image.GetDirection())
        ref.SetOrigin(tuple(float(v) for v in origin))
        res = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
        arr = np.asarray(sitk.GetArrayFromImage(res), dtype=np.float32)
        lo, hi = self.window
        arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        return Patch(arr if self.dims == 3 else arr[0], ref, k_slice)


def patch_map_to_volume(volume: Volume, patch: Patch, values: NDArray[np.float32]) -> NDArray[np.float32]:
    """A map on the patch grid (same shape as ``patch.array``) sampled on the CT grid (0 outside)."""
    arr = values if values.ndim == 3 else values[None]
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32))
    img.CopyInformation(patch.reference)
    if patch.slice_index is None:
        return resample_onto(volume, img, linear=True)
    out = np.zeros(volume.shape, np.float32)
    # The 2D patch is one slice thick: sample it on its own CT slice only.
    full = resample_onto_slice(volume, img, patch.slice_index)
    out[patch.slice_index] = full
    return out


def resample_onto_slice(volume: Volume, image: sitk.Image, k: int) -> NDArray[np.float32]:
    from pipelines.roi.geometry import slice_image

    ref = slice_image(volume, k)
    res = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayViewFromImage(res)[0], dtype=np.float32)
