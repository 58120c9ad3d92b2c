"""Level-marker SRs built the way OHIF 3.13 saves a measurement (dcmjs / @cornerstonejs/adapters).

What OHIF 3.13.2 writes (read from its bundle, ``@ohif/app`` 3.13.2 ``dist/``, the same build that
``../shared/tools/ohif-check`` runs):

- a Comprehensive 3D SR (dcmjs ``StructuredReport``), TID 1500 "Imaging Measurement Report" with
  Person Observer Name "unknown^unknown" unless a user name is configured, procedure reported
  SCT 363679005 "Imaging procedure";
- one TID 1501 Measurement Group per annotation: Tracking Identifier
  ``Cornerstone3DTools@^0.1.0:<Tool>`` and a fresh Tracking Unique Identifier;
- the annotation's label as a free-text code (``CORNERSTONEJS`` / ``CORNERSTONEFREETEXT``, the label as
  Code Meaning): in a **Finding Site** (SCT 363698007) for every tool except ArrowAnnotate, whose label
  goes in the **Finding** (DCM 121071) (``getFilteredCornerstoneToolState``,
  ``additionalFindingTypes: ['ArrowAnnotate']``);
- the NUMs (e.g. Length, SCT 410668003, mm) INFERRED FROM a SCOORD (POLYLINE for a length, POINT for a
  probe) SELECTED FROM the one image it was drawn on.

:func:`marker_sr` builds that structure with highdicom (no dcmjs here).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

CORNERSTONE_3D_TAG = "Cornerstone3DTools@^0.1.0"
LENGTH = CodedConcept("410668003", "SCT", "Length")
IMAGING_PROCEDURE = CodedConcept("363679005", "SCT", "Imaging procedure")


def free_text(label: str) -> CodedConcept:
    return CodedConcept("CORNERSTONEFREETEXT", "CORNERSTONEJS", label)


def marker_sr(image: Dataset, label: str | None = "L3", *, reader: str = "unknown^unknown", tool: str = "Length",
              finding_site: CodedConcept | None = None, extra_images: tuple[Dataset, ...] = (),
              algorithm: bool = False, manufacturer: str = "OHIF") -> hd.sr.Comprehensive3DSR:
    """An SR with one measurement drawn on ``image`` (a Length, or the ``tool`` named), labelled ``label``."""
    rows, cols = int(image.Rows), int(image.Columns)
    coords = []
    for img in (image, *extra_images):
        coords.append(hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([[cols * 0.3, rows * 0.5], [cols * 0.7, rows * 0.5]], dtype=np.float32),
            source_image=hd.sr.SourceImageForRegion.from_source_image(img)))
    sites = [hd.sr.FindingSite(anatomic_location=free_text(label))] if label and tool != "ArrowAnnotate" else []
    if finding_site is not None:
        sites.append(hd.sr.FindingSite(anatomic_location=finding_site))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{CORNERSTONE_3D_TAG}:{tool}"),
        finding_type=free_text(label) if label and tool == "ArrowAnnotate" else None,
        finding_sites=sites or None,
        algorithm_id=hd.sr.AlgorithmIdentification(name="some CAD", version="1") if algorithm else None,
        measurements=[hd.sr.Measurement(name=LENGTH, value=float(cols) * 0.4, unit=codes.UCUM.Millimeter,
                                        referenced_coordinates=coords)])
    person = hd.sr.ObserverContext(observer_type=codes.DCM.Person,
                                   observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                                       name=reader))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=IMAGING_PROCEDURE, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[image, *extra_images], content=report[0], series_instance_uid=hd.UID(), series_number=1001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=manufacturer,
        series_description="Research Derived Series", is_complete=True)
    as_dcmjs_codes(sr)
    return sr


def as_dcmjs_codes(ds: Dataset) -> None:
    """dcmjs writes the 19-character CORNERSTONEFREETEXT as a Code Value (SH, 16 at most), where
    highdicom writes a conformant Long Code Value: move it back, as OHIF's SR has it."""
    from pydicom import config

    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                as_dcmjs_codes(item)
    if "LongCodeValue" in ds and "CodeValue" not in ds:
        old = config.settings.writing_validation_mode
        config.settings.writing_validation_mode = config.IGNORE
        try:
            ds.CodeValue = str(ds.LongCodeValue)
        finally:
            config.settings.writing_validation_mode = old
        del ds.LongCodeValue
