"""Series to volume: read a stored CT series into a HU array with its geometry checked.

The stage does not guess: it sorts slices by their position along the slice normal,
measures the spacing between them, and reports gantry tilt, uneven spacing and mixed
orientation so that later stages (the QC gate) can resample or refuse with a reason.
Multi-frame (Enhanced CT) instances are expanded into their frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines.base import StageError

log = logging.getLogger(__name__)

STAGE = "series-to-volume"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


@dataclass(frozen=True)
class Slice:
    """One image plane: the dataset it comes from and, for multi-frame, its frame index."""

    dataset: Dataset
    frame: int | None  # None for single-frame images; 0-based frame index otherwise
    position: NDArray[np.float64]  # ImagePositionPatient (mm)
    orientation: NDArray[np.float64]  # ImageOrientationPatient: row cosines then column cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    slope: float
    intercept: float
    thickness: float | None


@dataclass(frozen=True)
class Volume:
    """A CT series as a (slices, rows, columns) float32 HU array plus geometry.

    ``slices[k]`` is the source plane of ``hu[k]``; slices are sorted by increasing
    position along ``normal`` (patient-based coordinates, LPS, mm).
    """

    series_uid: str
    study_uid: str
    hu: NDArray[np.float32]
    slices: tuple[Slice, ...]
    row_direction: NDArray[np.float64]  # direction of increasing column index (x)
    column_direction: NDArray[np.float64]  # direction of increasing row index (y)
    normal: NDArray[np.float64]
    pixel_spacing: tuple[float, float]  # (row spacing = y, column spacing = x) mm
    positions: NDArray[np.float64]  # projection of each slice's IPP on the normal (mm)
    slice_spacing: float  # median distance between consecutive slices (mm)
    spacing_uniform: bool
    max_spacing_deviation: float  # mm
    tilt_degrees: float  # angle between the slice stacking direction and the normal
    slice_thickness: float | None

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return (int(z), int(y), int(x))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def voxel_volume_mm3(self) -> float:
        return self.slice_spacing * self.pixel_spacing[0] * self.pixel_spacing[1]

    @property
    def pixel_area_mm2(self) -> float:
        return self.pixel_spacing[0] * self.pixel_spacing[1]

    @property
    def is_axial(self) -> bool:
        """True when the slice normal is within 10 degrees of the patient's head-feet axis."""
        return bool(abs(float(self.normal[2])) > np.cos(np.deg2rad(10.0)))

    @property
    def tilted(self) -> bool:
        return self.tilt_degrees > 0.5

    @property
    def first_dataset(self) -> Dataset:
        return self.slices[0].dataset

    def source_datasets(self) -> list[Dataset]:
        """Distinct source instances in slice order (one per instance for multi-frame input)."""
        seen: dict[str, Dataset] = {}
        for s in self.slices:
            seen.setdefault(str(s.dataset.SOPInstanceUID), s.dataset)
        return list(seen.values())

    def world_to_index(self, point: Sequence[float]) -> tuple[float, float, float]:
        """Continuous (k, row, column) index of an LPS point, for untilted volumes."""
        p = np.asarray(point, dtype=np.float64) - self.slices[0].position
        col = float(p @ self.row_direction) / self.pixel_spacing[1]
        row = float(p @ self.column_direction) / self.pixel_spacing[0]
        k = float(p @ self.normal) / self.slice_spacing if self.slice_spacing else 0.0
        return (k, row, col)

    def index_to_world(self, k: float, row: float, col: float) -> NDArray[np.float64]:
        """LPS point of a continuous (k, row, column) index (exact for each slice, tilted or not)."""
        k0 = int(np.clip(round(k), 0, len(self.slices) - 1))
        origin = self.slices[k0].position + (k - k0) * self.slice_spacing * self.normal
        return np.asarray(
            origin + col * self.pixel_spacing[1] * self.row_direction + row * self.pixel_spacing[0] * self.column_direction
        )


def _float_list(value: object, n: int, what: str, series_uid: str) -> NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as e:
        raise StageError(STAGE, series_uid, f"{what} is not numeric") from e
    if arr.shape != (n,):
        raise StageError(STAGE, series_uid, f"{what} has {arr.size} values, expected {n}")
    return arr


def _slices_of(ds: Dataset, series_uid: str) -> list[Slice]:
    """Expand one instance into its image planes."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        out = []
        for i, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):

            def group(name: str, frame: Dataset = frame) -> Dataset | None:
                if name in frame:
                    return frame[name][0]  # type: ignore[no-any-return]
                if name in shared:
                    return shared[name][0]  # type: ignore[no-any-return]
                return None

            pos = group("PlanePositionSequence")
            ori = group("PlaneOrientationSequence")
            meas = group("PixelMeasuresSequence")
            voi = group("PixelValueTransformationSequence")
            if pos is None or ori is None or meas is None:
                raise StageError(STAGE, series_uid, f"frame {i + 1} lacks plane position, orientation or pixel measures")
            out.append(
                Slice(
                    dataset=ds,
                    frame=i,
                    position=_float_list(pos.ImagePositionPatient, 3, "ImagePositionPatient", series_uid),
                    orientation=_float_list(ori.ImageOrientationPatient, 6, "ImageOrientationPatient", series_uid),
                    pixel_spacing=tuple(_float_list(meas.PixelSpacing, 2, "PixelSpacing", series_uid)),  # type: ignore[arg-type]
                    slope=float(getattr(voi, "RescaleSlope", 1.0) if voi is not None else 1.0),
                    intercept=float(getattr(voi, "RescaleIntercept", 0.0) if voi is not None else 0.0),
                    thickness=float(meas.SliceThickness) if "SliceThickness" in meas else None,
                )
            )
        return out
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds:
            raise StageError(STAGE, series_uid, f"instance {ds.get('SOPInstanceUID', '?')} has no {kw}")
    return [
        Slice(
            dataset=ds,
            frame=None,
            position=_float_list(ds.ImagePositionPatient, 3, "ImagePositionPatient", series_uid),
            orientation=_float_list(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", series_uid),
            pixel_spacing=tuple(_float_list(ds.PixelSpacing, 2, "PixelSpacing", series_uid)),  # type: ignore[arg-type]
            slope=float(ds.get("RescaleSlope", 1.0)),
            intercept=float(ds.get("RescaleIntercept", 0.0)),
            thickness=float(ds.SliceThickness) if ds.get("SliceThickness") not in (None, "") else None,
        )
    ]


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


def _native_pixels(ds: Dataset) -> NDArray[np.generic] | None:
    """Pixels of an uncompressed single-frame 16-bit greyscale image read straight from the
    buffer (what ``pixel_array`` returns, without its per-instance handler overhead), or None
    where the general path is needed (compressed, other layouts, signed with unused high bits,
    or unsigned with bits set above BitsStored)."""
    try:
        ts = str(ds.file_meta.TransferSyntaxUID)
        if (ts not in _NATIVE_LE or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.SamplesPerPixel) != 1
                or int(ds.BitsAllocated) != 16):
            return None
        stored, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
        rows, cols = int(ds.Rows), int(ds.Columns)
        data = ds.PixelData
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if len(data) < 2 * rows * cols or (signed and stored != 16):
        return None
    arr = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    if not signed and stored < 16 and bool((arr >> stored).any()):
        return None
    return arr


class SeriesToVolume:
    """Stage: files of one series -> :class:`Volume`.

    Parameters
    ----------
    orientation_tolerance:
        Largest difference between any two slices' orientation cosines still taken as one stack.
    spacing_tolerance_mm:
        Largest deviation from the median slice spacing still called uniform.
    """

    name = STAGE

    def __init__(self, orientation_tolerance: float = 1e-3, spacing_tolerance_mm: float = 0.05) -> None:
        self.orientation_tolerance = orientation_tolerance
        self.spacing_tolerance_mm = spacing_tolerance_mm

    def run(self, files: Sequence[Path] | Sequence[Dataset]) -> Volume:
        datasets = [f if isinstance(f, Dataset) else pydicom.dcmread(f) for f in files]
        if not datasets:
            raise StageError(STAGE, "", "no instances")
        series_uid = str(datasets[0].get("SeriesInstanceUID", ""))
        study_uid = str(datasets[0].get("StudyInstanceUID", ""))
        images = [d for d in datasets if "PixelData" in d]
        if not images:
            raise StageError(STAGE, series_uid, "no image instances in the series")
        if len({str(d.get("SeriesInstanceUID", "")) for d in images}) > 1:
            raise StageError(STAGE, series_uid, "instances from more than one series")
        slices = [s for d in images for s in _slices_of(d, series_uid)]

        ori0 = slices[0].orientation
        if any(np.max(np.abs(s.orientation - ori0)) > self.orientation_tolerance for s in slices):
            raise StageError(STAGE, series_uid, "slices have different orientations (not one stack)")
        row_dir, col_dir = ori0[:3], ori0[3:]
        cross = np.cross(row_dir, col_dir)
        normal: NDArray[np.float64] = np.asarray(cross / np.linalg.norm(cross), dtype=np.float64)

        proj = np.array([float(s.position @ normal) for s in slices])
        order = np.argsort(proj, kind="stable")
        slices = [slices[i] for i in order]
        proj = proj[order]
        if len(slices) > 1 and np.min(np.diff(proj)) < 1e-3:
            raise StageError(STAGE, series_uid, "two slices share one position (duplicate or multi-phase series)")
        spacings = {s.pixel_spacing for s in slices}
        if len(spacings) > 1:
            raise StageError(STAGE, series_uid, f"slices have different pixel spacings {sorted(spacings)}")
        shapes = {(int(s.dataset.Rows), int(s.dataset.Columns)) for s in slices}
        if len(shapes) > 1:
            raise StageError(STAGE, series_uid, f"slices have different sizes {sorted(shapes)}")

        if len(slices) > 1:
            diffs = np.diff(proj)
            spacing = float(np.median(diffs))
            deviation = float(np.max(np.abs(diffs - spacing)))
            stack = slices[-1].position - slices[0].position
            cos = abs(float(stack @ normal)) / float(np.linalg.norm(stack))
            tilt = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
        else:
            spacing = float(slices[0].thickness or 1.0)
            deviation, tilt = 0.0, 0.0

        hu = np.empty((len(slices), *shapes.pop()), dtype=np.float32)
        cache: dict[int, NDArray[np.generic]] = {}
        for k, s in enumerate(slices):
            try:
                key = id(s.dataset)
                if key not in cache:
                    native = _native_pixels(s.dataset) if s.frame is None else None
                    cache[key] = native if native is not None else s.dataset.pixel_array
                pixels = cache[key] if s.frame is None else cache[key][s.frame]
            except Exception as e:  # decoder plugins raise many types
                raise StageError(STAGE, series_uid, f"cannot decode pixel data: {e}") from e
            np.multiply(pixels, np.float32(s.slope), out=hu[k], casting="unsafe")
            hu[k] += np.float32(s.intercept)

        thickness = slices[0].thickness
        log.debug("series %s: %d slices, spacing %.3f mm, tilt %.2f deg", series_uid, len(slices), spacing, tilt)
        return Volume(
            series_uid=series_uid,
            study_uid=study_uid,
            hu=hu,
            slices=tuple(slices),
            row_direction=row_dir,
            column_direction=col_dir,
            normal=normal,
            pixel_spacing=slices[0].pixel_spacing,
            positions=proj,
            slice_spacing=spacing,
            spacing_uniform=deviation <= self.spacing_tolerance_mm,
            max_spacing_deviation=deviation,
            tilt_degrees=tilt,
            slice_thickness=thickness,
        )


def load_series(files: Sequence[Path]) -> Volume:
    """Convenience: :class:`SeriesToVolume` with default tolerances."""
    return SeriesToVolume().run(files)
