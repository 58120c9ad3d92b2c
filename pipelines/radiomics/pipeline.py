"""Pipeline "tumour-radiomics" (study level).

``ctx.series`` holds the CT (the series with role ``ct``, else the first CT series);
``ctx.extra_files`` (and any SEG/RTSTRUCT series of the study) hold the ROI objects.  The
pipeline maps the ROI onto the CT, builds 3/6/9 mm peritumoral rings inside the body
(optionally clipped to an organ segment of the same ROI object), extracts pyradiomics
features (``intra_``, ``ring3_``, ``ring6_``, ``ring9_``), writes them as JSON and CSV in the
work folder, and exports a SEG of the tumour and its rings and a TID 1500 SR of key tumour
measurements naming the parameter file's sha256.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from numpy.typing import NDArray

from pipelines import registry
from pipelines.base import NotEvaluable, PipelineContext, PipelineOutput, SeriesInput, StageError
from pipelines.common.options import parse_options
from pipelines.common.volume import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SeriesToVolume, Volume
from pipelines.radiomics.features import (
    BodyMask,
    ExtractionInput,
    Params,
    PeritumoralRings,
    RadiomicsExtractor,
    RingsInput,
    bbox,
)
from pipelines.roi.geometry import to_sitk
from pipelines.roi.mask import RoiMask, RoiToMask, find_roi_objects

log = logging.getLogger(__name__)

NAME = "tumour-radiomics"
VERSION = registry.version(NAME)  # the one place: pipelines/registry.py


@dataclass(frozen=True)
class RadiomicsOptions:
    params: str = "ct_v1.yaml"
    label: str = ""  # ROI segment label / ROI name; empty: the first
    organ_label: str = ""  # clip rings to this segment/ROI of the same object; empty: no clipping
    rings_mm: tuple[float, ...] = (3.0, 6.0, 9.0)
    rings_mode: str = "cumulative"
    body_threshold_hu: float = -500.0
    shape_on_rings: bool = False
    crop: bool = True
    write_seg: bool = True
    write_sr: bool = True

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], section: str = NAME) -> RadiomicsOptions:
        opts = parse_options(cls, options, section)
        PeritumoralRings(opts.rings_mm, opts.rings_mode)  # validates
        return opts


@dataclass(frozen=True)
class TumourFeatures:
    features: dict[str, float]
    roi: RoiMask
    rings: dict[str, NDArray[np.bool_]]
    params: Params


def is_ct_file(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(ds.get("SOPClassUID", "")) in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)


def pick_ct(series: Sequence[SeriesInput], role: str = "ct") -> SeriesInput:
    for s in series:
        if s.role == role:
            return s
    for s in series:
        if s.files and is_ct_file(s.files[0]):
            return s
    raise NotEvaluable("no CT series in the study", stage="select-series")


def check_volume(volume: Volume) -> None:
    if volume.tilted:
        raise NotEvaluable(f"gantry tilt {volume.tilt_degrees:.1f} degrees: rings in mm need an untilted grid", "qc")
    if not volume.spacing_uniform:
        raise NotEvaluable(f"uneven slice spacing (deviation {volume.max_spacing_deviation:.2f} mm)", "qc")


def load_roi(volume: Volume, roi_files: Sequence[Path], label: str) -> RoiMask:
    """The first ROI object that maps onto ``volume``; errors of all candidates if none does."""
    if not roi_files:
        raise NotEvaluable("no SEG or RTSTRUCT ROI received for the study", stage="roi-to-mask")
    errors = []
    for f in roi_files:
        try:
            return RoiToMask(label=label).run(f, volume)
        except StageError as e:
            errors.append(e.reason)
    raise StageError("roi-to-mask", volume.series_uid, "; ".join(errors))


def extract(volume: Volume, roi: RoiMask, opts: RadiomicsOptions, organ: NDArray[np.bool_] | None = None,
            prefix: str = "") -> TumourFeatures:
    """Rings + pyradiomics for one tumour on one volume (used by the pipeline, cohort and dual-phase)."""
    params = Params.load(opts.params)
    lo, hi = bbox(roi.mask, max(opts.rings_mm), volume.spacing_zyx, extra=1)
    body = BodyMask(opts.body_threshold_hu).run(volume.hu, volume.pixel_area_mm2, range(lo[0], hi[0])) | roi.mask
    rings = PeritumoralRings(opts.rings_mm, opts.rings_mode).run(RingsInput(roi.mask, volume.spacing_zyx, body, organ))
    masks = {f"{prefix}intra": roi.mask, **{f"{prefix}{k}": v for k, v in rings.items() if v.any()}}
    for k, v in rings.items():
        if not v.any():
            log.warning("ring %s is empty (tumour at the body edge?): no features", k)
    features = RadiomicsExtractor(params, shape_on_rings=opts.shape_on_rings, crop=opts.crop).run(
        ExtractionInput(to_sitk(volume), masks, volume.series_uid)
    )
    return TumourFeatures(features, roi, rings, params)


def write_table(path: Path, row: Mapping[str, Any]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        w.writeheader()
        w.writerow(dict(row))


class TumourRadiomics:
    name = NAME
    version = VERSION

    def __init__(self, options: RadiomicsOptions) -> None:
        self.options = options
        Params.load(options.params)  # fail at configuration time

    def run(self, ctx: PipelineContext) -> PipelineOutput:
        opts = self.options
        volume: Volume | None = None
        try:
            ct = pick_ct(ctx.series)
            volume = SeriesToVolume().run(ct.files)
            check_volume(volume)
            others = [f for s in ctx.series if s is not ct for f in s.files]
            roi_files = find_roi_objects([*ctx.extra_files, *others])
            roi = load_roi(volume, roi_files, opts.label)
        except NotEvaluable as e:
            log.info("%s not evaluable: %s", NAME, e.reason)
            written = [self._write_not_evaluable_sr(ctx, volume, e.reason)] if volume is not None and opts.write_sr else []
            return PipelineOutput(files=tuple(written), summary={"pipeline": NAME, "reason": e.reason}, evaluable=False,
                                  reason=e.reason)
        organ = load_roi(volume, roi_files, opts.organ_label).mask if opts.organ_label else None
        result = extract(volume, roi, opts, organ)
        f = result.features
        row: dict[str, Any] = {
            "study_uid": volume.study_uid, "series_uid": volume.series_uid, "roi_label": roi.label,
            "roi_source": roi.source_kind, "roi_sop_instance_uid": roi.source_sop_instance_uid,
            "params": result.params.name, "params_sha256": result.params.sha256, **f,
        }
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        (ctx.work_dir / "features.json").write_text(json.dumps(row, indent=1), encoding="utf-8")
        write_table(ctx.work_dir / "features.csv", row)
        files: list[Path] = []
        if opts.write_seg:
            files.append(self._write_seg(ctx, volume, result))
        if opts.write_sr:
            files.append(self._write_sr(ctx, volume, result))
        summary = {
            "pipeline": NAME, "version": VERSION, "params": result.params.name, "params_sha256": result.params.sha256,
            "roi_label": roi.label, "roi_source": roi.source_kind, "n_features": len(f),
            "tumour_volume_mm3": roi.volume_mm3, "mean_hu": f.get("intra_firstorder_Mean"), "features": f,
        }
        return PipelineOutput(files=tuple(files), summary=summary)

    def _algorithm(self, params: Params) -> Any:
        from dicom_templates.common import Algorithm

        o = self.options
        return Algorithm(name=f"prognode {NAME}", version=VERSION, family="family-histogram", parameters={
            "radiomics_params": params.name, "params_sha256": params.sha256,
            "rings_mm": ",".join(f"{r:g}" for r in o.rings_mm), "rings_mode": o.rings_mode,
        })

    def _write_not_evaluable_sr(self, ctx: PipelineContext, volume: Volume, reason: str) -> Path:
        """A TID 1500 SR saying "not evaluable" and why, on the CT's middle image (OHIF-safe)."""
        from dicom_templates.sr import build_measurement_report
        from pipelines.roi.dicom_out import save, source_images

        sources = source_images(volume)
        sr = build_measurement_report([sources[len(sources) // 2]], [], self._algorithm(Params.load(self.options.params)),
                                      ctx.identity, "Tumour radiomics", not_evaluable_reason=reason)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.work_dir / "tumour_sr_not_evaluable.dcm"
        save(sr, path)
        return path

    def _write_seg(self, ctx: PipelineContext, volume: Volume, result: TumourFeatures) -> Path:
        from pipelines.roi.dicom_out import build_mask_seg, save

        masks = {"tumour": result.roi.mask}
        labels = {"tumour": f"Tumour ({result.roi.label})"[:64]}
        for k, m in result.rings.items():
            key = f"peritumoral-ring-{k[4:]}mm"
            if m.any():
                masks[key] = m
                labels[key] = f"Peritumoral {k[4:]} mm"
        seg = build_mask_seg(volume, masks, ctx.identity, self._algorithm(result.params), "Tumour and peritumoral rings",
                             labels=labels)
        path = ctx.work_dir / "tumour_rings_seg.dcm"
        save(seg, path)
        return path

    def _write_sr(self, ctx: PipelineContext, volume: Volume, result: TumourFeatures) -> Path:
        from pipelines.roi.dicom_out import Measurement, build_tumour_sr, save

        f, mask = result.features, result.roi.mask
        hu = volume.hu[mask]
        k = int(np.argmax(mask.sum(axis=(1, 2))))
        ms = [
            Measurement("volume", float(result.roi.volume_mm3), "mm3"),
            Measurement("area", float(mask[k].sum()) * volume.pixel_area_mm2, "mm2"),
            Measurement("attenuation", float(hu.mean()), "[hnsf'U]", derivation="mean"),
            Measurement("attenuation", float(hu.std()), "[hnsf'U]", derivation="standard-deviation"),
        ]
        if "intra_shape_Maximum3DDiameter" in f:
            ms.append(Measurement("diameter", f["intra_shape_Maximum3DDiameter"], "mm"))
        sr = build_tumour_sr(volume, mask, ms, ctx.identity, self._algorithm(result.params), "Tumour radiomics")
        path = ctx.work_dir / "tumour_sr.dcm"
        save(sr, path)
        return path


def create(options: Mapping[str, Any]) -> TumourRadiomics:
    return TumourRadiomics(RadiomicsOptions.from_mapping(options))
