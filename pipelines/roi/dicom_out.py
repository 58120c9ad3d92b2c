"""DICOM outputs of the tumour pipelines, built with highdicom only.

* :func:`build_mask_seg` - a BINARY SEG of named masks on the CT (tumour, rings, attention).
* :func:`build_tumour_sr` - a TID 1500 SR: one TID 1501 group whose measurements are each
  INFERRED FROM a closed POLYLINE SCOORD of the tumour outline on its largest slice, so OHIF
  3.13 displays it (a SCOORD-less group blanks the whole SR there).

These are thin; when ``dicom_templates`` offers the same builders the pipelines switch to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.base import Identity, StageError
from pipelines.common.volume import Volume

CORNERSTONE_FREEHAND = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


@dataclass(frozen=True)
class SegmentSpec:
    label: str
    mask: NDArray[np.bool_]  # on the volume grid
    category: Code
    property_type: Code
    rgb: tuple[int, int, int]


def tumour_segment(label: str, mask: NDArray[np.bool_]) -> SegmentSpec:
    return SegmentSpec(label, mask, codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm, (230, 60, 60))


def tissue_segment(label: str, mask: NDArray[np.bool_], rgb: tuple[int, int, int]) -> SegmentSpec:
    return SegmentSpec(label, mask, codes.SCT.Tissue, codes.SCT.Tissue, rgb)


def _check_single_frame(volume: Volume) -> list[Dataset]:
    sources = volume.source_datasets()
    if len(sources) != volume.shape[0]:
        raise StageError("dicom-output", volume.series_uid, "multi-frame source images are not supported for SEG output")
    return sources


def build_mask_seg(
    volume: Volume,
    segments: Sequence[SegmentSpec],
    identity: Identity,
    algorithm: str,
    algorithm_version: str,
    series_description: str,
    series_number: int | None = None,
) -> hd.seg.Segmentation:
    """BINARY SEG with one segment per :class:`SegmentSpec` (segments may overlap)."""
    sources = _check_single_frame(volume)
    alg = hd.AlgorithmIdentificationSequence(name=algorithm, version=algorithm_version,
                                             family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=s.label[:64],
            segmented_property_category=s.category, segmented_property_type=s.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=alg,
            tracking_uid=hd.UID(), tracking_id=s.label[:64],
            display_color=hd.color.CIELabColor.from_rgb(*s.rgb),
        )
        for i, s in enumerate(segments)
    ]
    pixels = np.stack([s.mask for s in segments], axis=-1).astype(np.uint8)  # (slices, rows, cols, segments)
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=series_number or identity.seg_series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=identity.manufacturer, manufacturer_model_name=algorithm[:64],
        software_versions=identity.software_version, device_serial_number=identity.device_serial_number,
        series_description=series_description[:64], content_label="TUMOUR", omit_empty_frames=True,
        specific_character_set=_charset(sources[0]),
    )


def largest_slice_outline(mask: NDArray[np.bool_]) -> tuple[int, NDArray[np.float32]]:
    """(slice index, closed polygon in image coordinates (column, row), pixel corners at integers)."""
    import contourpy

    areas = mask.sum(axis=(1, 2))
    k = int(np.argmax(areas))
    plane = np.pad(mask[k].astype(np.float64), 1)
    lines = contourpy.contour_generator(z=plane).lines(0.5)
    if not lines:
        raise ValueError("empty slice")
    line = max(lines, key=lambda a: len(a))  # (x=col, y=row) in padded index space
    pts = np.asarray(line, dtype=np.float64) - 1.0 + 0.5  # unpad; DICOM pixel centre = index + 0.5
    if not np.allclose(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    return k, pts.astype(np.float32)


@dataclass(frozen=True)
class NumericMeasurement:
    name: Code
    value: float
    unit: Code
    derivation: Code | None = None


def build_tumour_sr(
    volume: Volume,
    mask: NDArray[np.bool_],
    measurements: Sequence[NumericMeasurement],
    identity: Identity,
    algorithm: str,
    algorithm_version: str,
    parameters: Sequence[str],
    series_description: str,
    finding: Code | None = None,
    series_number: int | None = None,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 with one planar group on the tumour's largest slice; every NUM inferred from its outline."""
    sources = _check_single_frame(volume)
    k, polygon = largest_slice_outline(mask)
    image = sources[k]
    alg = hd.sr.AlgorithmIdentification(name=algorithm, version=algorithm_version, parameters=list(parameters) or None)
    coords = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polygon,
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    nums = [
        hd.sr.Measurement(name=m.name, value=float(round(m.value, 4)), unit=m.unit, derivation=m.derivation, algorithm_id=alg,
                          referenced_coordinates=[coords])
        for m in measurements
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=CORNERSTONE_FREEHAND),
        finding_type=finding or codes.SCT.Neoplasm, measurements=nums,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=algorithm[:64], manufacturer_name=identity.manufacturer,
                serial_number=identity.device_serial_number,
            ),
        )
    )
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=[group])
    return hd.sr.Comprehensive3DSR(
        evidence=[image], content=report[0], series_instance_uid=hd.UID(),
        series_number=series_number or identity.sr_series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=identity.manufacturer, is_complete=True, series_description=series_description[:64],
        software_versions=identity.software_version, device_serial_number=identity.device_serial_number,
        specific_character_set=_charset(image),
    )


def _charset(ds: Dataset) -> str | None:
    """The source's character set, or None (default repertoire) when it is empty."""
    value = ds.get("SpecificCharacterSet")
    return str(value) if isinstance(value, str) and value else None


def save(ds: Dataset, path: str | object) -> None:
    ds.save_as(path, enforce_file_format=True)  # type: ignore[arg-type]


__all__ = [
    "NumericMeasurement", "SegmentSpec", "build_mask_seg", "build_tumour_sr", "largest_slice_outline",
    "save", "tissue_segment", "tumour_segment",
]
