"""The ``survival-risk`` pipeline: a fitted survival model's risk for one CT study, as a TID 1500 SR.

Options (config ``[pipelines.survival-risk]``)::

    model = "hn-bodycomp"            # a name in config [models] (a model folder), or a folder path
    series_description = "Survival risk"
    [pipelines.survival-risk.features]   # model feature -> "<source>:<key>" (pipelines.survival.features)
    Age = "header:age"
    Sex = "header:sex"
    "Pre-RT L3 Skeletal Muscle Index (cm2/m2)" = "sr:skeletal muscle index"
    [pipelines.survival-risk.values.Sex]  # source value -> model level
    M = "Male"
    F = "Female"

A model fitted on ``prognode cohort features`` columns with ``model fit --cohort-features`` needs no
mapping for them: every model feature named like a cohort column (``intra_*``, ``ring3_*``, ``bc_*``,
``deep3d_*``, ``art_*``, ...) that ``features`` does not map is ``cohort:<column>``, computed on the
job's study by the cohort's own family code with the options recorded in the model
(:mod:`pipelines.survival.cohort_source`).  Run it on a study-level route when the model needs the
tumour SEG/RTSTRUCT or both contrast phases::

    [pipelines.survival-risk]
    model = "rps-radiomics"
    [pipelines.survival-risk.features]   # only the features that are not cohort columns
    Age = "header:age"

Stages: key slice and body outline (the SR's SCOORD anchor) -> features (cohort families) -> score -> SR.
Missing inputs give an SR that says "not evaluable" and why (for cohort columns: no ROI, no level, a
feature the family did not give, deep features without weights, a parameter-hash mismatch); they
are never imputed unless the model card says the model imputes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from pipelines import registry
from pipelines.base import PipelineContext, PipelineOutput, SeriesInput, StageError
from pipelines.survival.artifact import ArtifactError, SurvivalModel, load_model
from pipelines.survival.cohort_source import RECORD_KEY, CohortFeatureStage, CohortValues, family_of
from pipelines.survival.features import COHORT, gather, parse_mapping
from pipelines.survival.scoring import Risk, score

log = logging.getLogger(__name__)
NAME = "survival-risk"
VERSION = registry.version(NAME)  # the one place: pipelines/registry.py
BODY_HU = -300.0


@dataclass(frozen=True)
class RiskOptions:
    model: str
    features: Mapping[str, tuple[str, str]]
    values: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    series_description: str = "Survival risk"

    @staticmethod
    def parse(options: Mapping[str, Any]) -> RiskOptions:
        known = {"model", "features", "values", "series_description"}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"pipelines.{NAME}: unknown options {sorted(unknown)}")
        model = options.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f"pipelines.{NAME}.model: name a model folder from [models]")
        feats = options.get("features", {})
        if not isinstance(feats, Mapping):
            raise ValueError(f"pipelines.{NAME}.features: map each model feature to '<source>:<key>'")
        values = options.get("values", {})
        if not isinstance(values, Mapping) or not all(isinstance(v, Mapping) for v in values.values()):
            raise ValueError(f"pipelines.{NAME}.values: expected tables of source value -> model level")
        return RiskOptions(model, parse_mapping(feats), {str(k): {str(a): str(b) for a, b in v.items()}
                                                         for k, v in values.items()},
                           str(options.get("series_description", "Survival risk")))


@dataclass(frozen=True)
class KeySlice:
    image: Dataset  # full dataset (with pixels) of the slice the SR's polygon lies on
    polygon: npt.NDArray[np.float64]  # (N, 2) column, row
    outline: str  # "body" or "image border"


class KeySliceStage:
    """The middle slice of the series and the convex hull of its body (HU > -300, largest component)."""

    name = "key-slice"

    def run(self, files: Sequence[Path], series_uid: str) -> KeySlice:
        headers = []
        for f in files:
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
            except Exception as e:  # noqa: BLE001
                raise StageError(self.name, series_uid, f"cannot read {f.name}: {e}") from e
            if "Rows" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
                headers.append((f, ds))
        if not headers:
            raise StageError(self.name, series_uid, "no image with position and orientation in the series")
        iop = np.asarray(headers[0][1].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        headers.sort(key=lambda h: float(np.dot(normal, np.asarray(h[1].ImagePositionPatient, dtype=float))))
        path = headers[len(headers) // 2][0]
        image = pydicom.dcmread(path)
        try:
            pixels = image.pixel_array.astype(np.float64)
        except Exception as e:  # noqa: BLE001 - decoder missing or broken pixel data
            raise StageError(self.name, series_uid, f"cannot decode pixels of {path.name}: {e}") from e
        if pixels.ndim != 2:
            pixels = pixels[0]
        hu = pixels * float(image.get("RescaleSlope", 1) or 1) + float(image.get("RescaleIntercept", 0) or 0)
        polygon = body_outline(hu)
        if polygon is None:
            rows, cols = hu.shape
            polygon = np.array([[0.5, 0.5], [cols - 0.5, 0.5], [cols - 0.5, rows - 0.5], [0.5, rows - 0.5]])
            return KeySlice(image, polygon, "image border")
        return KeySlice(image, polygon, "body")


def body_outline(hu: npt.NDArray[np.float64], threshold: float = BODY_HU) -> npt.NDArray[np.float64] | None:
    """Convex hull (column, row pixel centres) of the largest connected region above ``threshold``."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    labels, n = ndimage.label(hu > threshold)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    if largest.sum() < 10:
        return None
    edge = largest & ~ndimage.binary_erosion(largest)
    rc = np.argwhere(edge).astype(np.float64)
    pts = np.column_stack([rc[:, 1], rc[:, 0]]) + 0.5
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return None
    return np.asarray(pts[hull.vertices], dtype=np.float64)


class SurvivalRiskPipeline:
    name = NAME
    version = VERSION

    def __init__(self, options: RiskOptions) -> None:
        self.options = options
        self.key_slice = KeySliceStage()

    def _model(self, ctx: PipelineContext, series_uid: str) -> SurvivalModel:
        name = self.options.model
        path = ctx.models.get(name) if name in ctx.models else Path(name)
        if path is None or not Path(path).exists():
            raise StageError("load-model", series_uid, f"model {name!r} is not in config [models] "
                             "and is not a folder")
        try:
            return load_model(Path(path))
        except ArtifactError as e:
            raise StageError("load-model", series_uid, str(e)) from e

    def _mapping(self, model: SurvivalModel, series_uid: str) -> dict[str, tuple[str, str]]:
        """Each model feature's source: the option, else ``cohort:<name>`` for a cohort column of a model
        fitted with ``--cohort-features``."""
        record = model.training.get(RECORD_KEY)
        mapping = dict(self.options.features)
        for f in model.feature_names:
            if f not in mapping and record and family_of(f):
                mapping[f] = (COHORT, f)
        unmapped = [f for f in model.feature_names if f not in mapping]
        if unmapped:
            hint = ("" if record or not any(family_of(f) for f in unmapped) else
                    "; cohort feature columns are computed only for a model fitted with `model fit "
                    "--cohort-features FEATURES.csv`")
            raise StageError("features", series_uid,
                             f"pipelines.{NAME}.features does not map model features {unmapped}{hint}")
        if not record and any(src == COHORT for src, _ in mapping.values()):
            raise StageError("features", series_uid, f"model {model.name!r} records no cohort extraction options "
                             "(fit it with `model fit --cohort-features FEATURES.csv`)")
        return {f: mapping[f] for f in model.feature_names}

    def run(self, ctx: PipelineContext) -> PipelineOutput:
        from dicom_templates.risk_sr import RiskContent, build_risk_sr

        if not ctx.series:
            raise StageError(NAME, "", "no series in the job")
        series = ct_series(ctx.series)
        model = self._model(ctx, series.series_uid)
        mapping = self._mapping(model, series.series_uid)
        key = self.key_slice.run(series.files, series.series_uid)
        columns = [k for src, k in mapping.values() if src == COHORT]
        cohort: CohortValues | None = None
        if columns:
            cohort = CohortFeatureStage(model.training[RECORD_KEY]).run(ctx.series, ctx.extra_files, ctx.models,
                                                                        ctx.device, columns)
        raw = gather(mapping, self.options.values, key.image, ctx.extra_files,
                     cohort.values if cohort is not None else None)
        if cohort is not None and cohort.reason:
            missing = sum(1 for v in cohort.values.values() if v is None)
            risk = Risk(None, None, None, evaluable=False, reason=cohort.reason)
            reason = cohort.reason
        else:
            risk = score(model, raw)
            missing = len(risk.reason.split("; ")) if risk.reason else 0
            reason = self._explain(risk, raw, mapping) if not risk.evaluable else ""
        content = RiskContent(model.name, model.version, model.kind, risk.score, risk.group, model.horizon_days,
                              risk.horizon_probability, risk.evaluable, reason,
                              unusable_inputs=missing)
        try:
            sr = build_risk_sr(content, key.image, key.polygon, ctx.identity,
                               series_description=self.options.series_description)
        except ValueError as e:
            raise StageError("risk-sr", series.series_uid, str(e)) from e
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        out = ctx.work_dir / f"risk-sr-{sr.SOPInstanceUID}.dcm"
        sr.save_as(out, enforce_file_format=True)
        summary = {"model": {"name": model.name, "version": model.version, "kind": model.kind},
                   "score": risk.score, "group": risk.group, "horizon_days": model.horizon_days,
                   "horizon_probability": risk.horizon_probability,
                   "features": {k: v for k, v in raw.items()}, "anchor": key.outline,
                   "sr_sop_instance_uid": str(sr.SOPInstanceUID)}
        if cohort is not None:
            summary["cohort_features"] = {"param_hash": cohort.param_hash, "families": list(cohort.families),
                                          "recorded_param_hash": model.training[RECORD_KEY].get("param_hash")}
        log.info("risk for series %s: %s", series.series_uid, risk.label)
        return PipelineOutput(files=(out,), summary=summary, evaluable=risk.evaluable, reason=reason)

    def _explain(self, risk: Risk, raw: Mapping[str, Any], mapping: Mapping[str, tuple[str, str]]) -> str:
        where = {f: f"{s}:{k}" for f, (s, k) in mapping.items()}
        parts = []
        for item in risk.reason.split("; "):
            feature = item.split(":", 1)[0]
            parts.append(f"{item} (from {where[feature]})" if feature in where else item)
        return "; ".join(parts)


def ct_series(series: Sequence[SeriesInput]) -> SeriesInput:
    """The CT series the SR anchors on: role ``ct``, else the largest CT series, else the first series."""
    from pipelines.common.volume import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE

    if len(series) == 1:
        return series[0]
    for s in series:
        if s.role == "ct":
            return s
    cts = []
    for s in series:
        try:
            ds = pydicom.dcmread(s.files[0], stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # noqa: BLE001 - not DICOM: not a CT series
            continue
        if str(ds.get("SOPClassUID", "")) in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
            cts.append(s)
    return max(cts, key=lambda s: len(s.files)) if cts else series[0]


def create(options: Mapping[str, Any]) -> SurvivalRiskPipeline:
    return SurvivalRiskPipeline(RiskOptions.parse(options))
