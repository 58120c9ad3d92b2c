"""TID 1500 Measurement Report builder (PS3.16 TID 1500) in a Comprehensive 3D SR (PS3.3 A.35.13).

Two kinds of measurement group, which go in **separate SRs**:

- :class:`PlanarGroup` -> TID 1501 "Measurement Group" whose NUMs are each INFERRED FROM a
  closed SCOORD POLYLINE that is SELECTED FROM a source image, with the tracking identifier
  ``Cornerstone3DTools@^0.1.0:PlanarFreehandROI``.  This is the layout OHIF 3.13 restores and
  lists (``../shared/tools/ohif-check/README.md``).  A planar group without measurements
  becomes a TID 1410 group whose Image Region is the polygon: OHIF draws it without error
  but does not list it (the panel says "Measurements (0)").
- :class:`VolumeGroup` -> a SEG segment's measurements.  Without ``outline``: TID 1411 "Volumetric ROI"
  referencing the segment; it has no SCOORD, and OHIF 3.13 throws on any SCOORD-less group and then blanks
  the *whole* SR.  With ``outline`` (the segment's section on one image, e.g. the level slice): TID 1501 whose
  NUMs are INFERRED FROM the segment (an IMAGE reference to the SEG with its segment number), the first also
  from that outline; OHIF lists it and draws the outline.

:func:`build_measurement_report` therefore refuses SCOORD-less groups unless ``allow_scoordless=True``
(which knowingly gives an SR OHIF cannot show): put them in their own SR, or give them an outline.

What OHIF 3.13 shows of a planar group (checked with ohif-check on tissue-hu output): the
polygon, labelled with the finding's meaning, and in the panel the group's Area NUM until the
annotation is rendered; once rendered, it recomputes and shows the polygon's own statistics
(area, mean, min, max, std dev of HU inside the outline, perimeter).  The other NUMs (volume,
mean HU of a segment, SMI, ...) stay in the SR but are not shown by OHIF.  So make the polygon
outline the region the numbers describe wherever possible.  A report with no measurement group
at all (an empty Imaging Measurements container) makes OHIF fail ("Something went wrong",
blank viewport), so a "not evaluable" report keeps one planar group (:func:`not_evaluable_group`):
an outline without any number, which OHIF draws without error but does not list.

No made-up numbers: a value that is not evaluable is a NUM whose Measured Value Sequence is
empty, with a Numeric Value Qualifier (CID 42, "Value unknown" by default) and a TEXT "Reason
not evaluable" in its group.

Groups are distinguishable: the finding (e.g. Iliopsoas muscle), finding sites (the structure
with its laterality for a sided structure, and the vertebral level) and a Tracking UID.  With a
:class:`TrackingKey` the Tracking UID is ``2.25.<uuid5>`` of issuer of patient ID + patient ID
+ structure + side + level (:func:`tracking_uid`), not of the study, so the same structure in a
later study keeps its UID.  The Tracking Identifier text stays OHIF's
``Cornerstone3DTools@^0.1.0:PlanarFreehandROI`` (OHIF lists a planar group only with it).

A report may say how its vertebral level was found (:class:`LevelProvenance`: automatic or
confirmed by a reader, anchor votes, confidence); a reader-confirmed level adds the reader as
person observer (TID 1002, role Reader) beside the device observer.

Each group names the algorithm and its version (TID 4019); the report's observer context
names this node as a device (TID 1004) from :class:`dicom_templates.identity.Identity`.  Private codes
(``99PROGNODE``) are declared in the Coding Scheme Identification Sequence.  A re-run's SR
lists the SRs it supersedes in the Predecessor Documents Sequence (highdicom
``previous_versions``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from dicom_templates import codes
from dicom_templates.common import Algorithm, check_identity, contributing_equipment, device_uid, with_type2
from dicom_templates.identity import Identity, Predecessor

log = logging.getLogger(__name__)

OHIF_TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"

__all__ = [
    "OHIF_TRACKING_IDENTIFIER",
    "Algorithm",
    "GroupReadout",
    "LevelProvenance",
    "Measurement",
    "Outline",
    "PlanarGroup",
    "Qualitative",
    "Text",
    "TrackingKey",
    "VolumeGroup",
    "build_measurement_report",
    "close_polygon",
    "not_evaluable_group",
    "pixel_spacing",
    "polygon_area_mm2",
    "read_groups",
    "tracking_uid",
]


@dataclass(frozen=True)
class Measurement:
    """One NUM (TID 300): ``concept`` and ``unit`` are code-table keys (UCUM code for the unit).

    ``derivation`` (e.g. ``"mean"``) and ``method`` are optional concept keys.

    A value that is not evaluable is ``value=None`` with the ``reason``: the NUM then has an
    empty Measured Value Sequence and a Numeric Value Qualifier (CID 42; ``qualifier`` is its
    concept key, "Value unknown" by default), and the group gets a TEXT "Reason not evaluable"
    naming the measurement.  No number is written for it.
    """

    concept: str
    value: float | None
    unit: str
    derivation: str | None = None
    method: str | None = None
    reason: str = ""
    qualifier: str = "value-unknown"

    def __post_init__(self) -> None:
        if self.value is None and not self.reason.strip():
            raise ValueError(f"measurement {self.concept!r} has no value: say why (reason)")


@dataclass(frozen=True)
class TrackingKey:
    """What a measurement group tracks, stable for the patient over time.

    The group's Tracking UID is derived from the patient (Issuer of Patient ID + Patient ID of
    the source image) and this key, never from the study: the same structure, side and level in
    a later study of the same patient gets the same Tracking UID, so its values can be followed.
    ``structure`` is a code-table key (e.g. ``"iliopsoas-left"``'s structure ``"iliopsoas"``),
    ``side`` ``"left"``, ``"right"`` or ``""``, ``level`` e.g. ``"L3"``.
    """

    structure: str
    side: str = ""
    level: str = ""

    def __post_init__(self) -> None:
        if not self.structure:
            raise ValueError("TrackingKey needs a structure")
        if self.side not in ("", "left", "right"):
            raise ValueError(f"TrackingKey side {self.side!r}: use 'left', 'right' or ''")


# A fixed namespace for the name-based (UUID version 5) Tracking UIDs; never change it, or every
# Tracking UID written so far stops matching later studies.
_TRACKING_NAMESPACE = uuid.UUID("6f1c2a53-5e0b-5b8e-9d43-70726f676e6f")


def tracking_uid(issuer_of_patient_id: str, patient_id: str, key: TrackingKey) -> str:
    """The Tracking UID of ``key`` for one patient: ``2.25.<UUID v5 as an integer>`` (PS3.5 B.2).

    Deterministic: issuer + patient ID + structure + side + level, and nothing of the study.
    """
    if not patient_id.strip():
        raise ValueError("a patient-stable Tracking UID needs a Patient ID")
    name = "\x1f".join(["prognode-tracking/1", issuer_of_patient_id.strip(), patient_id.strip(), key.structure,
                        key.side, key.level])
    return f"2.25.{uuid.uuid5(_TRACKING_NAMESPACE, name).int}"


@dataclass(frozen=True)
class LevelProvenance:
    """How the vertebral level of a report was found; written in the report's Qualitative Evaluations.

    ``anchors`` are one line per landmark the level finder used ("sacrum (images 48-57) names the vertebra on
    images 42-46 L5; alone it puts L3 on image 31; counted"),
    ``confidence`` the finder's confidence in words or numbers.  A reader-confirmed level names
    the ``reader`` (DICOM PN, "Family^Given"), who becomes the report's person observer
    (TID 1002, role Reader), and when (``confirmed_at``, ISO 8601).
    """

    level: str
    reader_confirmed: bool = False
    anchors: Sequence[str] = ()
    confidence: str = ""
    reader: str = ""
    confirmed_at: str = ""
    provenance: str = ""  # who chose the slice, when and from where (a viewer marker, the command line, the API)


@dataclass(frozen=True)
class Qualitative:
    """A coded question and answer (CODE item): both concept keys, e.g. ("sarcopenia", "present")."""

    concept: str
    value: str


@dataclass(frozen=True)
class Text:
    """A free-text item (TEXT): concept key and text, e.g. ("cutoff-used", "Prado 2008")."""

    concept: str
    value: str


@dataclass(frozen=True)
class PlanarGroup:
    """A measurement group drawn as a closed polygon on one source image (OHIF-visible).

    ``polygon`` is (N, 2) image pixel coordinates (column, row), at least 3 points; the
    builder closes it (the last point repeats the first).  ``frame_number`` (1-based) is
    needed for a multi-frame image.  ``tracking_id`` names the ROI.  With a ``tracking_key``
    the group's Tracking UID is derived from the patient and that key (:func:`tracking_uid`);
    without one, from the study and ``tracking_id``, so re-runs on the same study track the same
    ROI under the same UID.

    When ``finding`` is a segment key whose row has a laterality modifier (e.g. ``"iliopsoas-left"``),
    the group gets a finding site of that structure with its laterality (TID 1501 Finding Site with
    Laterality), and when the row has an anatomic region (VAT: abdominal cavity), that region as
    a finding site, besides ``finding_site`` (e.g. the vertebral level), which comes last.
    """

    tracking_id: str
    finding: str
    image: Dataset
    polygon: NDArray[np.floating[Any]]
    measurements: Sequence[Measurement] = ()
    finding_site: str | None = None
    qualitative: Sequence[Qualitative] = ()
    text: Sequence[Text] = ()
    frame_number: int | None = None
    tracking_key: TrackingKey | None = None


@dataclass(frozen=True)
class Outline:
    """A segment's section on one source image as one closed polygon: (N, 2) pixel coordinates (column, row),
    ``frame_number`` (1-based) for a multi-frame image."""

    image: Dataset
    polygon: NDArray[np.floating[Any]]
    frame_number: int | None = None


@dataclass(frozen=True)
class VolumeGroup:
    """A measurement group of one SEG segment.

    Without ``outline``: TID 1411 "Volumetric ROI" whose region is the Referenced Segment; no SCOORD, so OHIF 3.13
    cannot show it (nor any SR holding it).  With ``outline`` (the segment's section on one of its images, e.g. the
    level slice): TID 1501 whose every NUM is INFERRED FROM the segment (IMAGE "Source of Measurement" naming the
    SEG and the segment number) and whose first NUM (the volume) is INFERRED FROM the outline as well, a closed
    SCOORD POLYLINE SELECTED FROM its image (TID 300 allows 1-n), with OHIF's tracking identifier.  OHIF 3.13 lists
    such a group and draws the outline, showing that polygon's own statistics once drawn.
    """

    tracking_id: str
    finding: str
    segmentation: Dataset
    segment_number: int
    measurements: Sequence[Measurement] = ()
    finding_site: str | None = None
    qualitative: Sequence[Qualitative] = ()
    text: Sequence[Text] = ()
    # TID 1411 allows the segmented images to be named by their series ("Source series for segmentation") instead
    # of image by image: for a SEG over hundreds of slices this keeps the SR small and fast, and the evidence list
    # can then be the SEG alone.
    reference_source_series: bool = False
    tracking_key: TrackingKey | None = None
    outline: Outline | None = None


Group = PlanarGroup | VolumeGroup


# ------------------------------------------------------------------------------------------


def close_polygon(polygon: NDArray[np.floating[Any]] | Sequence[Sequence[float]]) -> NDArray[np.float32]:
    """(N, 2) -> closed (M, 2) float32 polygon whose last point repeats the first."""
    pts = np.asarray(polygon, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"polygon must be (N, 2) (column, row) points, got shape {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError("polygon has non-finite coordinates")
    if len(pts) >= 2 and np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(np.unique(pts, axis=0)) < 3:
        raise ValueError("polygon needs at least 3 distinct points")
    return np.vstack([pts, pts[:1]]).astype(np.float32)


def _tracking_uid(source: Dataset, g: PlanarGroup | VolumeGroup) -> str:
    if g.tracking_key is not None:
        patient_id = str(source.get("PatientID", "") or "")
        if patient_id.strip():
            return tracking_uid(str(source.get("IssuerOfPatientID", "") or ""), patient_id, g.tracking_key)
        log.warning("group %r: source has no Patient ID, Tracking UID derived from the study instead",
                    g.tracking_id)
    return str(generate_uid(entropy_srcs=["prognode-tracking", str(source.StudyInstanceUID), g.tracking_id]))


def _finding_sites(g: PlanarGroup | VolumeGroup) -> list[hd.sr.FindingSite] | None:
    """The group's finding sites: its structure with laterality (when the finding has a side), the
    anatomic region of a tissue (VAT: abdominal cavity; IMAT: skeletal muscle), its level."""
    sites = []
    row = codes.table().segments.get(g.finding)
    if row is not None and row.modifier is not None:
        sites.append(hd.sr.FindingSite(anatomic_location=row.type, laterality=row.modifier))
    level = codes.concept(g.finding_site) if g.finding_site else None
    if row is not None and row.region is not None and row.region != level:
        sites.append(hd.sr.FindingSite(anatomic_location=row.region))
    if level is not None:
        sites.append(hd.sr.FindingSite(anatomic_location=level))
    return sites or None


def _qualitative(items: Sequence[Qualitative]) -> list[hd.sr.QualitativeEvaluation] | None:
    out = [hd.sr.QualitativeEvaluation(name=codes.concept(q.concept), value=codes.concept(q.value)) for q in items]
    return out or None


def _text_items(items: Sequence[Text]) -> list[hd.sr.TextContentItem]:
    return [
        hd.sr.TextContentItem(
            name=codes.concept(t.concept),
            value=t.value,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for t in items
    ]


def _num(m: Measurement, algorithm: Algorithm, coords: Sequence[hd.sr.CoordinatesForMeasurement] | None) -> hd.sr.Measurement:
    if m.value is not None and not np.isfinite(m.value):
        raise ValueError(f"measurement {m.concept!r} is not finite ({m.value}); report it as not evaluable instead")
    num = hd.sr.Measurement(
        name=codes.concept(m.concept),
        value=float(m.value) if m.value is not None else 0.0,
        unit=codes.unit(m.unit),
        qualifier=codes.concept(m.qualifier) if m.value is None else None,
        derivation=codes.concept(m.derivation) if m.derivation else None,
        method=codes.concept(m.method) if m.method else None,
        algorithm_id=algorithm.sr_identification(),
        referenced_coordinates=list(coords) if coords else None,
    )
    return num


def _drop_placeholder_values(items: Sequence[Dataset]) -> int:
    """Empty the Measured Value Sequence of every NUM that carries a Numeric Value Qualifier.

    highdicom 0.28 builds (and re-parses) a NUM only with a value, so a value that is not
    evaluable is built with a placeholder 0 and its qualifier; PS3.3 C.18.1 (Numeric Measurement
    Macro) lets the Measured Value Sequence be empty when the qualifier says why, and so it is
    emptied here, on the finished document: no number is written.  Only this builder sets a
    qualifier, and only for values that are None.
    """
    n = 0
    for it in _walk(items):
        if it.get("ValueType") == "NUM" and "NumericValueQualifierCodeSequence" in it:
            it.MeasuredValueSequence = []
            n += 1
    return n


def _reasons(measurements: Sequence[Measurement]) -> list[Text]:
    """A TEXT "Reason not evaluable" for each measurement without a value, naming it."""
    return [Text("not-evaluable-reason", f"{codes.concept(m.concept).meaning}: {m.reason}")
            for m in measurements if m.value is None]


def _append(group: Any, items: Sequence[Any]) -> None:
    """Append TEXT content items to a group's container (TID 1501/1410/1411 are extensible)."""
    if items:
        group[0].ContentSequence.extend(items)


def _planar(g: PlanarGroup, algorithm: Algorithm) -> Any:
    pts, source = _source(g.image, g.polygon, g.frame_number, g.tracking_id)
    tracking = hd.sr.TrackingIdentifier(uid=_tracking_uid(g.image, g), identifier=OHIF_TRACKING_IDENTIFIER)
    if g.measurements:
        coords = [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=pts, source_image=source
            )
        ]
        group: Any = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            finding_type=codes.finding(g.finding),
            algorithm_id=algorithm.sr_identification(),
            finding_sites=_finding_sites(g),
            measurements=[_num(m, algorithm, coords) for m in g.measurements],
            qualitative_evaluations=_qualitative(g.qualitative),
        )
    else:
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=pts, source_image=source
            ),
            finding_type=codes.finding(g.finding),
            algorithm_id=algorithm.sr_identification(),
            finding_sites=_finding_sites(g),
            qualitative_evaluations=_qualitative(g.qualitative),
        )
    _append(group, _text_items([*g.text, *_reasons(g.measurements)]))
    return group


def _referenced_segment(g: VolumeGroup) -> hd.sr.ReferencedSegment:
    if not g.reference_source_series:
        return hd.sr.ReferencedSegment.from_segmentation(g.segmentation, segment_number=g.segment_number)
    series = g.segmentation.ReferencedSeriesSequence[0].SeriesInstanceUID
    return hd.sr.ReferencedSegment(
        sop_class_uid=g.segmentation.SOPClassUID,
        sop_instance_uid=g.segmentation.SOPInstanceUID,
        segment_number=g.segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(series),
    )


def _source(image: Dataset, polygon: NDArray[np.floating[Any]], frame_number: int | None, tracking_id: str
            ) -> tuple[NDArray[np.float32], hd.sr.SourceImageForRegion]:
    """A closed polygon checked against its image, and the image as the SCOORD's source."""
    pts = close_polygon(polygon)
    rows, cols = int(image.Rows), int(image.Columns)
    if pts[:, 0].min() < 0 or pts[:, 1].min() < 0 or pts[:, 0].max() > cols or pts[:, 1].max() > rows:
        raise ValueError(f"group {tracking_id!r}: polygon leaves the {cols}x{rows} image")
    frames = [frame_number] if frame_number is not None else None
    return pts, hd.sr.SourceImageForRegion.from_source_image(image, referenced_frame_numbers=frames)


def _outlined_volume(g: VolumeGroup, o: Outline, algorithm: Algorithm) -> Any:
    pts, source = _source(o.image, o.polygon, o.frame_number, g.tracking_id)
    coords = [hd.sr.CoordinatesForMeasurement(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=pts,
                                              source_image=source)]
    if not g.measurements:
        raise ValueError(f"group {g.tracking_id!r}: an outlined volume group needs a measurement")
    nums = [_num(m, algorithm, coords if i == 0 else None) for i, m in enumerate(g.measurements)]
    for num in nums:  # each value is measured on the SEG segment (TID 300 INFERRED FROM IMAGE)
        num[0].ContentSequence.append(hd.sr.ImageContentItem(
            name=dcm_codes.DCM.SourceOfMeasurement, referenced_sop_class_uid=g.segmentation.SOPClassUID,
            referenced_sop_instance_uid=g.segmentation.SOPInstanceUID, referenced_segment_numbers=[g.segment_number],
            relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM))
    group: Any = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(o.image, g), identifier=OHIF_TRACKING_IDENTIFIER),
        finding_type=codes.finding(g.finding),
        algorithm_id=algorithm.sr_identification(),
        finding_sites=_finding_sites(g),
        measurements=nums,
        qualitative_evaluations=_qualitative(g.qualitative),
    )
    _append(group, _text_items([*g.text, *_reasons(g.measurements)]))
    return group


def _volume(g: VolumeGroup, algorithm: Algorithm) -> Any:
    numbers = [int(s.SegmentNumber) for s in g.segmentation.SegmentSequence]
    if g.segment_number not in numbers:
        raise ValueError(f"group {g.tracking_id!r}: segment {g.segment_number} not in the SEG (has {numbers})")
    if g.outline is not None:
        return _outlined_volume(g, g.outline, algorithm)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=_tracking_uid(g.segmentation, g), identifier=g.tracking_id),
        referenced_segment=_referenced_segment(g),
        finding_type=codes.finding(g.finding),
        algorithm_id=algorithm.sr_identification(),
        finding_sites=_finding_sites(g),
        measurements=[_num(m, algorithm, None) for m in g.measurements] or None,
        qualitative_evaluations=_qualitative(g.qualitative),
    )
    _append(group, _text_items([*g.text, *_reasons(g.measurements)]))
    return group


def pixel_spacing(image: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm of a single-frame image or of an Enhanced (multi-frame) image."""
    if "PixelSpacing" in image:
        return float(image.PixelSpacing[0]), float(image.PixelSpacing[1])
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if groups in image and "PixelMeasuresSequence" in image[groups][0]:
            ps = image[groups][0].PixelMeasuresSequence[0].PixelSpacing
            return float(ps[0]), float(ps[1])
    raise ValueError(f"image {image.get('SOPInstanceUID', '?')} has no pixel spacing")


def polygon_area_mm2(polygon: NDArray[np.floating[Any]], image: Dataset) -> float:
    """Area enclosed by a (column, row) pixel polygon on ``image`` (shoelace formula)."""
    pts = close_polygon(polygon).astype(np.float64)
    row_mm, col_mm = pixel_spacing(image)
    x, y = pts[:, 0] * col_mm, pts[:, 1] * row_mm
    return float(0.5 * abs(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))


NOT_EVALUABLE_FORMS = ("num-qualifier", "region-only")
DEFAULT_NOT_EVALUABLE_FORM = "region-only"  # ohif-check: OHIF 3.13 lists neither form; see not_evaluable_group


def image_outline(image: Dataset) -> NDArray[np.float64]:
    """The outline of the whole image, half a pixel inside its edges (column, row)."""
    rows, cols = int(image.Rows), int(image.Columns)
    return np.array([[0.5, 0.5], [cols - 0.5, 0.5], [cols - 0.5, rows - 0.5], [0.5, rows - 0.5]])


def not_evaluable_group(image: Dataset, reason: str, tracking_id: str = "not-evaluable", *,
                        form: str = DEFAULT_NOT_EVALUABLE_FORM, outline: NDArray[np.floating[Any]] | None = None,
                        finding: str = "not-evaluated", measurement: str = "area", unit: str = "mm2",
                        finding_site: str | None = None, tracking_key: TrackingKey | None = None) -> PlanarGroup:
    """A planar group saying "not evaluable" and why, on the examined ``image``; no number in it.

    The group outlines ``outline`` (default: the whole image) and says "Evaluability: Not
    evaluable" with a TEXT "Reason not evaluable".  ``form`` chooses how:

    - ``"region-only"`` (default): a TID 1410 group whose Image Region is the outline, no NUM;
    - ``"num-qualifier"``: a NUM ``measurement`` INFERRED FROM the outline whose Measured Value
      Sequence is empty and whose Numeric Value Qualifier is "Value unknown" (CID 42).

    Checked with ohif-check (OHIF 3.13.2, docs/dicom-templates.md): both forms load without
    error and OHIF draws the outline, but neither is listed in the measurement panel
    ("Measurements (0)"): OHIF lists a group only through a NUM *with a value* on a SCOORD, and
    a value here would be made up.  The region-only form is the default because highdicom 0.28
    can read it back (it cannot parse a NUM without a value).
    """
    if form not in NOT_EVALUABLE_FORMS:
        raise ValueError(f"not_evaluable_group form {form!r}: one of {NOT_EVALUABLE_FORMS}")
    polygon = image_outline(image) if outline is None else np.asarray(outline, dtype=np.float64)
    measurements = [Measurement(measurement, None, unit, reason=reason)] if form == "num-qualifier" else []
    return PlanarGroup(
        tracking_id=tracking_id,
        finding=finding,
        image=image,
        polygon=polygon,
        measurements=measurements,
        finding_site=finding_site,
        qualitative=[Qualitative("evaluability", "not-evaluable")],
        text=[] if measurements else [Text("not-evaluable-reason", reason)],
        frame_number=1 if int(image.get("NumberOfFrames", 1) or 1) > 1 else None,
        tracking_key=tracking_key,
    )


SR_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # the SR Storage SOP classes (PS3.4 B.5)


def _predecessor_datasets(predecessors: Sequence[Predecessor | Dataset]) -> list[Dataset]:
    """The Predecessor Documents (PS3.3 C.17.2.3): earlier SR documents only; an earlier SEG that a
    re-run replaces is not a predecessor document (the node's results ledger links it instead)."""
    out = []
    for p in predecessors:
        if isinstance(p, Dataset):
            out.append(p)
            continue
        if not p.sop_class_uid.startswith(SR_STORAGE_PREFIX):
            continue
        ds = Dataset()  # reference only: highdicom reads these four UIDs to build the sequence
        ds.StudyInstanceUID = p.study_uid
        ds.SeriesInstanceUID = p.series_uid
        ds.SOPInstanceUID = p.sop_instance_uid
        ds.SOPClassUID = p.sop_class_uid
        out.append(ds)
    return out


def _report_qualitative(report: Any, qualitative: Sequence[Qualitative], texts: Sequence[Text]) -> None:
    """TID 1500 rows 12-14: a "Qualitative Evaluations" container of CODE/TEXT items."""
    if not qualitative and not texts:
        return
    container = hd.sr.ContainerContentItem(
        name=codes.concept("qualitative-evaluations"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[Any] = [
        hd.sr.CodeContentItem(
            name=codes.concept(q.concept),
            value=codes.concept(q.value),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        for q in qualitative
    ]
    items += _text_items(texts)
    container.ContentSequence = hd.sr.ContentSequence(items)
    report[0].ContentSequence.append(container)


def _all_concepts(groups: Sequence[Group], qualitative: Sequence[Qualitative], texts: Sequence[Text]) -> list[Any]:
    found: list[Any] = []
    for g in groups:
        found.append(codes.finding(g.finding))
        if g.finding_site:
            found.append(codes.concept(g.finding_site))
        for m in g.measurements:
            found.append(codes.concept(m.concept))
            found += [codes.concept(k) for k in (m.derivation, m.method) if k]
            if m.value is None:
                found += [codes.concept(m.qualifier), codes.concept("not-evaluable-reason")]
        for q in g.qualitative:
            found += [codes.concept(q.concept), codes.concept(q.value)]
        found += [codes.concept(t.concept) for t in g.text]
    for q in qualitative:
        found += [codes.concept(q.concept), codes.concept(q.value)]
    found += [codes.concept(t.concept) for t in texts]
    return found


def build_measurement_report(
    evidence: Sequence[Dataset],
    groups: Sequence[Group],
    algorithm: Algorithm,
    identity: Identity,
    series_description: str,
    predecessors: Sequence[Predecessor | Dataset] = (),
    not_evaluable_reason: str | None = None,
    qualitative: Sequence[Qualitative] = (),
    *,
    texts: Sequence[Text] = (),
    level: LevelProvenance | None = None,
    not_evaluable_form: str = DEFAULT_NOT_EVALUABLE_FORM,
    allow_scoordless: bool = False,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    procedure: str = "procedure-ct",
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 Measurement Report (PS3.16) as a Comprehensive 3D SR (PS3.3 A.35.13).

    Parameters
    ----------
    evidence:
        Every instance the groups reference (source images, SEGs), all of one study; the
        SR copies patient and study from ``evidence[0]`` and lists them all as evidence.
    groups:
        :class:`PlanarGroup` (OHIF-visible) or :class:`VolumeGroup` (SEG-referencing).
        Mixing them, or any VolumeGroup at all, needs ``allow_scoordless=True``:
        OHIF 3.13 blanks a whole SR that has one SCOORD-less group.
    algorithm:
        Named in every group and every NUM (TID 4019).
    identity:
        Observer device (TID 1004), manufacturer, software version and device serial.
    predecessors:
        Earlier SRs this one supersedes (Predecessor Documents Sequence).
    not_evaluable_reason:
        The report says "not evaluable" and why in TID 1500's Qualitative Evaluations
        container.  Without groups, a :func:`not_evaluable_group` outlining the middle image
        of ``evidence`` is added so that the SR still has a SCOORD group for OHIF.
    qualitative, texts:
        Report-level coded and free-text evaluations (TID 1500 rows 12-14).
    level:
        How the vertebral level was found: level source (automatic or reader-confirmed), each
        anchor's vote, the confidence, and for a reader-confirmed level when; the reader is
        added as person observer (TID 1002, role NCIt Reader) beside the device observer.
    not_evaluable_form:
        Form of the group added for a not evaluable report without groups (:func:`not_evaluable_group`).

    Raises
    ------
    KeyError: an unknown code-table key.
    ValueError: no groups and no reason, SCOORD-less groups without ``allow_scoordless``,
        bad polygons, non-finite values, or empty identity.
    """
    check_identity(identity)
    if not evidence:
        raise ValueError("build_measurement_report: evidence is empty")
    groups = list(groups)
    report_qualitative = list(qualitative)
    report_texts = list(texts)
    if level is not None:
        report_qualitative.append(Qualitative(
            "level-source", "level-reader-confirmed" if level.reader_confirmed else "level-automatic"))
        report_texts += [Text("level-anchor-vote", a) for a in level.anchors]
        if level.confidence:
            report_texts.append(Text("level-confidence", level.confidence))
        if level.confirmed_at:
            report_texts.append(Text("level-confirmed-at", level.confirmed_at))
        if level.provenance:
            report_texts.append(Text("level-provenance", level.provenance))
    if not_evaluable_reason is not None:
        if not not_evaluable_reason.strip():
            raise ValueError("not_evaluable_reason is empty: say why")
        report_qualitative.append(Qualitative("evaluability", "not-evaluable"))
        report_texts.append(Text("not-evaluable-reason", not_evaluable_reason))
        if not groups:
            images = [d for d in evidence if "Rows" in d and "SegmentSequence" not in d]
            if not images:
                raise ValueError("not evaluable report needs at least one image in evidence to stay OHIF-safe")
            groups.append(not_evaluable_group(images[len(images) // 2], not_evaluable_reason,
                                              form=not_evaluable_form))
    if not groups:
        raise ValueError("build_measurement_report: no measurement groups (give not_evaluable_reason instead)")
    scoordless = [g.tracking_id for g in groups if isinstance(g, VolumeGroup) and g.outline is None]
    if scoordless and not allow_scoordless:
        raise ValueError(
            f"groups {scoordless} have no SCOORD: OHIF 3.13 cannot display an SR containing them; "
            "put VolumeGroups in a separate SR built with allow_scoordless=True"
        )

    content = [_planar(g, algorithm) if isinstance(g, PlanarGroup) else _volume(g, algorithm) for g in groups]
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(identity),
            name=f"{identity.manufacturer} node",
            manufacturer_name=identity.manufacturer,
            model_name=algorithm.name,
            serial_number=identity.device_serial_number,
        ),
    )
    person = None
    if level is not None and level.reader_confirmed and level.reader.strip():
        person = hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=level.reader, role_in_procedure=codes.concept("reader")),
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person,
                                                     observer_device_context=observer),
        procedure_reported=codes.concept(procedure),
        imaging_measurements=content,
    )
    _report_qualitative(report, report_qualitative, report_texts)
    schemes = codes.coding_schemes(*_all_concepts(groups, report_qualitative, report_texts))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[with_type2(evidence[0]), *evidence[1:]],
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=identity.sr_series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        is_complete=True,
        institution_name=identity.institution_name or None,
        previous_versions=_predecessor_datasets(predecessors) or None,
        contributing_equipment=[contributing_equipment(identity, algorithm)],
        series_description=series_description,
        manufacturer_model_name=algorithm.name,
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        coding_schemes=schemes or None,
    )
    _drop_placeholder_values(sr.ContentSequence)
    return sr


# ------------------------------------------------------------------------------------------
# Reading back (tests and consumers): plain dicts of every measurement group.


@dataclass
class GroupReadout:
    tracking_identifier: str
    tracking_uid: str
    finding: tuple[str, str] | None  # (scheme, value)
    finding_site: tuple[str, str] | None  # the last finding site (the level, where a group has one)
    measurements: dict[str, tuple[float, str]] = field(default_factory=dict)  # meaning -> (value, UCUM)
    qualifiers: dict[str, str] = field(default_factory=dict)  # NUM without value: meaning -> qualifier meaning
    finding_sites: list[tuple[str, str]] = field(default_factory=list)
    laterality: tuple[str, str] | None = None
    qualitative: dict[str, str] = field(default_factory=dict)  # concept meaning -> value meaning
    texts: dict[str, str] = field(default_factory=dict)
    scoords: list[NDArray[np.float32]] = field(default_factory=list)
    referenced_segment: int | None = None
    algorithm: tuple[str, str] | None = None  # (name, version)


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for it in items:
        yield it
        if "ContentSequence" in it:
            yield from _walk(it.ContentSequence)


def read_groups(sr: Dataset) -> list[GroupReadout]:
    """Every TID 1500 measurement group of ``sr`` (a dataset read from disk) as a readout."""
    out = []
    for container in _walk(sr.ContentSequence):
        name = container.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in container else None
        if container.ValueType != "CONTAINER" or name is None or name.CodeValue != "125007":
            continue
        g = GroupReadout("", "", None, None)
        for it in _walk(container.ContentSequence):
            cn = it.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in it else None
            code = cn.CodeValue if cn is not None else ""
            if it.ValueType == "TEXT" and code == "112039":
                g.tracking_identifier = str(it.TextValue)
            elif it.ValueType == "UIDREF" and code == "112040":
                g.tracking_uid = str(it.UID)
            elif it.ValueType == "CODE" and code == "121071":
                c = it.ConceptCodeSequence[0]
                g.finding = (str(c.CodingSchemeDesignator), str(c.CodeValue))
            elif it.ValueType == "CODE" and code in ("363698007", "G-C0E3"):
                c = it.ConceptCodeSequence[0]
                g.finding_site = (str(c.CodingSchemeDesignator), str(c.CodeValue))
                g.finding_sites.append(g.finding_site)
            elif it.ValueType == "CODE" and code in ("272741003", "G-C171"):
                c = it.ConceptCodeSequence[0]
                g.laterality = (str(c.CodingSchemeDesignator), str(c.CodeValue))
            elif it.ValueType == "NUM" and not it.get("MeasuredValueSequence"):
                q = it.NumericValueQualifierCodeSequence[0] if "NumericValueQualifierCodeSequence" in it else None
                g.qualifiers[str(cn.CodeMeaning)] = str(q.CodeMeaning) if q is not None else ""  # type: ignore[union-attr]
            elif it.ValueType == "NUM":
                mv = it.MeasuredValueSequence[0]
                g.measurements[str(cn.CodeMeaning)] = (  # type: ignore[union-attr]
                    float(mv.NumericValue),
                    str(mv.MeasurementUnitsCodeSequence[0].CodeValue),
                )
            elif it.ValueType == "CODE" and cn is not None and code not in ("121401", "370129005"):
                # qualitative evaluations (a NUM's Derivation and Method modifiers are skipped)
                g.qualitative[str(cn.CodeMeaning)] = str(it.ConceptCodeSequence[0].CodeMeaning)
            elif it.ValueType == "TEXT" and cn is not None and code == "111001":
                g.algorithm = (str(it.TextValue), g.algorithm[1] if g.algorithm else "")
            elif it.ValueType == "TEXT" and cn is not None and code == "111003":
                g.algorithm = (g.algorithm[0] if g.algorithm else "", str(it.TextValue))
            elif it.ValueType == "TEXT" and cn is not None:
                g.texts[str(cn.CodeMeaning)] = str(it.TextValue)
            elif it.ValueType == "SCOORD":
                g.scoords.append(np.asarray(it.GraphicData, dtype=np.float32).reshape(-1, 2))
            elif it.ValueType == "IMAGE" and "ReferencedSOPSequence" in it:
                ref = it.ReferencedSOPSequence[0]
                if "ReferencedSegmentNumber" in ref:
                    g.referenced_segment = int(ref.ReferencedSegmentNumber)
        out.append(g)
    return out
