"""SEG and TID 1500 SR builders for body composition (highdicom only, no raw tags).

* :func:`build_seg`: one BINARY SEG in the source study and frame of reference, with the
  frames that hold any segment (level slice, and the lumbar range for 3D muscles).
* :func:`build_planar_sr`: one TID 1501 group per structure on the level image; every NUM is
  INFERRED FROM a closed POLYLINE SCOORD on that image (OHIF 3.13 shows only such groups).
* :func:`build_volume_sr`: TID 1411 groups referencing SEG segments (kept apart because one
  SCOORD-less group blanks a whole SR in OHIF 3.13).
* :func:`build_not_evaluable_sr`: an SR that says "not evaluable" and why.

Codes come from ``codes.toml`` beside this module until ``dicom_templates`` ships its table.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipelines.base import Identity
from pipelines.body_composition.types import SEGMENT_KEYS, SEGMENT_LABELS

CODES_PATH = Path(__file__).with_name("codes.toml")
TRACKING_PLANAR = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"


@dataclass(frozen=True)
class CodeRow:
    category: hd.sr.CodedConcept
    type: hd.sr.CodedConcept
    modifier: hd.sr.CodedConcept | None
    rgb: tuple[int, int, int]


def _cc(v: Sequence[str]) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=v[0], scheme_designator=v[1], meaning=v[2])


def load_codes(path: Path = CODES_PATH) -> tuple[dict[str, CodeRow], dict[str, hd.sr.CodedConcept]]:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    segs = {k: CodeRow(_cc(v["category"]), _cc(v["type"]), _cc(v["modifier"]) if "modifier" in v else None,
                       tuple(v["rgb"]))  # type: ignore[arg-type]
            for k, v in data["segment"].items()}
    concepts = {k: _cc(v) for k, v in data["concept"].items()}
    return segs, concepts


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    version: str
    backend: str
    model_version: str
    cutoff: str  # e.g. "prado-2008 (table 2026.11.1)"

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name, version=self.version, family=codes.cid7162.ArtificialIntelligence,
            parameters={"backend": self.backend, "model": self.model_version or "none", "cutoff": self.cutoff})

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name, version=self.version,
            parameters=[f"backend={self.backend}", f"model={self.model_version or 'none'}", f"cutoff={self.cutoff}"])


def build_seg(source: Sequence[Dataset], masks: Mapping[str, NDArray[np.bool_]], algorithm: AlgorithmInfo,
              identity: Identity, series_description: str, series_number: int | None = None) -> hd.seg.Segmentation:
    """BINARY SEG of ``masks`` (key -> (slices, rows, cols) on the grid of ``source``), empty frames left out.

    Masks that do not overlap are passed to highdicom as one label map (much faster on 3D).
    """
    seg_codes, _ = load_codes()
    keys = [k for k in SEGMENT_KEYS if k in masks and masks[k].any()]
    if not keys:
        raise ValueError("no segment has any voxel")
    any_mask = np.zeros(next(iter(masks.values())).shape[0], bool)
    overlap = False
    total = None
    for k in keys:
        any_mask |= masks[k].any(axis=(1, 2))
    used = np.nonzero(any_mask)[0]
    for k in keys:
        m = masks[k][used]
        total = m.astype(np.uint8) if total is None else total + m
    overlap = bool(total is not None and total.max() > 1)
    if overlap:
        pixels = np.stack([masks[k][used] for k in keys], axis=-1).astype(np.uint8)
    else:
        pixels = np.zeros((len(used), *masks[keys[0]].shape[1:]), np.uint8)
        for i, k in enumerate(keys, start=1):
            pixels[masks[k][used]] = i
    alg = algorithm.identification()
    descriptions = []
    for i, key in enumerate(keys, start=1):
        row = seg_codes[key]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=i, segment_label=SEGMENT_LABELS[key], segmented_property_category=row.category,
            segmented_property_type=row.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=alg, tracking_uid=hd.UID(), tracking_id=key,
            display_color=hd.color.CIELabColor.from_rgb(*row.rgb)))
        if row.modifier is not None:
            descriptions[-1].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                row.modifier]
    return hd.seg.Segmentation(
        source_images=[source[int(k)] for k in used], pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=series_number or identity.seg_series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=identity.manufacturer,
        manufacturer_model_name="prognode body-composition", software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number, series_description=series_description,
        content_label="BODYCOMP", content_description="Body composition segments",
        institution_name=identity.institution_name or None)


def polygon(mask: NDArray[np.bool_], max_points: int = 200) -> NDArray[np.float32]:
    """Closed outline (column, row pixel coordinates) of the largest connected part of ``mask``."""
    import contourpy
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    if n == 0:
        raise ValueError("empty mask has no outline")
    sizes = ndi.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    part = np.pad(lab == int(np.argmax(sizes)) + 1, 1).astype(np.float64)
    lines = contourpy.contour_generator(z=part, name="serial").lines(0.5)
    best = max(lines, key=lambda a: len(a))  # type: ignore[arg-type]
    pts = np.asarray(best, dtype=np.float64) - 1.0  # undo the padding
    # contour coordinates are pixel indices (x = column, y = row); DICOM SCOORD uses
    # pixel-edge coordinates where the centre of the first pixel is (0.5, 0.5)
    pts = pts + 0.5
    if len(pts) > max_points:  # display only: the NUM is the mask's area, not the polygon's
        step = int(np.ceil(len(pts) / max_points))
        pts = pts[::step]
    if not np.allclose(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    return pts.astype(np.float32)


@dataclass(frozen=True)
class PlanarItem:
    key: str  # SEGMENT_KEYS entry
    mask: NDArray[np.bool_]  # 2D on the level image
    area_cm2: float | None
    mean_hu: float | None
    extra: Sequence[tuple[hd.sr.CodedConcept, float, hd.sr.CodedConcept]] = ()  # (name, value, unit)
    qualitative: Sequence[tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]] = ()
    comments: Sequence[str] = ()


def _observation_context(identity: Identity) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="prognode body-composition", manufacturer_name=identity.manufacturer,
            serial_number=identity.device_serial_number)))


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=hd.sr.CodedConcept("121106", "DCM", "Comment"), value=text[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _sr(evidence: Sequence[Dataset], groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations
                                                     | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations],
        identity: Identity, description: str, predecessors: Sequence[Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    report = hd.sr.MeasurementReport(observation_context=_observation_context(identity),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=list(groups))
    return hd.sr.Comprehensive3DSR(
        evidence=list(evidence), content=report[0], series_instance_uid=hd.UID(),
        series_number=identity.sr_series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer=identity.manufacturer, is_complete=True, series_description=description,
        institution_name=identity.institution_name or None, previous_versions=list(predecessors) or None)


def build_planar_sr(image: Dataset, level_code: hd.sr.CodedConcept, items: Sequence[PlanarItem],
                    algorithm: AlgorithmInfo, identity: Identity, series_description: str,
                    report_comments: Sequence[str] = ()) -> hd.sr.Comprehensive3DSR:
    """TID 1500 with one TID 1501 group per structure; each NUM INFERRED FROM the structure's polygon."""
    seg_codes, concepts = load_codes()
    site = hd.sr.FindingSite(anatomic_location=level_code)
    groups = []
    for it in items:
        if not it.mask.any():
            continue
        coords = [hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polygon(it.mask),
            source_image=hd.sr.SourceImageForRegion.from_source_image(image))]
        ms = []
        if it.area_cm2 is not None:
            ms.append(hd.sr.Measurement(name=concepts["area"], value=round(it.area_cm2, 2), unit=concepts["cm2"],
                                        referenced_coordinates=coords, algorithm_id=algorithm.sr_algorithm()))
        if it.mean_hu is not None:
            ms.append(hd.sr.Measurement(name=concepts["attenuation"], value=round(it.mean_hu, 1),
                                        unit=concepts["hu"], derivation=concepts["mean"],
                                        referenced_coordinates=coords, algorithm_id=algorithm.sr_algorithm()))
        for name, value, unit in it.extra:
            ms.append(hd.sr.Measurement(name=name, value=round(value, 2), unit=unit, referenced_coordinates=coords,
                                        algorithm_id=algorithm.sr_algorithm()))
        if not ms:
            continue
        row = seg_codes[it.key]
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=TRACKING_PLANAR),
            finding_type=row.type, finding_sites=[site], measurements=ms,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(n, v) for n, v in it.qualitative] or None,
            algorithm_id=algorithm.sr_algorithm())
        for text in (f"{SEGMENT_LABELS[it.key]} at {level_code.meaning}", *it.comments):
            group[0].ContentSequence.append(_comment(text))
        groups.append(group)
    sr = _sr([image], groups, identity, series_description)
    del report_comments
    return sr


def build_volume_sr(source_series_uid: str, seg: hd.seg.Segmentation,
                    volumes: Mapping[str, tuple[float, float | None]], site_code: hd.sr.CodedConcept,
                    algorithm: AlgorithmInfo, identity: Identity, series_description: str) -> hd.sr.Comprehensive3DSR:
    """TID 1411 groups: volume (cm3) and mean HU of each named muscle, referencing its SEG segment."""
    seg_codes, concepts = load_codes()
    numbers = {str(d.SegmentLabel): int(d.SegmentNumber) for d in seg.SegmentSequence}
    groups = []
    for key, (vol_cm3, mean_hu) in volumes.items():
        label = SEGMENT_LABELS[key]
        if label not in numbers:
            continue
        ms = [hd.sr.Measurement(name=concepts["volume"], value=round(vol_cm3, 2), unit=concepts["cm3"],
                                algorithm_id=algorithm.sr_algorithm())]
        if mean_hu is not None:
            ms.append(hd.sr.Measurement(name=concepts["attenuation"], value=round(mean_hu, 1), unit=concepts["hu"],
                                        derivation=concepts["mean"], algorithm_id=algorithm.sr_algorithm()))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{label} volume"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=numbers[label],
                source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid)),
            finding_type=seg_codes[key].type, finding_sites=[hd.sr.FindingSite(anatomic_location=site_code)],
            measurements=ms, algorithm_id=algorithm.sr_algorithm()))
    return _sr([seg], groups, identity, series_description)


def build_not_evaluable_sr(evidence: Sequence[Dataset], reason: str, site_code: hd.sr.CodedConcept,
                           algorithm: AlgorithmInfo, identity: Identity, series_description: str
                           ) -> hd.sr.Comprehensive3DSR:
    """An SR whose only group says the series is not evaluable, and why."""
    _, concepts = load_codes()
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="body composition not evaluable"),
        finding_type=concepts["body_composition"], finding_sites=[hd.sr.FindingSite(anatomic_location=site_code)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(concepts["evaluability"], concepts["not_evaluable"])],
        algorithm_id=algorithm.sr_algorithm())
    group[0].ContentSequence.append(_comment(f"Not evaluable: {reason}"))
    return _sr(list(evidence), [group], identity, series_description)
