"""Write the pipeline's DICOM objects through ``dicom_templates`` and its summary.

Objects written for an evaluable series, for the structures actually measured (whatever keys
``Measurements.areas`` holds: at L3 skeletal muscle, iliopsoas and erector spinae with multifidus
left and right, SAT, VAT, IMAT; at C3 e.g. sternocleidomastoids and paravertebral muscles), each
labelled and coded from ``dicom_templates/codes.toml`` (:func:`~.dicom_out.template_key`):

* ``seg.dcm``: the level slice, every evaluable structure, overlapping segments.
* ``sr.dcm``: TID 1500, one planar group per structure on the level image (closed polygon
  SCOORD; area, mean HU; SMI and sarcopenia on the skeletal muscle group), OHIF-visible.  Each
  group has its finding (the structure), finding sites (the structure with its laterality, the
  vertebral level) and a Tracking UID derived from the patient, structure, side and level
  (:func:`dicom_templates.sr.tracking_uid`), so a later study gives the same UID.  A value that
  is not evaluable is a NUM without a number (Numeric Value Qualifier) and a TEXT with the reason.
  The level's provenance (automatic or reader-confirmed, anchors, confidence) is in the report's
  Qualitative Evaluations.
* ``seg-volumes.dcm`` + ``sr-volumes.dcm``: the named muscles in 3D over L1-L5 and an SR with one group per
  muscle: its volume and mean HU, each INFERRED FROM its SEG segment, the volume also from the muscle's outline on
  the level slice, which OHIF 3.13 draws.  Groups without any SCOORD (TID 1411 on the segment alone) made OHIF
  3.13 fail on the whole SR ("Something went wrong").

A series that is not evaluable gets one SR saying so and why.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_templates.common import Algorithm
from dicom_templates.seg import build_seg
from dicom_templates.sr import (
    LevelProvenance,
    Measurement,
    Outline,
    PlanarGroup,
    Qualitative,
    Text,
    VolumeGroup,
    build_measurement_report,
)
from pipelines.base import PipelineContext, PipelineOutput, StageError
from pipelines.body_composition.dicom_out import (
    LEVEL_CONCEPTS,
    label,
    ordered,
    polygon,
    template_key,
    tracking_key,
)
from pipelines.body_composition.types import LevelResult, Measurements, Segmentation, Value
from pipelines.common.gc_pause import gc_paused
from pipelines.common.volume import Volume

if TYPE_CHECKING:
    from pipelines.body_composition.pipeline import BodyCompositionPipeline
    from pipelines.body_composition.reader_level import LevelOverride
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
                        stage: str, backend: Backend | None = None, level: LevelResult | None = None) -> PipelineOutput:
    """One SR saying "not evaluable" and why; with the level finder's result, its anchor votes too."""
    algorithm = _algorithm(pipeline, backend)
    evidence = [_with_type2(d) for d in volume.source_datasets()]
    texts = [Text("backend", algorithm.parameters["backend"])]
    if level is not None:
        prov = level_provenance(level, level.level or "", volume)
        texts += [Text("level-anchor-vote", a) for a in prov.anchors]
        texts += [Text("level-confidence", prov.confidence)] if prov.confidence else []
    sr = build_measurement_report(evidence, [], algorithm, ctx.identity, "Body composition: not evaluable",
                                  predecessors=ctx.predecessors, not_evaluable_reason=reason, texts=texts)
    path = ctx.work_dir / "sr.dcm"
    sr.save_as(path)
    log.info("series %s not evaluable at %s: %s", volume.series_uid, stage, reason)
    return PipelineOutput(files=(path,), evaluable=False, reason=reason,
                          summary={"evaluable": False, "stage": stage, "reason": reason,
                                   "backend": algorithm.parameters["backend"], "sr": path.name})


def level_provenance(level: LevelResult, name: str, volume: Volume,
                     override: LevelOverride | None = None) -> LevelProvenance:
    """The level's provenance for the SR, from what the level finder recorded.

    Each anchor's vote is one sentence (:meth:`Anchor.describe`) naming the images by their Instance Number in
    ``volume`` (the series as stored, whose slice order the level's indices are in; :meth:`Volume.slices_label`).  A reader-confirmed level carries ``reader`` (and ``confirmed_at``).
    Without anchors the method and notes say how the level was found.
    """
    votes = [a.describe(volume.slices_label) for a in level.anchors] or [n for n in level.notes if n]
    confidence = str(getattr(level, "confidence", "") or "")
    if not confidence and level.method:
        confidence = f"method: {level.method}"
    if override is not None:  # a reader-confirmed level: the first note says by whom, when and from where
        return LevelProvenance(level=name, reader_confirmed=True, anchors=votes[1:], confidence=confidence,
                               reader=override.reader, confirmed_at=override.time,
                               provenance=level.notes[0] if level.notes else "")
    return LevelProvenance(level=name, reader_confirmed=False, anchors=votes, confidence=confidence)


def _value(concept: str, v: Value, unit: str, digits: int, derivation: str | None = None) -> Measurement:
    """A NUM of ``v``, or a NUM without a number and with the reason when ``v`` is not evaluable."""
    if v.value is None:
        return Measurement(concept, None, unit, derivation=derivation, reason=v.reason or "not evaluable")
    return Measurement(concept, round(v.value, digits), unit, derivation=derivation)


def _level_groups(seg: Segmentation, meas: Measurements, pipeline: BodyCompositionPipeline,
                  image: Dataset) -> list[PlanarGroup]:
    site = LEVEL_CONCEPTS[meas.level]
    primary = pipeline.options.cutoffs[0]
    groups = []
    for key in ordered(meas.areas):
        a = meas.areas[key]
        mask = seg.slice_seg.masks.get(key)
        if a.value is None or mask is None or not mask.any():
            continue  # not outlined: named with its reason in the report's Qualitative Evaluations
        ms = [_value("area", a, "cm2", 2)]
        h = meas.mean_hu.get(key)
        if h is not None:
            ms.append(_value("attenuation", h, "[hnsf'U]", 1, derivation="mean"))
        qual: list[Qualitative] = []
        texts: list[Text] = []
        if key == "skeletal_muscle":
            est = meas.derived.get("l3_muscle_area_estimate")
            if est is not None:
                ms.append(_value("l3-muscle-area-estimate", est, "cm2", 2))
            smi = meas.derived.get("smi")
            if smi is not None:
                ms.append(_value("smi", smi, "cm2/m2", 2))
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
            tracking_id=f"body-composition-{meas.level}-{key}", finding=template_key(key), image=image,
            polygon=polygon(mask), measurements=ms, finding_site=site, qualitative=qual, text=texts,
            tracking_key=tracking_key(key, meas.level)))
    return groups


def section(mask: NDArray[np.bool_], images: Sequence[Dataset], prefer: int | None = None) -> Outline | None:
    """The outline of a 3D mask (z, y, x) on one slice, ``images[z]`` being slice z's source image: slice ``prefer``
    (the level slice) where the mask has pixels there, else its largest slice; None for an empty mask.  One polygon
    holding all the slice's parts and holes (:func:`~.dicom_out.polygon`)."""
    per = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not per.any():
        return None
    z = prefer if prefer is not None and 0 <= prefer < len(per) and per[prefer] else int(np.argmax(per))
    return Outline(images[z], polygon(mask[z]))


def write_results(ctx: PipelineContext, volume: Volume, seg: Segmentation, meas: Measurements,
                  pipeline: BodyCompositionPipeline, backend: Backend) -> PipelineOutput:
    """SEG, SR and the 3D SEG + SR of an evaluable series (module docstring), written to ``ctx.work_dir``."""
    with gc_paused():  # ~10^5 short-lived datasets: no full collections walking the series meanwhile
        return _write_results(ctx, volume, seg, meas, pipeline, backend)


def _write_results(ctx: PipelineContext, volume: Volume, seg: Segmentation, meas: Measurements,
                   pipeline: BodyCompositionPipeline, backend: Backend) -> PipelineOutput:
    from pipelines.body_composition.pipeline import summary_of

    src = _source_per_slice(volume)
    algorithm = _algorithm(pipeline, backend)
    k = meas.slice_index
    image = src[k]
    files = []
    summary: dict[str, Any] = {"evaluable": True, **summary_of(meas, seg)}
    # a reader-confirmed level: the SR names the reader (Person Observer) and says when and how
    reader = pipeline.override if seg.level.method == "reader" else None
    confirmed = " (reader-confirmed)" if reader is not None else ""

    # SEG of the level slice (segments overlap: skeletal muscle contains the named muscles)
    level_masks = {template_key(key): seg.slice_seg.masks[key][None] for key in ordered(meas.areas)
                   if meas.areas[key].evaluable and key in seg.slice_seg.masks and seg.slice_seg.masks[key].any()}
    if level_masks:
        seg_level = build_seg([image], level_masks, algorithm, ctx.identity,
                              f"Body composition {meas.level} SEG{confirmed}")
        p = ctx.work_dir / "seg.dcm"
        seg_level.save_as(p)
        files.append(p)
        summary["seg"] = p.name

    # planar SR (OHIF-visible); values that are not evaluable are named with their reason
    not_eval = [f"{label(key)}: {meas.areas[key].reason or 'not evaluable'}" for key in ordered(meas.areas)
                if not meas.areas[key].evaluable]
    groups = _level_groups(seg, meas, pipeline, image)
    texts = [Text("backend", f"{algorithm.parameters['backend']}; model {algorithm.parameters['model']}"),
             Text("cutoff-used", algorithm.parameters["cutoff"])]
    texts += [Text("not-evaluable-reason", t) for t in not_eval]
    sr = build_measurement_report([image], groups, algorithm, ctx.identity, f"Body composition {meas.level}{confirmed}",
                                  predecessors=ctx.predecessors, texts=texts,
                                  level=level_provenance(seg.level, meas.level, volume, reader),
                                  not_evaluable_reason=None if groups else "; ".join(not_eval) or "nothing measured")
    p = ctx.work_dir / "sr.dcm"
    sr.save_as(p)
    files.append(p)
    summary["sr"] = p.name

    # 3D named muscles over the lumbar spine: their own SEG and a SEG-referencing SR
    vol_keys = [key for key in ordered(meas.volumes) if key in seg.volume_masks and meas.volumes[key].evaluable]
    if vol_keys and seg.volume_range is not None:
        a, b = seg.volume_range
        masks: dict[str, NDArray[np.bool_]] = {template_key(key): seg.volume_masks[key][a : b + 1]
                                               for key in vol_keys}
        # the 3D objects get their own series numbers (configured SEG/SR numbers + 10)
        ident3d = replace(ctx.identity, seg_series_number=ctx.identity.seg_series_number + 10,
                          sr_series_number=ctx.identity.sr_series_number + 10)
        seg_3d = build_seg(src[a : b + 1], masks, algorithm, ident3d, "Body composition lumbar muscles 3D SEG")
        p = ctx.work_dir / "seg-volumes.dcm"
        seg_3d.save_as(p)
        files.append(p)
        summary["seg_volumes"] = p.name
        numbers = {str(d.SegmentLabel): int(d.SegmentNumber) for d in seg_3d.SegmentSequence}
        vgroups = []
        level_at = k - a if a <= k <= b else None
        for key in vol_keys:
            ms = [_value("volume", meas.volumes[key], "cm3", 2)]
            h3 = meas.volume_mean_hu.get(key)
            if h3 is not None:
                ms.append(_value("attenuation", h3, "[hnsf'U]", 1, derivation="mean"))
            vgroups.append(VolumeGroup(
                tracking_id=f"body-composition-lumbar-{key}", finding=template_key(key), segmentation=seg_3d,
                segment_number=numbers[label(key)], finding_site="lumbar-spine",
                measurements=ms, tracking_key=tracking_key(key, "lumbar-3d"),
                outline=section(masks[template_key(key)], src[a : b + 1], level_at)))
        # the evidence: the SEG and the images the sections are drawn on
        drawn = {id(g.outline.image) for g in vgroups if g.outline is not None}
        # the volumes that are not evaluable are named with their reason (their outline is not the muscle's)
        vtexts = [Text("not-evaluable-reason", f"{label(key)} volume: {meas.volumes[key].reason or 'not evaluable'}")
                  for key in ordered(meas.volumes) if not meas.volumes[key].evaluable]
        vsr = build_measurement_report([seg_3d, *(d for d in src[a : b + 1] if id(d) in drawn)], vgroups, algorithm,
                                       ident3d, "Body composition lumbar muscle volumes",
                                       predecessors=ctx.predecessors, texts=[*texts[:2], *vtexts])
        p = ctx.work_dir / "sr-volumes.dcm"
        vsr.save_as(p)
        files.append(p)
        summary["sr_volumes"] = p.name
    return PipelineOutput(files=tuple(files), summary=summary, evaluable=True)
