"""Pipeline "dual-phase" (study level): arterial and portal-venous CT of one study.

The route requires both series (``[[routes]] level = "study"`` with ``requires`` entries whose
names are the roles, by default ``arterial`` and ``portal``; the node starts the job when
both are complete and passes them in ``ctx.series`` with ``role`` set).  The tumour ROI (SEG
or RTSTRUCT in ``ctx.extra_files``) is mapped onto the phase it references (the *reference*
phase); the other phase is registered onto it (rigid by default, Mattes MI, seconds) and
resampled on the reference grid, so one ROI serves both.  Features: ``art_*`` and ``pv_*``
(intratumoral and rings, pyradiomics), ``fat_*`` (first-order features of adipose tissue,
-190..-30 HU, in the body on the tumour's slices, portal phase), ``enh_*`` (tumour
enhancement between phases) and ``reg_*`` (registration shift and metric, for QC).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipelines import registry
from pipelines.base import NotEvaluable, PipelineContext, PipelineOutput, SeriesInput, StageError
from pipelines.common.options import parse_options
from pipelines.common.volume import SeriesToVolume, Volume
from pipelines.dualphase.registration import PhaseRegistration, RegistrationInput, resample_to_fixed
from pipelines.radiomics.features import BodyMask, ExtractionInput, Params, RadiomicsExtractor
from pipelines.radiomics.pipeline import RadiomicsOptions, check_volume, extract, write_table
from pipelines.roi.geometry import to_sitk
from pipelines.roi.mask import RoiMask, RoiToMask, find_roi_objects

log = logging.getLogger(__name__)

NAME = "dual-phase"
VERSION = registry.version(NAME)  # the one place: pipelines/registry.py
FAT_HU = (-190.0, -30.0)


@dataclass(frozen=True)
class DualPhaseOptions:
    arterial_role: str = "arterial"
    portal_role: str = "portal"
    label: str = ""
    params: str = "ct_v1.yaml"
    rings_mm: tuple[float, ...] = (3.0, 6.0, 9.0)
    registration: str = "rigid"
    registration_iterations: int = 100
    max_shift_mm: float = 30.0  # a larger shift means the phases are not the same anatomy: refuse

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> DualPhaseOptions:
        opts = parse_options(cls, options, NAME)
        PhaseRegistration(opts.registration)
        return opts


def _role(ctx: PipelineContext, role: str) -> SeriesInput:
    for s in ctx.series:
        if s.role == role:
            return s
    raise NotEvaluable(f"no series with role {role!r} (roles: {[s.role for s in ctx.series]})", stage="select-series")


class DualPhase:
    name = NAME
    version = VERSION

    def __init__(self, options: DualPhaseOptions) -> None:
        self.options = options
        Params.load(options.params)

    def _reference(self, volumes: dict[str, Volume], roi_files: list[Any]) -> tuple[str, RoiMask]:
        errors = []
        for role, vol in volumes.items():
            for f in roi_files:
                try:
                    return role, RoiToMask(self.options.label).run(f, vol)
                except StageError as e:
                    errors.append(f"{role}: {e.reason}")
        if not roi_files:
            raise NotEvaluable("no SEG or RTSTRUCT ROI received for the study", stage="roi-to-mask")
        raise StageError("roi-to-mask", next(iter(volumes.values())).series_uid, "; ".join(errors))

    def run(self, ctx: PipelineContext) -> PipelineOutput:
        o = self.options
        try:
            art, pv = _role(ctx, o.arterial_role), _role(ctx, o.portal_role)
            volumes = {"art": SeriesToVolume().run(art.files), "pv": SeriesToVolume().run(pv.files)}
            for v in volumes.values():
                check_volume(v)
            others = [f for s in ctx.series if s.role not in (o.arterial_role, o.portal_role) for f in s.files]
            roi_files = find_roi_objects([*ctx.extra_files, *others])
            ref_key, roi = self._reference({"pv": volumes["pv"], "art": volumes["art"]}, roi_files)
        except NotEvaluable as e:
            return PipelineOutput(files=(), summary={"pipeline": NAME, "reason": e.reason}, evaluable=False, reason=e.reason)
        other_key = "art" if ref_key == "pv" else "pv"
        ref, other = volumes[ref_key], volumes[other_key]
        fixed, moving = to_sitk(ref), to_sitk(other)
        reg = PhaseRegistration(o.registration, o.registration_iterations).run(
            RegistrationInput(fixed, moving, roi.mask, other.series_uid))
        shift = float(np.linalg.norm(reg.translation_mm))
        if shift > o.max_shift_mm:
            reason = f"phases differ by {shift:.1f} mm after registration (limit {o.max_shift_mm:g} mm)"
            return PipelineOutput(files=(), summary={"pipeline": NAME, "reason": reason}, evaluable=False, reason=reason)
        other_on_ref = replace(ref, hu=resample_to_fixed(moving, fixed, reg.transform), series_uid=other.series_uid)

        ropts = RadiomicsOptions(params=o.params, rings_mm=o.rings_mm, write_seg=False, write_sr=False)
        phase_vols = {ref_key: ref, other_key: other_on_ref}
        features: dict[str, float] = {}
        for key in ("art", "pv"):
            features.update(extract(phase_vols[key], roi, ropts, prefix=f"{key}_").features)
        features.update(self._fat(phase_vols["pv"], roi, ropts))
        art_mean, pv_mean = (float(phase_vols[k].hu[roi.mask].mean()) for k in ("art", "pv"))
        features.update({
            "enh_art_minus_pv_hu": art_mean - pv_mean,
            "enh_ratio_art_pv": art_mean / pv_mean if abs(pv_mean) > 1e-6 else float("nan"),
            "reg_shift_x_mm": reg.translation_mm[0], "reg_shift_y_mm": reg.translation_mm[1],
            "reg_shift_z_mm": reg.translation_mm[2], "reg_metric": reg.metric,
        })
        params = Params.load(o.params)
        row: dict[str, Any] = {
            "study_uid": ref.study_uid, "art_series_uid": volumes["art"].series_uid,
            "pv_series_uid": volumes["pv"].series_uid, "reference_phase": ref_key, "roi_label": roi.label,
            "roi_source": roi.source_kind, "params": params.name, "params_sha256": params.sha256, **features,
        }
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        (ctx.work_dir / "features.json").write_text(json.dumps(row, indent=1), encoding="utf-8")
        write_table(ctx.work_dir / "features.csv", row)
        summary = {"pipeline": NAME, "version": VERSION, "reference_phase": ref_key, "params_sha256": params.sha256,
                   "registration_shift_mm": list(reg.translation_mm), "registration_iterations": reg.iterations,
                   "n_features": len(features), "features": features}
        return PipelineOutput(files=(), summary=summary)

    def _fat(self, volume: Volume, roi: RoiMask, opts: RadiomicsOptions) -> dict[str, float]:
        ks = np.nonzero(roi.mask.any(axis=(1, 2)))[0]
        body = BodyMask(opts.body_threshold_hu).run(volume.hu, volume.pixel_area_mm2, range(int(ks.min()), int(ks.max()) + 1))
        fat = np.zeros(volume.shape, bool)
        sl = slice(int(ks.min()), int(ks.max()) + 1)
        fat[sl] = body[sl] & (volume.hu[sl] >= FAT_HU[0]) & (volume.hu[sl] <= FAT_HU[1]) & ~roi.mask[sl]
        if fat.sum() < 10:
            log.warning("too little fat on the tumour slices: no fat features")
            return {"fat_volume_mm3": float(fat.sum()) * volume.voxel_volume_mm3}
        params = Params.load(opts.params)
        first_order = replace(params, data={**params.data, "featureClass": {"firstorder": None}})
        out = RadiomicsExtractor(first_order).run(ExtractionInput(to_sitk(volume), {"fat": fat}, volume.series_uid))
        out["fat_volume_mm3"] = float(fat.sum()) * volume.voxel_volume_mm3
        return out


def create(options: Mapping[str, Any]) -> DualPhase:
    return DualPhase(DualPhaseOptions.from_mapping(options))


__all__ = ["DualPhase", "DualPhaseOptions", "create"]
