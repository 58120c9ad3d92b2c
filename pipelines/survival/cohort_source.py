"""Model inputs from the cohort feature families, computed on a new study exactly as ``cohort features`` did.

A model fitted with ``model fit --cohort-features FEATURES.csv`` carries ``training.cohort_features``
(:func:`cohort_record`): the feature table's ``param_hash``, the options it was extracted with and
what they hash (from the table's sidecar ``FEATURES.params.json``, written by ``cohort features``),
and the families the model's columns come from.  At deploy time :class:`CohortFeatureStage`
rebuilds the same :class:`pipelines.cohort_features.families.Plan` from those options and the
node's ``[models]`` (the same keys the cohort used), refuses when its ``param_hash`` differs, and
runs only the families the model needs (``RUN[family]``, the cohort's own code) on the job's CT
series and ROI objects.  Every refusal is a reason ("not evaluable: ..."), never a number:

- no SEG/RTSTRUCT ROI, no arterial + portal pair, no level (the family's own NotEvaluable);
- a model column the family did not give for this study;
- deep columns without the pretrained weights (config ``[models]`` ``deep2d``/``deep3d``);
- a different ``param_hash`` (another parameter file, rings mode, label, weights, pipeline version).

Columns belong to families by name: ``bc_*`` body composition; ``intra_*``, ``ringN_*`` and ``rad_*``
radiomics; ``deep2d_*``/``deep3d_*`` deep (muscle ROIs need body composition too); ``art_*``,
``pv_*``, ``fat_*``, ``enh_*``, ``reg_*`` dual phase.  Nothing here imports torch; the deep family
does, when it runs.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from pipelines.base import NotEvaluable, SeriesInput, StageError
from pipelines.survival.design import Value

log = logging.getLogger(__name__)

RECORD_KEY = "cohort_features"  # in a model's ``training``
FAMILY_PATTERNS = (
    (re.compile(r"^bc_"), "body-composition"),
    (re.compile(r"^(intra|ring\d+|rad)_"), "radiomics"),
    (re.compile(r"^deep[23]d_"), "deep"),
    (re.compile(r"^(art|pv|fat|enh|reg|dp)_"), "dual-phase"),
)
ORDER = ("body-composition", "radiomics", "dual-phase", "deep")  # as pipelines.cohort_features.families.ORDER


class CohortRecordError(ValueError):
    """``model fit --cohort-features``: the table or its sidecar cannot vouch for the model's columns."""


def family_of(column: str) -> str | None:
    """The cohort feature family a column comes from, or None (a clinical or header column)."""
    for pattern, family in FAMILY_PATTERNS:
        if pattern.match(column):
            return family
    return None


def families_for(columns: Sequence[str]) -> tuple[str, ...]:
    """The families to run for ``columns`` (deep muscle ROIs come from body composition)."""
    need = {f for c in columns if (f := family_of(c)) is not None}
    if any(family_of(c) == "deep" and not re.match(r"^deep[23]d_tumour_", c) for c in columns):
        need.add("body-composition")
    return tuple(f for f in ORDER if f in need)


def cohort_record(features_csv: Path, columns: Sequence[str], training_csv: Path | None = None) -> dict[str, Any]:
    """What ``model fit --cohort-features`` stores in the model (``training.cohort_features``).

    Checks that the sidecar exists and matches the table's ``param_hash``, that every cohort column
    the model uses is in the table, and (when ``training_csv`` has a ``study`` column) that every
    training study has a row in the table without an error.
    """
    import pandas as pd

    from pipelines.cohort_features.cli import params_path

    sidecar = params_path(features_csv)
    if not sidecar.is_file():
        raise CohortRecordError(f"--cohort-features {features_csv}: no {sidecar.name} beside it (written by "
                                "`prognode cohort features`; extract the table again to get it)")
    try:
        params = json.loads(sidecar.read_text(encoding="utf-8"))
        param_hash, options = str(params["param_hash"]), dict(params["options"])
    except (ValueError, KeyError, TypeError) as e:
        raise CohortRecordError(f"--cohort-features: {sidecar}: not a cohort parameter file ({e})") from e
    table = pd.read_csv(features_csv, dtype={"study": str, "param_hash": str})
    if "param_hash" not in table.columns:
        raise CohortRecordError(f"--cohort-features {features_csv}: no param_hash column (not a `cohort features` "
                                "table)")
    ok = table["error"].fillna("").astype(str) == "" if "error" in table.columns else table["param_hash"].notna()
    if not (table.loc[ok, "param_hash"] == param_hash).any():
        raise CohortRecordError(f"--cohort-features {features_csv}: no row has the param_hash {param_hash} of "
                                f"{sidecar.name} (the table and its parameter file disagree)")
    used = [c for c in columns if family_of(c) is not None]
    absent = [c for c in used if c not in table.columns]
    if absent:
        raise CohortRecordError(f"--cohort-features {features_csv}: the model's columns {absent[:5]} are not in "
                                "the table")
    if training_csv is not None and "study" in table.columns:
        train = pd.read_csv(training_csv, dtype={"study": str}, usecols=lambda c: c == "study")
        if "study" in train.columns:
            known = set(table.loc[ok, "study"])
            missing = sorted(set(train["study"]) - known)
            if missing:
                raise CohortRecordError(f"--cohort-features {features_csv}: {len(missing)} training studies have no "
                                        f"row without error in it: {missing[:5]}")
    return {"param_hash": param_hash, "options": options, "models": sorted(dict(params.get("models", {}))),
            "describe": params.get("describe", {}), "table": str(features_csv), "columns": used,
            "families": list(families_for(used))}


@dataclass(frozen=True)
class CohortValues:
    values: Mapping[str, Value]  # model column -> value (None: not evaluable)
    reason: str  # "" when every column was computed
    param_hash: str
    families: tuple[str, ...]
    rows: Mapping[str, Any]  # the families' full row (provenance included), for the summary


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``Plan.describe`` documents."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) else [where]


def _series_kind(series: SeriesInput) -> tuple[str, str]:
    """(SOP Class UID, description with contrast phase) of a series' first readable file."""
    for f in series.files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SeriesDescription", "ContrastBolusAgentPhase"])
        except Exception:  # noqa: BLE001 - not DICOM: try the next file
            continue
        desc = f"{ds.get('SeriesDescription', '')} {ds.get('ContrastBolusAgentPhase', '')}".strip()
        return str(ds.get("SOPClassUID", "")), desc
    return "", ""


class CohortFeatureStage:
    """The model's cohort columns for one study, through the cohort's own family code and options."""

    name = "cohort-features"

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = record

    def run(self, series: Sequence[SeriesInput], extra_files: Sequence[Path], models: Mapping[str, Path],
            device: str, columns: Sequence[str]) -> CohortValues:
        from pipelines.cohort_features.families import RUN, CohortOptions, Plan, StudyState, applies
        from pipelines.cohort_features.study import CtSeries, StudyFolder, phase_of
        from pipelines.common.volume import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
        from pipelines.roi.mask import ROI_SOP_CLASSES

        recorded = str(self.record.get("param_hash", ""))
        families = families_for(columns)
        empty: dict[str, Value] = {c: None for c in columns}

        def refuse(reason: str, param_hash: str = "") -> CohortValues:
            log.info("cohort features not evaluable: %s", reason)
            return CohortValues(empty, reason, param_hash, families, {})

        o = dict(self.record.get("options", {}))
        keys = set(self.record.get("models", []))
        try:
            options = CohortOptions(families=tuple(o.get("families", ())), label=str(o.get("label", "")),
                                    radiomics=dict(o.get("radiomics", {})),
                                    body_composition=dict(o.get("body_composition", {})),
                                    deep=dict(o.get("deep", {})), dual_phase=dict(o.get("dual_phase", {})),
                                    device=device)
            plan = Plan(options, {k: v for k, v in models.items() if k in keys})
        except (ValueError, OSError) as e:
            return refuse(f"the cohort's extraction options cannot be rebuilt here: {e}")
        if "deep" in families:
            dims = sorted({int(c[4]) for c in columns if family_of(c) == "deep"})
            lacking = [d for d in dims if d not in plan.weights]
            if lacking:
                names = ", ".join(f"models.{plan.deep.model_2d if d == 2 else plan.deep.model_3d}" for d in lacking)
                return refuse(f"deep features without pretrained weights: config [models] has no {names} "
                              "(the cohort's weights, same sha256)", plan.hash)
        if plan.hash != recorded:
            diff = _differences(self.record.get("describe", {}), plan.describe())
            return refuse(f"param hash mismatch: the model was fitted on features with param_hash {recorded}, this "
                          f"node would extract {plan.hash}" + (f" (differs in {', '.join(diff[:6])})" if diff else ""),
                          plan.hash)
        cts: list[CtSeries] = []
        rois: list[Path] = list(extra_files)
        for s in series:
            sop, desc = _series_kind(s)
            if sop in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
                cts.append(CtSeries(s, desc, phase_of(desc)))
            else:
                rois.extend(s.files)
        roi_files = []
        for f in rois:
            try:
                cls = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"]).get(
                    "SOPClassUID", ""))
            except Exception:  # noqa: BLE001 - not DICOM
                continue
            if cls in ROI_SOP_CLASSES:
                roi_files.append(f)
        cts.sort(key=lambda c: -len(c.series.files))
        study = StudyFolder(cts[0].series.study_uid if cts else "study", Path("."), tuple(cts), tuple(roi_files))
        state = StudyState(study)
        row: dict[str, Any] = {}
        reasons: list[str] = []
        for family in families:
            why = applies(family, study)
            if why:
                reasons.append(f"{family}: {why}")
                continue
            try:
                row.update(RUN[family](state, plan))
            except NotEvaluable as e:
                reasons.append(f"{family}: {e.stage + ': ' if e.stage else ''}{e.reason}")
            except StageError as e:
                reasons.append(f"{family}: {e.stage}: {e.reason}")
        values: dict[str, Value] = {}
        unfilled: list[str] = []
        for c in columns:
            v = row.get(c)
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)):
                values[c] = float(v)
            else:
                values[c] = None
                unfilled.append(c)
        if unfilled and not reasons:
            more = f" and {len(unfilled) - 5} more" if len(unfilled) > 5 else ""
            reasons.append(f"feature not evaluable on this study: {', '.join(unfilled[:5])}{more}")
        return CohortValues(values, "; ".join(reasons) if unfilled or reasons else "", plan.hash, families, row)
