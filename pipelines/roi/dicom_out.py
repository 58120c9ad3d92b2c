"""DICOM outputs of the tumour pipelines through ``dicom_templates`` (highdicom underneath).

* :func:`build_mask_seg` - a BINARY SEG of masks keyed by code-table segment (tumour, rings, attention).
* :func:`build_tumour_sr` - a TID 1500 SR with one OHIF-visible planar group: every NUM is
  inferred from a closed POLYLINE of the tumour outline on its largest slice.

The helpers here only adapt a :class:`pipelines.common.volume.Volume` and its masks to the
templates' inputs (source images in slice order, outline polygon in image coordinates).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_templates.common import Algorithm
from dicom_templates.seg import build_seg
from dicom_templates.sr import Measurement, PlanarGroup, build_measurement_report
from pipelines.base import Identity, StageError
from pipelines.common.volume import Volume

__all__ = ["Algorithm", "Measurement", "build_mask_seg", "source_images", "build_tumour_sr", "largest_slice_outline", "save"]


def source_images(volume: Volume) -> list[Dataset]:
    """Source images in slice order; an empty SpecificCharacterSet (seen in real GE data) is dropped
    from a shallow copy, since highdicom refuses '' as a character set."""
    sources = volume.source_datasets()
    if len(sources) != volume.shape[0]:
        raise StageError("dicom-output", volume.series_uid, "multi-frame source images are not supported for SEG/SR output")
    out = []
    for ds in sources:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            ds = copy.copy(ds)
            del ds.SpecificCharacterSet
        out.append(ds)
    return out


def build_mask_seg(volume: Volume, masks: Mapping[str, NDArray[np.bool_]], identity: Identity, algorithm: Algorithm,
                   series_description: str, labels: Mapping[str, str] | None = None) -> hd.seg.Segmentation:
    """BINARY SEG, one segment per code-table key of ``masks`` (masks on the volume grid)."""
    return build_seg(source_images(volume), masks, algorithm, identity, series_description[:64], labels=labels)


def largest_slice_outline(mask: NDArray[np.bool_]) -> tuple[int, NDArray[np.float32]]:
    """(slice index, closed outline in image coordinates (column, row)) of the largest cross-section.

    The outline follows the mask's pixel edges' midpoints (contour at 0.5 of the pixel-centre
    grid); DICOM image coordinates put pixel (r, c)'s centre at (c + 0.5, r + 0.5).
    """
    import contourpy

    k = int(np.argmax(mask.sum(axis=(1, 2))))
    plane = np.pad(mask[k].astype(np.float64), 1)
    lines = contourpy.contour_generator(z=plane).lines(0.5)
    if not lines:
        raise ValueError("empty slice")
    line = max(lines, key=lambda a: len(a))
    pts = np.asarray(line, dtype=np.float64) - 1.0 + 0.5
    if not np.allclose(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    return k, pts.astype(np.float32)


def build_tumour_sr(volume: Volume, mask: NDArray[np.bool_], measurements: Sequence[Measurement], identity: Identity,
                    algorithm: Algorithm, series_description: str, tracking_id: str = "tumour",
                    finding: str = "tumour") -> hd.sr.Comprehensive3DSR:
    sources = source_images(volume)
    k, polygon = largest_slice_outline(mask)
    group = PlanarGroup(tracking_id=tracking_id, finding=finding, image=sources[k], polygon=polygon,
                        measurements=list(measurements))
    return build_measurement_report([sources[k]], [group], algorithm, identity, series_description[:64])


def save(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)
