"""Stage ``roi-to-mask``: a DICOM SEG or RTSTRUCT -> a boolean mask on the CT grid.

SEG (binary, fractional or labelmap) is read with highdicom (``segread`` + ``get_volume``) and
resampled slice by slice onto the CT voxel centres in patient coordinates (LPS, mm), so a SEG
on a sub-grid, a sparse SEG, or one with a different frame order all land where they belong.
RTSTRUCT closed planar contours are rasterised on the CT slice they lie on with the even-odd
rule (an inner contour on the same plane is a hole), at pixel centres, in millimetres.

References are checked before anything is drawn: the object must share the CT's frame of
reference or reference the CT's images by SOP Instance UID, and every image it references
must exist in the series.  Otherwise :class:`pipelines.base.StageError` says what is wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as PolyPath
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines.base import StageError
from pipelines.common.volume import Volume
from pipelines.roi.geometry import affine_to_sitk, resample_onto, to_sitk

log = logging.getLogger(__name__)

STAGE = "roi-to-mask"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
ROI_SOP_CLASSES = (SEG_STORAGE, LABELMAP_SEG_STORAGE, RTSTRUCT_STORAGE)


@dataclass(frozen=True)
class RoiMask:
    """A ROI on the CT grid: ``mask[k, row, col]`` is True inside; aligned with ``volume.hu``."""

    mask: NDArray[np.bool_]
    label: str
    source_kind: str  # "SEG" or "RTSTRUCT"
    source_sop_instance_uid: str
    source_series_uid: str
    volume_mm3: float

    def to_sitk(self, volume: Volume) -> sitk.Image:
        return to_sitk(volume, self.mask)


def find_roi_objects(files: Sequence[Path]) -> list[Path]:
    """The SEG and RTSTRUCT files among ``files`` (headers only are read)."""
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # not DICOM: ignored here, reported by whoever expected it
            continue
        if str(ds.get("SOPClassUID", "")) in ROI_SOP_CLASSES:
            out.append(Path(f))
    return out


def _ct_references(volume: Volume) -> tuple[str, set[str]]:
    ds = volume.first_dataset
    return str(ds.get("FrameOfReferenceUID", "")), {str(d.SOPInstanceUID) for d in volume.source_datasets()}


class RoiToMask:
    """Stage: ROI object (path or dataset) + CT volume -> :class:`RoiMask`.

    Parameters
    ----------
    label:
        Segment label / ROI name to use (case-insensitive); empty: the first non-empty one.
    fractional_threshold:
        Fractional SEG values (0..1) at or above this are inside.
    """

    name = STAGE

    def __init__(self, label: str = "", fractional_threshold: float = 0.5) -> None:
        self.label = label
        self.fractional_threshold = fractional_threshold

    def run(self, roi: Path | Dataset, volume: Volume) -> RoiMask:
        ds = roi if isinstance(roi, Dataset) else pydicom.dcmread(roi)
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in (SEG_STORAGE, LABELMAP_SEG_STORAGE):
            mask, label = self._from_seg(ds, volume)
            kind = "SEG"
        elif sop_class == RTSTRUCT_STORAGE:
            mask, label = self._from_rtstruct(ds, volume)
            kind = "RTSTRUCT"
        else:
            raise StageError(STAGE, volume.series_uid, f"object {ds.get('SOPInstanceUID', '?')} is neither SEG nor RTSTRUCT")
        if not mask.any():
            raise StageError(STAGE, volume.series_uid, f"ROI {label!r} of {kind} {ds.SOPInstanceUID} covers no voxel of the CT")
        vol = float(mask.sum()) * volume.voxel_volume_mm3
        log.info("ROI %r from %s: %d voxels, %.1f mm3", label, kind, int(mask.sum()), vol)
        return RoiMask(mask, label, kind, str(ds.SOPInstanceUID), str(ds.get("SeriesInstanceUID", "")), vol)

    # SEG ----------------------------------------------------------------------------------
    def _check_seg_references(self, seg: Dataset, volume: Volume) -> None:
        ct_for, ct_sops = _ct_references(volume)
        refs: set[str] = set()
        series: set[str] = set()
        for item in seg.get("ReferencedSeriesSequence", []):
            series.add(str(item.SeriesInstanceUID))
            refs.update(str(i.ReferencedSOPInstanceUID) for i in item.get("ReferencedInstanceSequence", []))
        seg_for = str(seg.get("FrameOfReferenceUID", ""))
        if seg_for and seg_for == ct_for:
            return
        if refs and refs <= ct_sops:
            log.warning("SEG %s: frame of reference %s differs from the CT's %s; images referenced exist, accepted",
                        seg.SOPInstanceUID, seg_for, ct_for)
            return
        missing = sorted(refs - ct_sops)[:3]
        raise StageError(
            STAGE, volume.series_uid,
            f"SEG {seg.SOPInstanceUID} is on frame of reference {seg_for or '(none)'} (CT: {ct_for}) and references "
            f"series {sorted(series) or '(none)'}" + (f", images not in the CT series: {missing}" if missing else ""),
        )

    def _from_seg(self, ds: Dataset, volume: Volume) -> tuple[NDArray[np.bool_], str]:
        import highdicom as hd

        self._check_seg_references(ds, volume)
        try:
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        except Exception as e:
            raise StageError(STAGE, volume.series_uid, f"cannot read SEG {ds.get('SOPInstanceUID', '?')}: {e}") from e
        segments = [(int(d.segment_number), str(d.segment_label)) for d in seg.SegmentSequence if int(d.segment_number) > 0]
        if not segments:
            raise StageError(STAGE, volume.series_uid, f"SEG {ds.SOPInstanceUID} has no segment")
        if self.label:
            wanted = [s for s in segments if s[1].lower() == self.label.lower()]
            if not wanted:
                raise StageError(STAGE, volume.series_uid,
                                 f"SEG {ds.SOPInstanceUID} has no segment labelled {self.label!r} (has {[s[1] for s in segments]})")
            candidates = wanted
        else:
            candidates = segments
        fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
        for number, label in candidates:
            try:
                v = seg.get_volume(segment_numbers=[number], combine_segments=False)
            except Exception as e:
                raise StageError(STAGE, volume.series_uid, f"SEG {ds.SOPInstanceUID} segment {number}: no regular volume: {e}") from e
            if v is None:
                continue
            arr = np.asarray(v.array)[..., 0].astype(np.float32)
            image = affine_to_sitk(arr, np.asarray(v.affine))
            sampled = resample_onto(volume, image, linear=fractional)
            mask = sampled >= self.fractional_threshold if fractional else sampled > 0.5
            if mask.any() or self.label:
                return mask, label
        return np.zeros(volume.shape, bool), candidates[0][1]

    # RTSTRUCT -----------------------------------------------------------------------------
    def _from_rtstruct(self, ds: Dataset, volume: Volume) -> tuple[NDArray[np.bool_], str]:
        ct_for, ct_sops = _ct_references(volume)
        rois = {int(r.ROINumber): r for r in ds.get("StructureSetROISequence", [])}
        contours = {int(c.ReferencedROINumber): c for c in ds.get("ROIContourSequence", []) if "ContourSequence" in c}
        if not contours:
            raise StageError(STAGE, volume.series_uid, f"RTSTRUCT {ds.SOPInstanceUID} has no contours")
        order = [n for n in rois if n in contours] + [n for n in contours if n not in rois]
        if self.label:
            order = [n for n in order if n in rois and str(rois[n].ROIName).lower() == self.label.lower()]
            if not order:
                names = [str(r.ROIName) for r in rois.values()]
                raise StageError(STAGE, volume.series_uid, f"RTSTRUCT {ds.SOPInstanceUID} has no ROI named {self.label!r} (has {names})")
        number = order[0]
        label = str(rois[number].ROIName) if number in rois else f"ROI {number}"
        roi_for = str(rois[number].get("ReferencedFrameOfReferenceUID", "")) if number in rois else ""
        referenced: set[str] = set()
        for c in contours[number].ContourSequence:
            referenced.update(str(i.ReferencedSOPInstanceUID) for i in c.get("ContourImageSequence", []))
        missing = sorted(referenced - ct_sops)
        if missing:
            raise StageError(STAGE, volume.series_uid,
                             f"RTSTRUCT {ds.SOPInstanceUID} ROI {label!r} references {len(missing)} image(s) that are not in the CT "
                             f"series: {missing[:3]}")
        if roi_for != ct_for and not referenced:
            raise StageError(STAGE, volume.series_uid,
                             f"RTSTRUCT {ds.SOPInstanceUID} ROI {label!r} is on frame of reference {roi_for or '(none)'}, "
                             f"the CT is on {ct_for}, and no contour references a CT image")
        if roi_for != ct_for:
            log.warning("RTSTRUCT %s: frame of reference %s differs from the CT's %s; contours reference its images, accepted",
                        ds.SOPInstanceUID, roi_for, ct_for)
        return self._rasterise(ds, contours[number].ContourSequence, volume, label), label

    def _rasterise(self, ds: Dataset, contour_seq: Sequence[Dataset], volume: Volume, label: str) -> NDArray[np.bool_]:
        mask = np.zeros(volume.shape, dtype=bool)
        rows, cols = volume.shape[1:]
        tol = max(0.5 * (volume.slice_spacing or 1.0), 0.01)
        for c in contour_seq:
            kind = str(c.get("ContourGeometricType", ""))
            if kind not in ("CLOSED_PLANAR",):
                log.debug("skipping %s contour of %r", kind, label)
                continue
            pts = np.asarray([float(v) for v in c.ContourData], dtype=np.float64).reshape(-1, 3)
            proj = pts @ volume.normal
            if float(np.ptp(proj)) > tol:
                raise StageError(STAGE, volume.series_uid, f"RTSTRUCT {ds.SOPInstanceUID} ROI {label!r}: contour not in an image plane")
            k = int(np.argmin(np.abs(volume.positions - float(np.mean(proj)))))
            if abs(float(volume.positions[k]) - float(np.mean(proj))) > tol:
                raise StageError(STAGE, volume.series_uid,
                                 f"RTSTRUCT {ds.SOPInstanceUID} ROI {label!r}: contour at {np.mean(proj):.2f} mm lies on no CT slice")
            rel = pts - volume.slices[k].position
            x = rel @ volume.row_direction / volume.pixel_spacing[1]  # column index
            y = rel @ volume.column_direction / volume.pixel_spacing[0]  # row index
            c0, c1 = max(int(np.floor(x.min())), 0), min(int(np.ceil(x.max())) + 1, cols)
            r0, r1 = max(int(np.floor(y.min())), 0), min(int(np.ceil(y.max())) + 1, rows)
            if c0 >= c1 or r0 >= r1:
                continue
            rr, cc = np.mgrid[r0:r1, c0:c1]
            inside = PolyPath(np.column_stack([x, y])).contains_points(np.column_stack([cc.ravel(), rr.ravel()]))
            mask[k, r0:r1, c0:c1] ^= inside.reshape(rr.shape)  # even-odd: inner contours are holes
        return mask
