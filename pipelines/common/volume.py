"""Series to volume: read a stored CT series into a HU array with its geometry checked.

The stage does not guess: it sorts slices by their position along the slice normal,
measures the spacing between them, and reports gantry tilt, uneven spacing and mixed
orientation so that later stages (the QC gate) can resample or refuse with a reason.
Multi-frame (Enhanced CT) instances are expanded into their frames.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

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

    def instance_number(self, k: int) -> int | None:
        """Slice ``k``'s Instance Number (what a viewer shows as the image number); None when absent or unreadable."""
        value = self.slices[k].dataset.get("InstanceNumber")
        try:
            return int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None

    def slices_label(self, a: int, b: int | None = None, fallback: str = "") -> str:
        """Slices ``a``..``b`` as a reader finds them in a viewer: by Instance Number ("image 31", "images 48-57");
        where one is absent (or an index is outside the volume), "slice(s)" and the 1-based indices, then
        ``fallback`` (e.g. " from the feet" for a volume on patient axes)."""
        b = a if b is None else b
        n = len(self.slices)
        na = self.instance_number(a) if 0 <= a < n else None
        nb = self.instance_number(b) if 0 <= b < n else None
        x, y, word = (na, nb, "image") if na is not None and nb is not None else (a + 1, b + 1, "slice")
        x, y = min(x, y), max(x, y)
        return (f"{word} {x}" if x == y else f"{word}s {x}-{y}") + ("" if word == "image" else fallback)

    def source_datasets(self) -> list[Dataset]:
        """Distinct source instances in slice order (one per instance for multi-frame input)."""
        seen: dict[str, Dataset] = {}
        for s in self.slices:
            seen.setdefault(str(s.dataset.SOPInstanceUID), s.dataset)
        return list(seen.values())

    def canonical_axial(self) -> tuple[Volume, Reorient]:
        """This volume re-ordered to patient axes, and how to map results back.

        In the returned volume ``hu[k, r, c]``: ``k`` increases toward the head (+z), ``r``
        toward the patient's back (+y) and ``c`` toward the patient's left (+x), whatever the
        stored ImageOrientationPatient (prone, mirrored rows, feet-first, rows along y).
        Geometry (directions, per-slice positions, spacings) is updated so that
        :meth:`index_to_world` stays exact.  Only axial stacks (within 45 degrees) qualify.
        """
        if abs(float(self.normal[2])) < np.cos(np.deg2rad(45.0)):
            raise StageError(STAGE, self.series_uid, "not an axial stack: cannot re-order to patient axes")
        row_dir: NDArray[np.float64] = np.asarray(self.row_direction, dtype=np.float64)
        col_dir: NDArray[np.float64] = np.asarray(self.column_direction, dtype=np.float64)
        dy, dx = self.pixel_spacing
        n, rows, cols = self.shape
        transpose = abs(float(row_dir[0])) < abs(float(row_dir[1]))
        if transpose:
            row_dir, col_dir = col_dir, row_dir
            dy, dx = dx, dy
            rows, cols = cols, rows
        flip_cols = float(row_dir[0]) < 0
        flip_rows = float(col_dir[1]) < 0
        shift: NDArray[np.float64] = np.zeros(3)
        if flip_cols:
            shift = np.asarray(shift + (cols - 1) * dx * row_dir, dtype=np.float64)
            row_dir = np.asarray(-row_dir, dtype=np.float64)
        if flip_rows:
            shift = np.asarray(shift + (rows - 1) * dy * col_dir, dtype=np.float64)
            col_dir = np.asarray(-col_dir, dtype=np.float64)
        cross = np.cross(row_dir, col_dir)
        normal: NDArray[np.float64] = np.asarray(cross / np.linalg.norm(cross), dtype=np.float64)
        if float(normal[2]) < 0:  # only possible for a left-handed input; keep the stack order honest
            raise StageError(STAGE, self.series_uid, "row and column directions form a left-handed frame")
        # slices were sorted along the stored normal; re-sort along the new one
        flip_slices = bool(float(normal @ self.normal) < 0)
        reo = Reorient(transpose=transpose, flip_cols=flip_cols, flip_rows=flip_rows, flip_slices=flip_slices,
                       n_slices=n)
        if reo.identity:
            return self, reo
        ori = np.concatenate([row_dir, col_dir])
        new_slices = tuple(replace(s, position=np.asarray(s.position + shift), orientation=ori,
                                   pixel_spacing=(dy, dx)) for s in self.slices)
        if flip_slices:
            new_slices = new_slices[::-1]
        positions = np.array([float(s.position @ normal) for s in new_slices])
        canon = replace(self, hu=np.ascontiguousarray(reo.forward(self.hu)), slices=new_slices,
                        row_direction=np.asarray(row_dir, dtype=np.float64),
                        column_direction=np.asarray(col_dir, dtype=np.float64), normal=normal,
                        pixel_spacing=(dy, dx), positions=positions)
        return canon, reo

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


@dataclass(frozen=True)
class Reorient:
    """How :meth:`Volume.canonical_axial` re-ordered a volume's arrays, and the way back.

    Forward, in this order: swap rows and columns (``transpose``), reverse columns, reverse
    rows, reverse slices.  Only re-ordering: no voxel is resampled, so a mask mapped back with
    :meth:`to_source` lies on exactly the stored pixels.
    """

    transpose: bool = False
    flip_cols: bool = False
    flip_rows: bool = False
    flip_slices: bool = False
    n_slices: int = 0

    @property
    def identity(self) -> bool:
        return not (self.transpose or self.flip_cols or self.flip_rows or self.flip_slices)

    def forward(self, a: NDArray[Any]) -> NDArray[Any]:
        """Source (slices, rows, columns) array -> canonical order (a view where possible)."""
        if self.transpose:
            a = a.transpose(0, 2, 1)
        if self.flip_cols:
            a = a[:, :, ::-1]
        if self.flip_rows:
            a = a[:, ::-1, :]
        if self.flip_slices:
            a = a[::-1]
        return a

    def to_source(self, a: NDArray[Any]) -> NDArray[Any]:
        """Canonical (slices, rows, columns) array -> the stored series' own array order."""
        if self.flip_slices:
            a = a[::-1]
        if self.flip_rows:
            a = a[:, ::-1, :]
        if self.flip_cols:
            a = a[:, :, ::-1]
        if self.transpose:
            a = a.transpose(0, 2, 1)
        return np.ascontiguousarray(a)

    def slice_to_source(self, a: NDArray[Any]) -> NDArray[Any]:
        """One canonical (rows, columns) plane -> the stored image's own row and column order."""
        out: NDArray[Any] = self.to_source(a[None])[0]
        return out

    def index_to_source(self, k: int) -> int:
        """Canonical slice index -> index into the source volume's slices."""
        return self.n_slices - 1 - k if self.flip_slices else k

    def span_to_source(self, a: int, b: int) -> tuple[int, int]:
        """Canonical slices ``a``..``b`` -> (first, last) in the source volume's slice order."""
        x, y = self.index_to_source(a), self.index_to_source(b)
        return (min(x, y), max(x, y))

    def index_from_source(self, k: int) -> int:
        return self.index_to_source(k)


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
