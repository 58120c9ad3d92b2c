"""Write the pipeline's DICOM objects through ``dicom_templates`` and its summary.

Objects written for an evaluable series:

* ``seg.dcm``: the level slice, all tissues (skeletal muscle, psoas and erector spinae left
  and right, SAT, VAT, IMAT), overlapping segments.
* ``sr.dcm``: TID 1500, one planar group per structure on the level image (closed polygon
  SCOORD; area, mean HU; SMI and sarcopenia on the skeletal muscle group), OHIF-visible.
* ``seg-volumes.dcm`` + ``sr-volumes.dcm``: the named muscles in 3D over L1-L5 and an SR whose
  groups reference those segments (SCOORD-less, so kept out of ``sr.dcm``: OHIF 3.13 blanks an
  SR with one such group).

A series that is not evaluable gets one SR saying so and why.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_templates.common import Algorithm
from dicom_templates.seg import build_seg
from dicom_templates.sr import (
    Measurement,
    PlanarGroup,
    Qualitative,
    Text,
    VolumeGroup,
    build_measurement_report,
)
from pipelines.base import PipelineContext, PipelineOutput, StageError
from pipelines.body_composition.dicom_out import LEVEL_CONCEPTS, TEMPLATE_KEYS, polygon
from pipelines.body_composition.types import (
    NAMED_MUSCLES,
    SEGMENT_LABELS,
    Measurements,
    Segmentation,
)
from pipelines.common.volume import Volume

if TYPE_CHECKING:
    from pipelines.body_composition.pipeline import BodyCompositionPipeline
    from pipelines.body_composition.stages import Backend

log = logging.getLogger(__name__)

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
             ", ".join(missing) or "DeidentificationMethod")
    return out


def _algorithm(pipeline: BodyCompositionPipeline, backend: Backend | None) -> Algorithm:
    name = backend.name if backend is not None else pipeline.options.backend
    return Algorithm(
        name="prognode body-composition", version=pipeline.version,
        family="family-ai" if name == "monai" else "family-histogram",
        parameters={"backend": name,
                    "model": (backend.model_version if backend is not None else "") or "none (weight-free)",
                    "cutoff": f"{pipeline.options.cutoffs[0]} (cut-off table {pipeline.table.version})"})


def _source_per_slice(volume: Volume) -> list[Dataset]:
    if any(s.frame is not None for s in volume.slices):
        raise StageError("seg-writer", volume.series_uid, "multi-frame source images are not supported for SEG/SR")
    return [_with_type2(s.dataset) for s in volume.slices]


def write_not_evaluable(ctx: PipelineContext, volume: Volume, reason: str, pipeline: BodyCompositionPipeline,
                        stage: str, backend: Backend | None = None) -> PipelineOutput:
    algorithm = _algorithm(pipeline, backend)
    evidence = [_with_type2(d) for d in volume.source_datasets()]
    sr = build_measurement_report(evidence, [], algorithm, ctx.identity, "Body composition: not evaluable",
                                  predecessors=ctx.predecessors, not_evaluable_reason=reason,
                                  texts=[Text("backend", algorithm.parameters["backend"])])
    path = ctx.work_dir / "sr.dcm"
    sr.save_as(path)
    log.info("series %s not evaluable at %s: %s", volume.series_uid, stage, reason)
    return PipelineOutput(files=(path,), evaluable=False, reason=reason,
                          summary={"evaluable": False, "stage": stage, "reason": reason,
                                   "backend": algorithm.parameters["backend"], "sr": path.name})


def _level_groups(volume: Volume, seg: Segmentation, meas: Measurements, pipeline: BodyCompositionPipeline,
                  image: Dataset) -> list[PlanarGroup]:
    site = LEVEL_CONCEPTS[meas.level]
    primary = pipeline.options.cutoffs[0]
    groups = []
    for key in meas.areas:
        a, h = meas.areas[key], meas.mean_hu[key]
        if a.value is None or h.value is None:
            continue
        ms = [Measurement("area", round(a.value, 2), "cm2"),
              Measurement("attenuation", round(h.value, 1), "[hnsf'U]", derivation="mean")]
        qual: list[Qualitative] = []
        texts: list[Text] = []
        if key == "skeletal_muscle":
            est = meas.derived.get("l3_muscle_area_estimate")
            if est is not None and est.value is not None:
                ms.append(Measurement("l3-muscle-area-estimate", round(est.value, 2), "cm2"))
            smi = meas.derived["smi"]
            if smi.value is not None:
                ms.append(Measurement("smi", round(smi.value, 2), "cm2/m2"))
            else:
                texts.append(Text("not-evaluable-reason", f"Skeletal muscle index not evaluable: {smi.reason}"))
            for cid, res in meas.sarcopenia.items():
                if "sarcopenic" in res:
                    if cid == primary:
                        qual.append(Qualitative("sarcopenia", "present" if res["sarcopenic"] else "absent"))
                    via = f" via {res['via']}" if res.get("via") else ""
                    texts.append(Text("cutoff-used", f"{cid}{via}: sarcopenia "
                                      f"{'present' if res['sarcopenic'] else 'absent'} (SMI < {res['threshold']} "
                                      f"{res['unit']}); {res['citation']}"))
                else:
                    texts.append(Text("not-evaluable-reason", f"Sarcopenia by {cid} not evaluable: "
                                      f"{res['not_evaluable']}"))
        groups.append(PlanarGroup(
            tracking_id=f"body-composition-{meas.level}-{key}", finding=TEMPLATE_KEYS[key], image=image,
            polygon=polygon(seg.slice_seg.masks[key]), measurements=ms, finding_site=site, qualitative=qual,
            text=texts))
    return groups


def write_results(ctx: PipelineContext, volume: Volume, seg: Segmentation, meas: Measurements,
                  pipeline: BodyCompositionPipeline, backend: Backend) -> PipelineOutput:
    from pipelines.body_composition.pipeline import summary_of

    src = _source_per_slice(volume)
    algorithm = _algorithm(pipeline, backend)
    k = meas.slice_index
    image = src[k]
    files = []
    summary: dict[str, Any] = {"evaluable": True, **summary_of(meas, seg)}

    # SEG of the level slice (segments overlap: skeletal muscle contains the named muscles)
    level_masks = {TEMPLATE_KEYS[key]: seg.slice_seg.masks[key][None] for key in meas.areas
                   if meas.areas[key].evaluable}
    if level_masks:
        seg_level = build_seg([image], level_masks, algorithm, ctx.identity, f"Body composition {meas.level} SEG",
                              labels={TEMPLATE_KEYS[k_]: v for k_, v in SEGMENT_LABELS.items()})
        p = ctx.work_dir / "seg.dcm"
        seg_level.save_as(p)
        files.append(p)
        summary["seg"] = p.name

    # planar SR (OHIF-visible); values that are not evaluable are named with their reason
    not_eval = [f"{SEGMENT_LABELS[key]}: {meas.areas[key].reason}" for key in meas.areas
                if not meas.areas[key].evaluable]
    groups = _level_groups(volume, seg, meas, pipeline, image)
    texts = [Text("backend", f"{algorithm.parameters['backend']}; model {algorithm.parameters['model']}"),
             Text("cutoff-used", algorithm.parameters["cutoff"])]
    texts += [Text("not-evaluable-reason", t) for t in not_eval]
    sr = build_measurement_report([image], groups, algorithm, ctx.identity, f"Body composition {meas.level}",
                                  predecessors=ctx.predecessors, texts=texts,
                                  not_evaluable_reason=None if groups else "; ".join(not_eval) or "nothing measured")
    p = ctx.work_dir / "sr.dcm"
    sr.save_as(p)
    files.append(p)
    summary["sr"] = p.name

    # 3D named muscles over the lumbar spine: their own SEG and a SEG-referencing SR
    vol_keys = [key for key in NAMED_MUSCLES if key in seg.volume_masks and meas.volumes[key].evaluable]
    if vol_keys and seg.volume_range is not None:
        a, b = seg.volume_range
        masks: dict[str, NDArray[np.bool_]] = {TEMPLATE_KEYS[key]: seg.volume_masks[key][a : b + 1]
                                               for key in vol_keys}
        # the 3D objects get their own series numbers (configured SEG/SR numbers + 10)
        ident3d = replace(ctx.identity, seg_series_number=ctx.identity.seg_series_number + 10,
                          sr_series_number=ctx.identity.sr_series_number + 10)
        seg_3d = build_seg(src[a : b + 1], masks, algorithm, ident3d, "Body composition lumbar muscles 3D SEG",
                           labels={TEMPLATE_KEYS[k_]: SEGMENT_LABELS[k_] for k_ in vol_keys})
        p = ctx.work_dir / "seg-volumes.dcm"
        seg_3d.save_as(p)
        files.append(p)
        summary["seg_volumes"] = p.name
        numbers = {str(d.SegmentLabel): int(d.SegmentNumber) for d in seg_3d.SegmentSequence}
        vgroups = []
        for key in vol_keys:
            v, h = meas.volumes[key].value, meas.volume_mean_hu[key].value
            assert v is not None and h is not None
            vgroups.append(VolumeGroup(
                tracking_id=f"body-composition-lumbar-{key}", finding=TEMPLATE_KEYS[key], segmentation=seg_3d,
                segment_number=numbers[SEGMENT_LABELS[key]], finding_site="lumbar-spine",
                reference_source_series=True,
                measurements=[Measurement("volume", round(v, 2), "cm3"),
                              Measurement("attenuation", round(h, 1), "[hnsf'U]", derivation="mean")]))
        # groups name the SEG segment and the source series (TID 1411), so the evidence is the SEG
        # alone rather than every lumbar image: the SR stays a few kB instead of ~0.5 MB
        vsr = build_measurement_report([seg_3d], vgroups, algorithm, ident3d,
                                       "Body composition lumbar muscle volumes", predecessors=ctx.predecessors,
                                       texts=texts[:2], allow_scoordless=True)
        p = ctx.work_dir / "sr-volumes.dcm"
        vsr.save_as(p)
        files.append(p)
        summary["sr_volumes"] = p.name
    return PipelineOutput(files=tuple(files), summary=summary, evaluable=True)
