"""The feature families of one study, each through its pipeline's typed stages, with provenance.

=================== ============================================= =====================================
family              applies when the study folder holds           columns
=================== ============================================= =====================================
body-composition    a CT series                                   ``bc_*`` (areas, HU, volumes, SMI, ...)
radiomics           a tumour SEG/RTSTRUCT and the CT it is on     ``intra_*``, ``ring3_*``, ``ring6_*``,
                                                                  ``ring9_*`` (pyradiomics)
deep                a tumour ROI, or the named muscles at the     ``deep2d_<roi>_NNN``, ``deep3d_<roi>_NNN``
                    level (from body composition)
dual-phase          an arterial and a portal-venous CT series     ``art_*``, ``pv_*``, ``fat_*``, ``enh_*``,
                    and the tumour ROI                            ``reg_*``
=================== ============================================= =====================================

Every family adds provenance columns beside its features: ``<prefix>_pipeline`` and
``<prefix>_pipeline_version`` (``bc``, ``rad``, ``deep``, ``dp``), the parameter file's sha256,
the model name and version (body composition: the backend and its model; deep: the encoder and
the sha256 of its weights), and for body composition the level, the image it was measured on and
whether it was found automatically or confirmed by a reader (``bc_level_source``).  A family that
applies but cannot give a trustworthy number fills ``<prefix>_not_evaluable`` with the reason.

Deep features come only from pretrained weights (config ``[models]`` keys ``deep2d`` and
``deep3d``, local files).  Without them the row says so in ``deep_weights`` ("none: ...") and
carries **no** deep feature columns: the embedding of a randomly initialised network is not
signal.  The ROIs are the tumour and, at a lumbar level, the left and right iliopsoas and
erector spinae on the level slice; the 2D patch is the ROI's largest slice, the 3D patch a cube
centred on the ROI (``pipelines.deep.crop.RoiCrop``, as the deep-features pipeline and
``train-deep`` cut them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines.base import NotEvaluable, PipelineContext, StageError
from pipelines.cohort_features.study import CtSeries, StudyFolder
from pipelines.common.volume import SeriesToVolume, Volume

log = logging.getLogger(__name__)

FAMILIES = ("body-composition", "radiomics", "deep", "dual-phase")
ORDER = ("body-composition", "radiomics", "dual-phase", "deep")  # deep uses the muscles and the tumour
PREFIX = {"body-composition": "bc", "radiomics": "rad", "deep": "deep", "dual-phase": "dp"}
NO_WEIGHTS = "none: no pretrained weights (random init is not signal); deep features left out"
MUSCLE_ROIS = ("psoas_left", "psoas_right", "erector_left", "erector_right")


@dataclass(frozen=True)
class CohortOptions:
    """What ``prognode cohort features`` extracts; every field is part of the parameter hash.

    ``families``: empty for every family that applies to each study.  The mappings are the
    pipelines' own options (config ``[pipelines.<name>]``), validated by their option classes.
    ``reader_levels``: study name -> a reader-confirmed level
    (``pipelines.body_composition.reader_level.LevelOverride`` fields).
    """

    families: tuple[str, ...] = ()
    label: str = ""  # tumour segment label / ROI name; empty: the first
    radiomics: Mapping[str, Any] = field(default_factory=dict)
    body_composition: Mapping[str, Any] = field(default_factory=dict)
    deep: Mapping[str, Any] = field(default_factory=dict)
    dual_phase: Mapping[str, Any] = field(default_factory=dict)
    reader_levels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad:
            raise ValueError(f"families {bad}: expected some of {', '.join(FAMILIES)}")


class Plan:
    """The configured pipelines and stages, built once per cohort run (fails early on bad options)."""

    def __init__(self, options: CohortOptions, models: Mapping[str, Path] | None = None) -> None:
        from pipelines.body_composition.pipeline import Options as BcOptions
        from pipelines.body_composition.pipeline import create as create_bc
        from pipelines.body_composition.reader_level import LevelOverride
        from pipelines.deep.pipeline import DeepOptions, sha256_of
        from pipelines.dualphase.pipeline import DualPhaseOptions
        from pipelines.dualphase.pipeline import create as create_dp
        from pipelines.radiomics.features import Params
        from pipelines.radiomics.pipeline import RadiomicsOptions

        self.options = options
        self.models = {k: Path(v) for k, v in (models or {}).items()}
        rad = {"write_seg": False, "write_sr": False, **options.radiomics}
        if options.label:
            rad.setdefault("label", options.label)
        self.radiomics = RadiomicsOptions.from_mapping(rad)
        self.params = Params.load(self.radiomics.params)
        self.bc_options = BcOptions.parse(options.body_composition)
        self.bc = create_bc(options.body_composition)
        self.deep = DeepOptions.from_mapping({"attention": False, **options.deep})
        dp = dict(options.dual_phase)
        if options.label:
            dp.setdefault("label", options.label)
        self.dp_options = DualPhaseOptions.from_mapping(dp)
        self.dp = create_dp(dp)
        self.reader_levels = {k: LevelOverride.from_mapping(v, f"reader level of {k}")
                              for k, v in options.reader_levels.items()}
        self.weights: dict[int, Path] = {}
        for dims in self.deep.dims:
            key = self.deep.model_2d if dims == 2 else self.deep.model_3d
            if key in self.models:
                if not self.models[key].is_file():
                    raise ValueError(f"deep weights models.{key}: {self.models[key]} is not a file")
                self.weights[dims] = self.models[key]
        self.weights_sha256 = {d: sha256_of(p) for d, p in self.weights.items()}
        self._embedders: dict[int, Any] = {}
        self.hash = hashlib.sha256(json.dumps(self.describe(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f in ORDER if not self.options.families or f in self.options.families)

    def describe(self) -> dict[str, Any]:
        """Everything that changes a row's numbers (hashed into ``param_hash``)."""
        from pipelines.body_composition.pipeline import VERSION as BC_VERSION
        from pipelines.deep.pipeline import VERSION as DEEP_VERSION
        from pipelines.dualphase.pipeline import VERSION as DP_VERSION
        from pipelines.radiomics.pipeline import VERSION as RAD_VERSION

        bc = {k: v for k, v in asdict(self.bc_options).items() if k != "level_override"}
        return {
            "families": list(self.options.families) or "all that apply",
            "body-composition": {"version": BC_VERSION, **bc,
                                 "model": str(self.models.get(self.bc_options.model, ""))},
            "radiomics": {"version": RAD_VERSION, **asdict(self.radiomics), "params_sha256": self.params.sha256},
            "deep": {"version": DEEP_VERSION, **asdict(self.deep),
                     "weights_sha256": {str(d): h for d, h in self.weights_sha256.items()}},
            "dual-phase": {"version": DP_VERSION, **asdict(self.dp_options)},
        }

    def hash_for(self, study: str) -> str:
        """The parameter hash of one study's row (the cohort's, plus its reader-confirmed level)."""
        override = self.reader_levels.get(study)
        if override is None:
            return self.hash
        level = {k: v for k, v in override.as_json().items() if k != "time"}
        return hashlib.sha256((self.hash + json.dumps(level, sort_keys=True)).encode()).hexdigest()[:16]

    def embedder(self, dims: int) -> Any:
        """``DeepEmbed`` with the pretrained encoder for ``dims`` (torch imported here, once)."""
        if dims not in self._embedders:
            from pipelines.deep.encoders import build, load_weights
            from pipelines.deep.features import DeepEmbed

            net = build(self.deep.arch, dims)
            load_weights(net, self.weights[dims])
            self._embedders[dims] = DeepEmbed(net, self.deep.arch, self.options.device, attention=False)
        return self._embedders[dims]


@dataclass
class StudyState:
    """What the families of one study share: loaded volumes, the tumour, the muscles at the level."""

    study: StudyFolder
    volumes: dict[str, Volume] = field(default_factory=dict)
    tumour: tuple[Volume, Any] | None = None
    tumour_error: Exception | None = None
    muscles: tuple[Volume, dict[str, NDArray[np.bool_]]] | None = None
    muscles_note: str = ""

    def volume(self, ct: CtSeries) -> Volume:
        uid = ct.series.series_uid
        if uid not in self.volumes:
            self.volumes[uid] = SeriesToVolume().run(list(ct.series.files))
        return self.volumes[uid]

    def load_tumour(self, label: str) -> tuple[Volume, Any]:
        """The tumour ROI on the CT series it maps onto (the portal phase first in a dual-phase study)."""
        from pipelines.radiomics.pipeline import load_roi

        if self.tumour is not None:
            return self.tumour
        if self.tumour_error is not None:
            raise self.tumour_error
        order = list(self.study.ct)
        pv = self.study.phase("portal")
        if pv is not None:
            order.sort(key=lambda s: s is not pv)
        errors: list[str] = []
        try:
            if not self.study.rois:
                raise NotEvaluable("no SEG or RTSTRUCT ROI in the study folder", stage="roi-to-mask")
            for ct in order:
                volume = self.volume(ct)
                try:
                    self.tumour = (volume, load_roi(volume, self.study.rois, label))
                    return self.tumour
                except StageError as e:
                    errors.append(e.reason)
            raise StageError("roi-to-mask", "", "the ROI maps onto no CT series of the study: " + "; ".join(errors))
        except (StageError, NotEvaluable) as e:
            self.tumour_error = e
            raise


def applies(family: str, study: StudyFolder) -> str:
    """Why ``family`` does not apply to ``study`` ("" when it does)."""
    if not study.ct:
        return "no CT series in the study folder"
    if family in ("radiomics", "dual-phase") and not study.rois:
        return "no SEG or RTSTRUCT ROI in the study folder"
    if family == "dual-phase" and not study.dual_phase:
        phases = ", ".join(f"{s.description or '?'} ({s.phase or 'phase not named'})" for s in study.ct)
        return f"not one arterial and one portal-venous CT series ({phases})"
    return ""


# Families -----------------------------------------------------------------------------------
def _value(v: Any) -> float | str:
    return float(v.value) if v.value is not None else ""


def body_composition(state: StudyState, plan: Plan) -> dict[str, Any]:
    """QC gate, level finder, tissue segmenter and measurements of the body-composition pipeline."""
    from pipelines.body_composition.pipeline import NAME, VERSION, default_identity
    from pipelines.body_composition.reader_level import level_from_override
    from pipelines.body_composition.reference import patient_factors
    from pipelines.body_composition.stages import LevelFinder, MeasureInput, SegmentInput, TissueSegmenter

    ct = state.study.body_series()
    assert ct is not None
    volume = state.volume(ct)
    override = plan.reader_levels.get(state.study.name)
    row: dict[str, Any] = {"bc_pipeline": NAME, "bc_pipeline_version": VERSION, "bc_series_uid": volume.series_uid,
                           "bc_level_source": "reader-confirmed" if override else "automatic",
                           "bc_reader": override.reader if override else ""}
    qc = plan.bc.qc.run(volume)
    if not qc.evaluable:
        raise NotEvaluable(qc.reason, "qc-gate")
    ctx = PipelineContext(series=(ct.series,), work_dir=Path(tempfile.gettempdir()), identity=default_identity(),
                          models=plan.models, device=plan.options.device)
    backend = plan.bc.backend(ctx)
    row.update({"bc_model": backend.name, "bc_model_version": backend.model_version})
    canon, _ = volume.canonical_axial()
    level = LevelFinder(backend, plan.bc_options.levels).run(canon)
    if override is not None:
        level = level_from_override(canon, override, level)
    if level.level is None or level.slice_index is None:
        raise NotEvaluable("; ".join(level.notes) or "level not found", "level-finder")
    names_kept = override is None or any(v.name for v in level.vertebrae)
    seg = TissueSegmenter(backend, plan.bc_options.volumes_3d and names_kept).run(SegmentInput(canon, level))
    meas = plan.bc.measure.run(MeasureInput(canon, seg, patient_factors(canon.first_dataset)))
    k = level.slice_index
    row.update({"bc_level": meas.level, "bc_level_confidence": level.confidence,
                "bc_level_sop_instance_uid": str(canon.slices[k].dataset.get("SOPInstanceUID", "")),
                "bc_cutoff_table_version": meas.table_version})
    for key, v in meas.areas.items():
        row[f"bc_{key}_area_cm2"] = _value(v)
    for key, v in meas.mean_hu.items():
        row[f"bc_{key}_hu"] = _value(v)
    for key, v in meas.volumes.items():
        row[f"bc_{key}_volume_cm3"] = _value(v)
    for key, v in meas.volume_mean_hu.items():
        row[f"bc_{key}_volume_hu"] = _value(v)
    for key, v in meas.derived.items():
        row[f"bc_{key}"] = _value(v)
    for cid, s in meas.sarcopenia.items():
        row[f"bc_sarcopenia_{cid}"] = "" if "sarcopenic" not in s else int(bool(s["sarcopenic"]))
    failed = meas.gates.get("failed") or {}
    if failed:
        row["bc_plausibility_failed"] = json.dumps(failed, default=str)
    masks = {name: seg.slice_seg.masks[name] for name in MUSCLE_ROIS
             if name in seg.slice_seg.masks and meas.areas.get(name) is not None and meas.areas[name].value is not None}
    if masks:
        full: dict[str, NDArray[np.bool_]] = {}
        for name, m in masks.items():
            mask3: NDArray[np.bool_] = np.zeros(canon.shape, bool)
            mask3[k] = m
            full[name] = mask3
        state.muscles = (canon, full)
    else:
        state.muscles_note = f"no named lumbar muscle measured at {meas.level}"
    return row


def radiomics(state: StudyState, plan: Plan) -> dict[str, Any]:
    """Intratumoral and 3/6/9 mm ring features (``pipelines.radiomics.pipeline.extract``)."""
    from pipelines.radiomics.pipeline import NAME, VERSION, check_volume, extract

    volume, roi = state.load_tumour(plan.radiomics.label)
    row: dict[str, Any] = {"rad_pipeline": NAME, "rad_pipeline_version": VERSION, "rad_params": plan.params.name,
                           "rad_params_sha256": plan.params.sha256, "rad_series_uid": volume.series_uid,
                           "rad_roi_label": roi.label, "rad_roi_source": roi.source_kind,
                           "rad_roi_volume_mm3": float(roi.volume_mm3)}
    check_volume(volume)
    row.update(extract(volume, roi, plan.radiomics).features)
    return row


def dual_phase(state: StudyState, plan: Plan) -> dict[str, Any]:
    """The dual-phase pipeline on the study's arterial and portal-venous series."""
    from pipelines.body_composition.pipeline import default_identity
    from pipelines.dualphase.pipeline import NAME, VERSION

    art, pv = state.study.phase("arterial"), state.study.phase("portal")
    assert art is not None and pv is not None
    o = plan.dp_options
    row: dict[str, Any] = {"dp_pipeline": NAME, "dp_pipeline_version": VERSION,
                           "dp_params_sha256": plan.params.sha256 if o.params == plan.radiomics.params else "",
                           "dp_arterial_series_uid": art.series.series_uid, "dp_portal_series_uid": pv.series.series_uid}
    with tempfile.TemporaryDirectory(prefix="prognode-dp-") as work:
        ctx = PipelineContext(series=(replace(art.series, role=o.arterial_role), replace(pv.series, role=o.portal_role)),
                              work_dir=Path(work), identity=default_identity(), extra_files=state.study.rois,
                              device=plan.options.device)
        out = plan.dp.run(ctx)
    if not out.evaluable:
        raise NotEvaluable(out.reason, "dual-phase")
    s = out.summary
    row.update({"dp_params_sha256": s.get("params_sha256", ""), "dp_reference_phase": s.get("reference_phase", "")})
    row.update(s["features"])
    return row


def deep(state: StudyState, plan: Plan) -> dict[str, Any]:
    """Encoder embeddings of the tumour and the named muscles, 2D and 3D (``RoiCrop`` + ``DeepEmbed``)."""
    from pipelines.deep.crop import RoiCrop
    from pipelines.deep.pipeline import NAME, VERSION

    o = plan.deep
    row: dict[str, Any] = {"deep_pipeline": NAME, "deep_pipeline_version": VERSION, "deep_model": o.arch}
    if not plan.weights:
        row["deep_weights"] = NO_WEIGHTS
        return row
    row["deep_weights"] = "; ".join(f"{d}d: {plan.weights[d].name} sha256 {plan.weights_sha256[d]}"
                                    for d in sorted(plan.weights))
    missing = [d for d in o.dims if d not in plan.weights]
    if missing:
        row["deep_weights"] += "; " + "; ".join(f"{d}d: {NO_WEIGHTS}" for d in missing)
    rois: list[tuple[str, Volume, NDArray[np.bool_]]] = []
    notes: list[str] = []
    try:
        volume, roi = state.load_tumour(o.label or plan.options.label)
        rois.append(("tumour", volume, roi.mask))
    except (StageError, NotEvaluable) as e:
        notes.append(f"tumour: {getattr(e, 'reason', str(e))}")
    if state.muscles is not None:
        canon, masks = state.muscles
        rois.extend((name, canon, m) for name, m in masks.items())
    else:
        notes.append(f"muscles: {state.muscles_note or 'body composition not run or not evaluable'}")
    row["deep_rois"] = ",".join(name for name, _, _ in rois)
    if notes:
        row["deep_notes"] = "; ".join(notes)
    if not rois:
        raise NotEvaluable("; ".join(notes), "deep-roi")
    for dims in sorted(plan.weights):
        crop = RoiCrop(dims, o.size_2d if dims == 2 else o.size_3d, o.crop_mm, o.window)
        embed = plan.embedder(dims)
        for name, volume, mask in rois:
            vector = embed.run(crop.run(volume, mask).array).vector
            row.update({f"deep{dims}d_{name}_{i:03d}": float(v) for i, v in enumerate(vector)})
    return row


RUN = {"body-composition": body_composition, "radiomics": radiomics, "dual-phase": dual_phase, "deep": deep}


def extract_study(folder: StudyFolder, plan: Plan) -> dict[str, Any]:
    """One row: identifiers, ``param_hash``, ``families`` (those run), ``error``, then each family.

    Never raises for a study's own problems: a family that fails puts ``family: stage: reason``
    in ``error`` (the row is retried on the next run), one that is not evaluable fills
    ``<prefix>_not_evaluable`` (a result, kept).  A family named in ``--families`` that does not
    apply is an error; without ``--families``, it is simply not run.
    """
    state = StudyState(folder)
    row: dict[str, Any] = {"study": folder.name, "study_uid": folder.ct[0].series.study_uid if folder.ct else "",
                           "param_hash": plan.hash_for(folder.name)}
    ran: list[str] = []
    errors: list[str] = [] if folder.ct else ["study: no CT series in the study folder"]
    for family in plan.families if folder.ct else ():
        why_not = applies(family, folder)
        if why_not:
            if plan.options.families:
                errors.append(f"{family}: {why_not}")
            continue
        ran.append(family)
        try:
            row.update(RUN[family](state, plan))
        except NotEvaluable as e:
            row[f"{PREFIX[family]}_not_evaluable"] = f"{e.stage}: {e.reason}" if e.stage else e.reason
        except Exception as e:  # a failing study never stops the cohort
            stage = getattr(e, "stage", "") or type(e).__name__
            reason = getattr(e, "reason", "") or str(e)
            log.warning("study %s, %s failed: %s: %s", folder.name, family, stage, reason, exc_info=log.isEnabledFor(10))
            errors.append(f"{family}: {stage}: {reason}")
    row["families"] = ",".join(ran)
    row["error"] = "; ".join(errors)
    return row
