"""Write the pipeline's DICOM objects (SEG, planar SR, volume SR) and its summary."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import highdicom as hd
from pydicom.dataset import Dataset

from pipelines.base import PipelineContext, PipelineOutput, StageError
from pipelines.body_composition import dicom_out
from pipelines.body_composition.types import NAMED_MUSCLES, SEGMENT_KEYS, Measurements, Segmentation
from pipelines.common.volume import Volume

if TYPE_CHECKING:
    from pipelines.body_composition.pipeline import BodyCompositionPipeline
    from pipelines.body_composition.stages import Backend

log = logging.getLogger(__name__)


def _algorithm(pipeline: BodyCompositionPipeline, backend: Backend | None) -> dicom_out.AlgorithmInfo:
    return dicom_out.AlgorithmInfo(
        name="prognode body-composition", version=pipeline.version,
        backend=backend.name if backend is not None else pipeline.options.backend,
        model_version=backend.model_version if backend is not None else "",
        cutoff=f"{pipeline.options.cutoffs[0]} (table {pipeline.table.version})")


# Type 2 attributes highdicom copies from the first source image into SEG and SR; some
# scanners and anonymisers leave them out.  They are added, empty, to a copy of that image
# only (the stored source is untouched), so the derived objects stay valid.
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(ds: Dataset) -> Dataset:
    missing = [kw for kw in _TYPE2_COPIED if kw not in ds]
    deid = (str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod")
            and "DeidentificationMethodCodeSequence" not in ds)
    if not missing and not deid:
        return ds
    out = copy.copy(ds)
    for kw in missing:
        setattr(out, kw, "")
    if deid:  # Type 1C when identity was removed; the source says YES but not how
        out.DeidentificationMethod = "not stated in the source images"
    log.info("source image %s lacks %s: written empty in derived objects", ds.get("SOPInstanceUID", "?"),
             ", ".join(missing))
    return out


def _source_per_slice(volume: Volume) -> list[Any]:
    if any(s.frame is not None for s in volume.slices):
        raise StageError("seg-writer", volume.series_uid, "multi-frame source images are not supported for SEG/SR")
    return [_with_type2(s.dataset) for s in volume.slices]


def write_not_evaluable(ctx: PipelineContext, volume: Volume, reason: str, pipeline: BodyCompositionPipeline,
                        stage: str, backend: Backend | None = None) -> PipelineOutput:
    _, concepts = dicom_out.load_codes()
    site = concepts[pipeline.options.levels[0]]
    algorithm = _algorithm(pipeline, backend)
    sr = dicom_out.build_not_evaluable_sr([_with_type2(d) for d in volume.source_datasets()], reason, site, algorithm, ctx.identity,
                                          "Body composition: not evaluable")
    path = ctx.work_dir / "sr.dcm"
    sr.save_as(path)
    log.info("series %s not evaluable at %s: %s", volume.series_uid, stage, reason)
    return PipelineOutput(files=(path,), evaluable=False, reason=reason,
                          summary={"evaluable": False, "stage": stage, "reason": reason,
                                   "backend": algorithm.backend, "sr": path.name})


def write_results(ctx: PipelineContext, volume: Volume, seg: Segmentation, meas: Measurements,
                  pipeline: BodyCompositionPipeline, backend: Backend) -> PipelineOutput:
    from pipelines.body_composition.pipeline import summary_of

    src = _source_per_slice(volume)
    _, concepts = dicom_out.load_codes()
    algorithm = _algorithm(pipeline, backend)
    k = meas.slice_index
    level_code = concepts[meas.level]
    files = []
    summary: dict[str, Any] = {"evaluable": True, **summary_of(meas, seg)}
    # SEG 1: the level slice, all tissues (they overlap: muscle contains the named muscles)
    level_src = [src[k]]
    level_masks = {key: seg.slice_seg.masks[key][None] for key in SEGMENT_KEYS if meas.areas[key].evaluable}
    if any(m.any() for m in level_masks.values()):
        seg_level = dicom_out.build_seg(level_src, level_masks, algorithm, ctx.identity,
                                        f"Body composition {meas.level} SEG")
        p = ctx.work_dir / "seg.dcm"
        seg_level.save_as(p)
        files.append(p)
        summary["seg"] = p.name
    # SEG 2: named muscles in 3D over the lumbar spine (no overlap: written as a label map)
    seg_3d: hd.seg.Segmentation | None = None
    vol_masks = {key: seg.volume_masks[key] for key in NAMED_MUSCLES
                 if key in seg.volume_masks and meas.volumes[key].evaluable}
    if vol_masks:
        seg_3d = dicom_out.build_seg(src, vol_masks, algorithm, ctx.identity,
                                     "Body composition lumbar muscles 3D SEG",
                                     series_number=ctx.identity.seg_series_number + 10)
        p = ctx.work_dir / "seg-volumes.dcm"
        seg_3d.save_as(p)
        files.append(p)
        summary["seg_volumes"] = p.name

    primary = pipeline.options.cutoffs[0]
    items = []
    for key in SEGMENT_KEYS:
        a, h = meas.areas[key], meas.mean_hu[key]
        if not a.evaluable:
            continue
        extra: list[tuple[hd.sr.CodedConcept, float, hd.sr.CodedConcept]] = []
        qual: list[tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]] = []
        comments: list[str] = []
        if key == "skeletal_muscle":
            est = meas.derived.get("l3_muscle_area_estimate")
            if est is not None and est.value is not None:
                extra.append((concepts["l3_area_estimate"], est.value, concepts["cm2"]))
            smi = meas.derived["smi"]
            if smi.value is not None:
                extra.append((concepts["smi"], smi.value, concepts["smi_unit"]))
            else:
                comments.append(f"Skeletal muscle index not evaluable: {smi.reason}")
            for cid, res in meas.sarcopenia.items():
                if "sarcopenic" in res:
                    if cid == primary:
                        qual.append((concepts["sarcopenia"], concepts["present" if res["sarcopenic"] else "absent"]))
                    comments.append(f"Sarcopenia by {cid}: {'present' if res['sarcopenic'] else 'absent'} "
                                    f"(SMI threshold {res['threshold']} {res['unit']}; {res['citation']})")
                else:
                    comments.append(f"Sarcopenia by {cid}: not evaluable: {res['not_evaluable']}")
        items.append(dicom_out.PlanarItem(key=key, mask=seg.slice_seg.masks[key], area_cm2=a.value,
                                          mean_hu=h.value, extra=extra, qualitative=qual, comments=comments))
    not_eval = [f"{key}: {meas.areas[key].reason}" for key in SEGMENT_KEYS if not meas.areas[key].evaluable]
    if items:
        if not_eval:
            items[0] = dicom_out.PlanarItem(**{**items[0].__dict__,
                                               "comments": [*items[0].comments,
                                                            *[f"Not evaluable: {t}" for t in not_eval]]})
        sr = dicom_out.build_planar_sr(src[k], level_code, items, algorithm, ctx.identity,
                                       f"Body composition {meas.level}")
        p = ctx.work_dir / "sr.dcm"
        sr.save_as(p)
        files.append(p)
        summary["sr"] = p.name
    else:
        reason = "; ".join(not_eval) or "no structure measured"
        sr = dicom_out.build_not_evaluable_sr([src[k]], reason, level_code, algorithm, ctx.identity,
                                              "Body composition: not evaluable")
        p = ctx.work_dir / "sr.dcm"
        sr.save_as(p)
        files.append(p)
        summary["sr"] = p.name
    vols = {key: (meas.volumes[key].value, meas.volume_mean_hu[key].value) for key in NAMED_MUSCLES
            if meas.volumes[key].value is not None}
    if vols and seg_3d is not None:
        vsr = dicom_out.build_volume_sr(volume.series_uid, seg_3d, vols,  # type: ignore[arg-type]
                                        concepts["lumbar_spine"], algorithm, ctx.identity,
                                        "Body composition lumbar muscle volumes")
        p = ctx.work_dir / "sr-volumes.dcm"
        vsr.save_as(p)
        files.append(p)
        summary["sr_volumes"] = p.name
    return PipelineOutput(files=tuple(files), summary=summary, evaluable=True)
