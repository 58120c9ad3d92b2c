"""Label maps on a volume's grid: read NIfTI (any orientation) and map it onto the DICOM grid.

NIfTI is read with SimpleITK, which reports geometry in LPS like DICOM; every voxel centre
of the target volume is mapped to the label image's index space (nearest neighbour), so
RAS/LAS storage order and flips are handled by geometry, not by hand-coded flips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from pipelines.common.volume import Volume

# Training label convention (train-seg and the MONAI backend); the phantom writes the same values.
TRAIN_CLASSES = ("background", "muscle_other", "psoas_left", "psoas_right", "erector_left", "erector_right",
                 "sat", "vat", "imat")
LEVEL_VERTEBRA_LABEL = 20  # voxels of the target vertebra (e.g. the L3 body) in a training label map


def voxel_centres(volume: Volume) -> NDArray[np.float64]:
    """LPS coordinates (z, y, x, 3) of every voxel centre of ``volume`` (exact per slice)."""
    z, y, x = volume.shape
    rows = np.arange(y, dtype=np.float64)[:, None, None] * volume.pixel_spacing[0] * volume.column_direction
    cols = np.arange(x, dtype=np.float64)[None, :, None] * volume.pixel_spacing[1] * volume.row_direction
    plane = rows + cols  # (y, x, 3)
    origins = np.stack([s.position for s in volume.slices])  # (z, 3)
    return np.asarray(origins[:, None, None, :] + plane[None])


def read_labels_on_volume(path: Path, volume: Volume) -> NDArray[np.uint8]:
    """The label image at ``path`` (NIfTI or anything SimpleITK reads) sampled on ``volume``'s voxels."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (k, j, i)
    origin = np.asarray(img.GetOrigin())  # type: ignore[no-untyped-call]
    direction = np.asarray(img.GetDirection()).reshape(3, 3)  # type: ignore[no-untyped-call]
    spacing = np.asarray(img.GetSpacing())  # type: ignore[no-untyped-call]
    inv = np.linalg.inv(direction * spacing[None, :])
    pts = voxel_centres(volume).reshape(-1, 3) - origin
    ijk = np.rint(pts @ inv.T).astype(np.int64)
    size = np.asarray(img.GetSize())  # type: ignore[no-untyped-call]
    ok = np.all((ijk >= 0) & (ijk < size), axis=1)
    out = np.zeros(len(ijk), dtype=np.uint8)
    out[ok] = arr[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]]
    return out.reshape(volume.shape)


def write_labels_for_volume(labels: NDArray[np.uint8], volume: Volume, path: Path) -> None:
    """Write ``labels`` (on ``volume``'s grid, untilted) as NIfTI with the volume's geometry."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.SetSpacing((volume.pixel_spacing[1], volume.pixel_spacing[0], volume.slice_spacing))  # type: ignore[no-untyped-call]
    img.SetOrigin(tuple(float(v) for v in volume.slices[0].position))  # type: ignore[no-untyped-call]
    d = np.stack([volume.row_direction, volume.column_direction, volume.normal], axis=1)
    img.SetDirection(tuple(float(v) for v in d.ravel()))  # type: ignore[no-untyped-call]
    sitk.WriteImage(img, str(path))
