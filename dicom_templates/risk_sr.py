"""Risk SR: a survival model's result as a TID 1500 Measurement Report (PS3.16) in a Comprehensive 3D SR.

A thin layer over :func:`dicom_templates.sr.build_measurement_report` and the code table
(``codes.toml``).  One OHIF-visible planar group (TID 1501, tracking identifier
``Cornerstone3DTools@^0.1.0:PlanarFreehandROI``) whose NUMs are INFERRED FROM a closed SCOORD
POLYLINE (the body outline on the key slice) SELECTED FROM that CT image:

- evaluable: NUM "Risk score" (unitless linear predictor), NUM "Probability of event by horizon"
  (unitless, 0-1) when the model has a horizon, CODE "Risk group" (low / intermediate / high) or,
  for other labels (quartiles), TEXT "Risk group";
- not evaluable: CODE "Evaluability" = "Not evaluable", TEXT "Reason not evaluable" and one true
  number, NUM "Number of unusable model inputs".  That NUM is there because OHIF 3.13 lists a group
  only through a NUM on a SCOORD (a group with only an image region loads but is not listed; checked
  with ohif-check); it is never a stand-in score.  The report-level Qualitative Evaluations say
  "not evaluable" and why as well.

The model's name and version are the group's algorithm (TID 4019 Algorithm Name / Version), with
its kind and horizon as algorithm parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_templates.common import Algorithm
from dicom_templates.identity import Identity, Predecessor
from dicom_templates.sr import (
    OHIF_TRACKING_IDENTIFIER,
    Measurement,
    PlanarGroup,
    Qualitative,
    Text,
    build_measurement_report,
    read_groups,
)

__all__ = ["OHIF_TRACKING_IDENTIFIER", "RiskContent", "build_risk_sr", "read_risk"]

GROUP_CONCEPTS = {"low": "risk-group-low", "intermediate": "risk-group-intermediate", "high": "risk-group-high"}


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


def _group(content: RiskContent, image: Dataset, polygon: npt.NDArray[np.float64]) -> PlanarGroup:
    tracking = f"survival-risk:{content.model_name}"
    if content.evaluable:
        if content.score is None or not np.isfinite(content.score):
            raise ValueError("an evaluable risk needs a finite score")
        nums = [Measurement("risk-score", float(content.score), "1")]
        if content.horizon_probability is not None:
            nums.append(Measurement("horizon-probability", float(content.horizon_probability), "1"))
        coded = GROUP_CONCEPTS.get(content.group or "")
        qual = [Qualitative("risk-group", coded)] if coded else []
        texts = [] if coded else [Text("risk-group", content.group or "")]
        return PlanarGroup(tracking, "finding", image, polygon, measurements=nums, qualitative=qual, text=texts)
    if not content.reason.strip():
        raise ValueError("a not-evaluable risk needs a reason")
    return PlanarGroup(tracking, "finding", image, polygon,
                       measurements=[Measurement("unusable-inputs", float(max(content.unusable_inputs, 1)), "1")],
                       qualitative=[Qualitative("evaluability", "not-evaluable")],
                       text=[Text("not-evaluable-reason", content.reason)])


def build_risk_sr(content: RiskContent, image: Dataset, polygon: npt.ArrayLike, identity: Identity,
                  series_description: str = "Survival risk",
                  predecessors: Sequence[Predecessor | Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    """The risk SR for the study of ``image``; ``polygon`` is (N, 2) (column, row) pixels on it.

    Raises ``ValueError`` for an empty identity, a bad polygon, an evaluable result without a finite
    score, or a not-evaluable one without a reason.
    """
    params = {"kind": content.model_kind}
    if content.horizon_days is not None:
        params["horizon_days"] = f"{content.horizon_days:g}"
    algorithm = Algorithm(content.model_name, content.model_version, family="family-ai", parameters=params)
    group = _group(content, image, np.asarray(polygon, dtype=np.float64))
    return build_measurement_report(
        evidence=[image], groups=[group], algorithm=algorithm, identity=identity,
        series_description=series_description, predecessors=predecessors,
        not_evaluable_reason=None if content.evaluable else content.reason)


def read_risk(sr: Dataset) -> dict[str, Any]:
    """The risk group of an SR read from disk: numbers, codes, texts, algorithm, first SCOORD."""
    groups = read_groups(sr)
    if len(groups) != 1:
        raise ValueError(f"a risk SR has one measurement group, found {len(groups)}")
    g = groups[0]
    return {"numbers": {k: v[0] for k, v in g.measurements.items()}, "codes": dict(g.qualitative),
            "texts": dict(g.texts), "algorithm": g.algorithm, "tracking_identifier": g.tracking_identifier,
            "scoord": g.scoords[0] if g.scoords else None}
