"""Risk SR: a survival model's result as a TID 1500 Measurement Report in a Comprehensive 3D SR.

Layout (PS3.16 TID 1500 "Measurement Report", one TID 1501 "Measurement and Qualitative
Evaluation Group"), chosen so that OHIF 3.13 shows it (``../shared/tools/ohif-check/README.md``:
OHIF blanks a whole SR when any group lacks a SCOORD):

- tracking identifier ``Cornerstone3DTools@^0.1.0:PlanarFreehandROI`` with a tracking UID derived
  from the study and the model name (a re-run tracks the same "ROI");
- NUM "Risk score" (unitless, the model's linear predictor) and, when the model has a horizon,
  NUM "Probability of event by horizon" (unitless, 0-1), each INFERRED FROM a closed SCOORD
  POLYLINE (the body outline on the key slice) SELECTED FROM that CT image;
- CODE "Risk group" (low / intermediate / high) where the label has a code, and TEXT items with
  the risk group label, the model's name, version and kind, and the horizon in days;
- the model is also the algorithm of the group and of each NUM (TID 4019).

When inputs are missing, the same kind of group carries no risk numbers: CODE "Evaluability" =
"Not evaluable", TEXT "Reason not evaluable", and one true number, NUM "Number of unusable model
inputs" ({inputs}), INFERRED FROM the same polygon.  That NUM is there because OHIF 3.13 lists a
group only through a NUM on a SCOORD (a TID 1410 group with just an image region is loaded but not
listed, checked with ohif-check); it is never a stand-in score.

Codes: DICOM/SNOMED where one exists; the rest use the project's private scheme ``99PROGNODE``
with the same values as ``dicom_templates/codes.toml`` (declared in the Coding Scheme
Identification Sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from pipelines.base import Identity

OHIF_TRACKING_IDENTIFIER = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
PRIVATE = "99PROGNODE"
CODES_VERSION = "2026.11.1"


def _c(value: str, meaning: str, scheme: str = PRIVATE) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


RISK_SCORE = _c("RISKSCORE", "Risk score")
RISK_GROUP = _c("RISKGROUP", "Risk group")
HORIZON_PROBABILITY = _c("HORIZONP", "Probability of event by horizon")
GROUP_CODES = {"low": _c("RISKLOW", "Low risk group"), "high": _c("RISKHIGH", "High risk group"),
               "intermediate": _c("RISKINT", "Intermediate risk group")}
EVALUABILITY = _c("EVAL", "Evaluability")
NOT_EVALUABLE = _c("EVALNO", "Not evaluable")
NOT_EVALUABLE_REASON = _c("EVALWHY", "Reason not evaluable")
UNUSABLE_INPUTS = _c("NINPUTBAD", "Number of unusable model inputs")
INPUTS = hd.sr.CodedConcept(value="{inputs}", scheme_designator="UCUM", meaning="inputs")
MODEL_NAME = _c("MODELNAME", "Model name")
MODEL_VERSION = _c("MODELVER", "Model version")
MODEL_KIND = _c("MODELKIND", "Model kind")
HORIZON_DAYS = _c("HORIZOND", "Horizon in days")
FINDING = _c("121071", "Finding", "DCM")  # DCM 121071 Finding (pydicom codes.DCM.Finding)
NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
DAYS = hd.sr.CodedConcept(value="d", scheme_designator="UCUM", meaning="day")
CT_PROCEDURE = hd.sr.CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region")


@dataclass(frozen=True)
class RiskContent:
    """What the SR says: the model and its result (or why there is none)."""

    model_name: str
    model_version: str
    model_kind: str
    score: float | None
    group: str | None
    horizon_days: float | None
    horizon_probability: float | None
    evaluable: bool = True
    reason: str = ""
    unusable_inputs: int = 0  # not evaluable: how many model inputs were missing or unusable


def close_polygon(polygon: npt.ArrayLike) -> npt.NDArray[np.float32]:
    pts = np.asarray(polygon, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(np.unique(pts, axis=0)) < 3:
        raise ValueError(f"polygon must be (N>=3, 2) distinct (column, row) points, got shape {pts.shape}")
    if np.allclose(pts[0], pts[-1]):
        pts = pts[:-1]
    return np.vstack([pts, pts[:1]]).astype(np.float32)


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _group(content: RiskContent, image: Dataset, polygon: npt.NDArray[np.float32],
           algorithm: hd.sr.AlgorithmIdentification) -> Any:
    source = hd.sr.SourceImageForRegion.from_source_image(image)
    tracking = hd.sr.TrackingIdentifier(
        uid=str(generate_uid(entropy_srcs=["prognode-risk", str(image.StudyInstanceUID), content.model_name])),
        identifier=OHIF_TRACKING_IDENTIFIER)
    texts = [_text(MODEL_NAME, content.model_name), _text(MODEL_VERSION, content.model_version),
             _text(MODEL_KIND, content.model_kind)]
    coords = [hd.sr.CoordinatesForMeasurement(graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                                              graphic_data=polygon, source_image=source)]
    if content.evaluable:
        if content.score is None or not np.isfinite(content.score):
            raise ValueError("an evaluable risk needs a finite score")
        nums = [hd.sr.Measurement(name=RISK_SCORE, value=float(content.score), unit=NO_UNITS,
                                  algorithm_id=algorithm, referenced_coordinates=coords)]
        if content.horizon_probability is not None:
            nums.append(hd.sr.Measurement(name=HORIZON_PROBABILITY, value=float(content.horizon_probability),
                                          unit=NO_UNITS, algorithm_id=algorithm, referenced_coordinates=coords))
        qual = None
        if content.group in GROUP_CODES:
            qual = [hd.sr.QualitativeEvaluation(name=RISK_GROUP, value=GROUP_CODES[content.group])]
        texts.append(_text(RISK_GROUP, content.group or ""))
    else:
        if not content.reason.strip():
            raise ValueError("a not-evaluable risk needs a reason")
        nums = [hd.sr.Measurement(name=UNUSABLE_INPUTS, value=float(max(content.unusable_inputs, 1)), unit=INPUTS,
                                  algorithm_id=algorithm, referenced_coordinates=coords)]
        qual = [hd.sr.QualitativeEvaluation(name=EVALUABILITY, value=NOT_EVALUABLE)]
        texts.append(_text(NOT_EVALUABLE_REASON, content.reason))
    group: Any = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=FINDING, algorithm_id=algorithm,
        measurements=nums, qualitative_evaluations=qual)
    if content.horizon_days is not None:
        texts.append(_text(HORIZON_DAYS, f"{content.horizon_days:g}"))
    group[0].ContentSequence.extend(texts)
    return group


def build_risk_sr(content: RiskContent, image: Dataset, polygon: npt.ArrayLike, identity: Identity,
                  series_description: str = "Survival risk", previous_versions: Sequence[Dataset] = (),
                  series_instance_uid: str | None = None, sop_instance_uid: str | None = None
                  ) -> hd.sr.Comprehensive3DSR:
    """The risk SR for the study of ``image``; ``polygon`` is (N, 2) (column, row) pixels on it.

    Raises ``ValueError`` for an empty identity, a bad polygon, or an evaluable result without a
    finite score.
    """
    for attr in ("manufacturer", "software_version", "device_serial_number"):
        if not str(getattr(identity, attr)).strip():
            raise ValueError(f"Identity.{attr} is empty: configure [output] / [node] (no placeholders)")
    pts = close_polygon(polygon)
    rows, cols = int(image.Rows), int(image.Columns)
    if pts[:, 0].min() < 0 or pts[:, 1].min() < 0 or pts[:, 0].max() > cols or pts[:, 1].max() > rows:
        raise ValueError(f"polygon leaves the {cols}x{rows} image")
    algorithm = hd.sr.AlgorithmIdentification(name=content.model_name, version=content.model_version,
                                              parameters=[f"kind={content.model_kind}"])
    group = _group(content, image, pts, algorithm)
    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=str(generate_uid(entropy_srcs=["prognode-device", identity.manufacturer,
                                               identity.device_serial_number])),
            name=f"{identity.manufacturer} node", manufacturer_name=identity.manufacturer,
            model_name=content.model_name, serial_number=identity.device_serial_number))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                     procedure_reported=CT_PROCEDURE, imaging_measurements=[group])
    equipment = hd.ContributingEquipment(
        manufacturer=identity.manufacturer, purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=content.model_name, software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number, institution_name=identity.institution_name or None,
        contribution_description=f"{content.model_name} {content.model_version}")
    scheme = CodingSchemeIdentificationItem(designator=PRIVATE, name="prognode private codes",
                                            version=CODES_VERSION, responsible_organization="prognode project")
    return hd.sr.Comprehensive3DSR(
        evidence=[image], content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(), series_number=identity.sr_series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(), instance_number=1,
        manufacturer=identity.manufacturer, is_complete=True,
        institution_name=identity.institution_name or None,
        previous_versions=list(previous_versions) or None, contributing_equipment=[equipment],
        series_description=series_description, manufacturer_model_name=content.model_name,
        software_versions=identity.software_version, device_serial_number=identity.device_serial_number,
        coding_schemes=[scheme])


def read_risk(sr: Dataset) -> dict[str, Any]:
    """Read a risk SR back (tests, consumers): NUMs, CODEs and TEXTs of its group by concept meaning."""
    out: dict[str, Any] = {"numbers": {}, "codes": {}, "texts": {}, "scoord": None}

    def walk(items: Sequence[Dataset]) -> None:
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            vt = it.ValueType
            if vt == "NUM":
                out["numbers"][name] = float(it.MeasuredValueSequence[0].NumericValue)
            elif vt == "CODE":
                out["codes"][name] = it.ConceptCodeSequence[0].CodeMeaning
            elif vt == "TEXT":
                out["texts"][name] = str(it.TextValue)
            elif vt == "SCOORD" and out["scoord"] is None:
                out["scoord"] = (str(it.GraphicType), [float(x) for x in it.GraphicData])
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    return out
