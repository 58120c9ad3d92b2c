"""``tissue-hu``: the first, model-free pipeline (CPU, seconds).

Stages (each typed, config in ``__init__``, pure ``run``):

1. :class:`pipelines.common.volume.SeriesToVolume`: files -> HU volume with geometry.
2. :class:`BodyMask`: per slice, the largest connected region above ``body_threshold_hu``
   (after a small in-plane erosion that cuts the table off, then grown back inside the
   threshold), holes filled.
3. :class:`TissueMasks`: adipose (-190..-30 HU) and soft tissue (-29..150 HU) inside the body
   on every slice.
4. :class:`TissueMeasurements`: volume (mL) and mean HU of each segment; slab thickness per
   slice from the slice positions (exact for tilted and unevenly spaced stacks).
5. :class:`TissueOutputs`: a BINARY SEG with both segments and a TID 1500 SR with one group
   per segment: the segment's volume and mean HU over the series, drawn as the outline (holes
   cut out) of its largest region on its largest slice, with that region's area; OHIF lists
   the groups and shows the outlined region's own statistics.  SEG-referencing volume groups
   (which OHIF cannot show) go, when ``volume_sr`` is on, into a second SR.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from pipelines import registry
from pipelines.base import (
    Identity,
    NotEvaluable,
    PipelineContext,
    PipelineOutput,
    Predecessor,
    StageError,
)
from pipelines.common.options import parse_options
from pipelines.common.volume import SeriesToVolume, Volume

log = logging.getLogger(__name__)

NAME = "tissue-hu"
VERSION = registry.version(NAME)  # the one place: pipelines/registry.py
SEGMENTS = ("adipose-tissue", "soft-tissue")


# ------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class TissueHuOptions:
    """Config ``[pipelines.tissue-hu]``; every default lives here."""

    body_threshold_hu: float = -500.0
    adipose_min_hu: float = -190.0
    adipose_max_hu: float = -30.0
    soft_min_hu: float = -29.0
    soft_max_hu: float = 150.0
    table_erosion_mm: float = 4.0  # in-plane erosion that detaches the table before the largest region is kept
    min_body_area_mm2: float = 100.0  # smaller body regions on a slice are ignored
    volume_sr: bool = False  # also write a second SR with SEG-referencing volume groups (not OHIF-visible)
    seg_series_description: str = "Tissue HU segmentation"
    sr_series_description: str = "Tissue HU measurements"

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> TissueHuOptions:
        prefix = f"pipelines.{NAME}"
        opts = parse_options(cls, options, NAME)  # unknown keys, types, finite numbers
        for key in ("seg_series_description", "sr_series_description"):
            text = getattr(opts, key)
            if not text.strip() or len(text) > 64:
                raise ValueError(f"{prefix}.{key}: expected a text of 1-64 characters, got {text!r}")
        if not opts.adipose_min_hu < opts.adipose_max_hu:
            raise ValueError(f"{prefix}.adipose_min_hu: must be below adipose_max_hu")
        if not opts.soft_min_hu < opts.soft_max_hu:
            raise ValueError(f"{prefix}.soft_min_hu: must be below soft_max_hu")
        if opts.soft_min_hu <= opts.adipose_max_hu and opts.soft_max_hu >= opts.adipose_min_hu:
            raise ValueError(f"{prefix}.soft_min_hu: the soft tissue window overlaps the adipose window")
        if opts.table_erosion_mm < 0 or opts.table_erosion_mm > 20:
            raise ValueError(f"{prefix}.table_erosion_mm: must be within 0..20 mm")
        if opts.min_body_area_mm2 < 0:
            raise ValueError(f"{prefix}.min_body_area_mm2: must not be negative")
        return opts


# ------------------------------------------------------------------------------------------
# Stages

_INPLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_INPLANE_8[1] = True  # 8-connectivity within a slice, none across slices
_INPLANE_4 = np.zeros((3, 3, 3), dtype=bool)
_INPLANE_4[1, 1, :] = True
_INPLANE_4[1, :, 1] = True


def _largest_per_slice(labels: NDArray[np.int32], n: int, min_voxels: int) -> NDArray[np.bool_]:
    """Keep, on each slice, the largest labelled region (labels never span slices)."""
    if n == 0:
        return np.zeros(labels.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    # ndimage.label numbers regions in scan order and no region spans slices, so the labels
    # of slice k are the block (max label of slices < k, max label of slice k]
    last = np.maximum.accumulate(labels.reshape(labels.shape[0], -1).max(axis=1))
    label_slice = np.searchsorted(last, np.arange(n + 1), side="left").astype(np.int64)
    best = np.zeros(labels.shape[0], dtype=np.int64)
    best_size = np.zeros(labels.shape[0], dtype=np.int64)
    order = np.argsort(sizes)  # ascending: the last write per slice wins
    best[label_slice[order]] = order
    best_size[label_slice[order]] = sizes[order]
    keep = np.zeros(n + 1, dtype=bool)
    keep[best[(best > 0) & (best_size >= max(min_voxels, 1))]] = True
    keep[0] = False
    return np.asarray(keep[labels])


_REPLICATE = {2: (np.uint16, 0x0101), 4: (np.uint32, 0x01010101)}


def _upsample(a: NDArray[np.uint8], f: int) -> NDArray[np.uint8]:
    """Nearest-neighbour in-plane upsampling of a (z, r, c) uint8 array by 1, 2 or 4 (fast path:
    one multiply replicates each byte along the row, then rows are stacked)."""
    if f == 1:
        return a
    z, r, c = a.shape
    wide, factor = _REPLICATE[f]
    cols = (np.ascontiguousarray(a).astype(wide) * factor).view(np.uint8).reshape(z, r, f * c)
    return np.stack([cols] * f, axis=2).reshape(z, f * r, f * c)


def _pool_any(a: NDArray[np.bool_], f: int) -> NDArray[np.bool_]:
    """(z, r, c) -> (z, r/f, c/f): a block is True when any of its pixels is (r, c multiples of f)."""
    if f == 1:
        return a
    z, r, c = a.shape
    if f in _REPLICATE:
        # the f bytes of a block's row read as one integer: non-zero when any of them is True
        wide = _REPLICATE[f][0]
        rowwise = np.ascontiguousarray(a).view(np.uint8).reshape(z, r, c // f, f).view(wide)[..., 0] != 0
    else:
        rowwise = a.reshape(z, r, c // f, f).any(axis=3)
    return np.asarray(rowwise.reshape(z, r // f, f, c // f).any(axis=2))


@dataclass(frozen=True)
class BodyMaskResult:
    body: NDArray[np.bool_]


class BodyMask:
    """Stage: HU volume -> body mask (largest region per slice, table removed, holes filled)."""

    name = "body-mask"

    def __init__(
        self, threshold_hu: float, table_erosion_mm: float, min_area_mm2: float, block_mm: float = 4.0
    ) -> None:
        self.threshold_hu = threshold_hu
        self.block_mm = block_mm  # region finding works on blocks of about this size (1, 2 or 4 pixels)
        self.table_erosion_mm = table_erosion_mm
        self.min_area_mm2 = min_area_mm2

    def run(self, volume: Volume) -> BodyMaskResult:
        """Works on blocks of 1, 2 or 4 pixels square, at most ``block_mm`` wide (a block is
        "above" when any of its pixels is) for speed, then
        returns to full resolution: a pixel is body when its block is in the filled body and
        the pixel itself is above the threshold or its block lies in or next to a filled hole."""
        from scipy import ndimage

        z, rows, cols = volume.shape
        above = volume.hu > self.threshold_hu
        px = min(volume.pixel_spacing)
        f = 4 if px * 4 <= self.block_mm else 2 if px * 2 <= self.block_mm else 1
        pad_r, pad_c = (-rows) % f, (-cols) % f
        padded = np.pad(above, ((0, 0), (0, pad_r), (0, pad_c))) if (pad_r or pad_c) else above
        blocks = _pool_any(padded, f)
        block_mm = f * px
        iterations = int(round(self.table_erosion_mm / block_mm)) if block_mm > 0 else 0
        core = (
            ndimage.binary_erosion(blocks, _INPLANE_4, iterations=iterations, border_value=1) if iterations else blocks
        )  # border_value=1: a body cut off at the field of view's edge is not eroded from there
        labels, n = ndimage.label(core, structure=_INPLANE_8)
        min_blocks = int(self.min_area_mm2 / (f * f * volume.pixel_area_mm2))
        kept = _largest_per_slice(labels, n, min_blocks)
        if iterations:
            # grow back to the threshold boundary, only from the kept region (table stays cut off)
            kept = ndimage.binary_dilation(kept, _INPLANE_4, iterations=iterations + 1, mask=blocks)
        # fill holes per slice: background regions that do not touch the slice's edge
        bg_labels, n_bg = ndimage.label(~kept, structure=_INPLANE_4)
        is_edge = np.zeros(n_bg + 1, dtype=bool)
        for edge in (bg_labels[:, 0, :], bg_labels[:, -1, :], bg_labels[:, :, 0], bg_labels[:, :, -1]):
            is_edge[edge.ravel()] = True
        is_edge[0] = False
        filled = ~is_edge[bg_labels]
        # back to full resolution: 2 = block in a filled hole or touching one (its pixels below
        # the threshold belong to the hole, not to the outside), 1 = other block of the body
        holes = filled & ~kept
        inner = ndimage.binary_dilation(holes, _INPLANE_8) & filled if f > 1 else holes
        code = _upsample(filled.view(np.uint8) + inner.view(np.uint8), f)[:, :rows, :cols]
        body = (code == 2) | ((code == 1) & above)
        return BodyMaskResult(body=np.ascontiguousarray(body))


@dataclass(frozen=True)
class TissueMasksResult:
    masks: dict[str, NDArray[np.bool_]]  # segment key -> (slices, rows, columns)


class TissueMasks:
    """Stage: HU volume + body -> adipose and soft-tissue masks inside the body."""

    name = "tissue-masks"

    def __init__(self, adipose: tuple[float, float], soft: tuple[float, float]) -> None:
        self.adipose = adipose
        self.soft = soft

    def run(self, volume: Volume, body: NDArray[np.bool_]) -> TissueMasksResult:
        hu = volume.hu
        adipose = (hu >= self.adipose[0]) & (hu <= self.adipose[1]) & body
        soft = (hu >= self.soft[0]) & (hu <= self.soft[1]) & body
        return TissueMasksResult(masks={"adipose-tissue": adipose, "soft-tissue": soft})


@dataclass(frozen=True)
class SegmentStats:
    key: str
    voxels: int
    volume_ml: float
    mean_hu: float
    best_slice: int  # slice (volume order) with the largest area
    best_slice_area_mm2: float


class TissueMeasurements:
    """Stage: masks -> volume (mL) and mean HU per segment, plus the slice of largest area."""

    name = "measurements"

    def run(self, volume: Volume, masks: Mapping[str, NDArray[np.bool_]]) -> dict[str, SegmentStats]:
        pos = volume.positions
        if len(pos) > 1:
            edges = np.concatenate([[pos[0] - (pos[1] - pos[0]) / 2], (pos[1:] + pos[:-1]) / 2, [pos[-1] + (pos[-1] - pos[-2]) / 2]])
            slab = np.diff(edges)
        else:
            slab = np.array([volume.slice_thickness or volume.slice_spacing])
        if volume.slice_thickness:
            # slices with gaps between them: count only the imaged slab of each slice
            slab = np.minimum(slab, volume.slice_thickness)
        out = {}
        for key, m in masks.items():
            per_slice = m.reshape(m.shape[0], -1).sum(axis=1)
            voxels = int(per_slice.sum())
            volume_ml = float((per_slice * slab).sum() * volume.pixel_area_mm2 / 1000.0)
            mean_hu = float(volume.hu[m].mean(dtype=np.float64)) if voxels else float("nan")
            best = int(np.argmax(per_slice))
            out[key] = SegmentStats(
                key=key,
                voxels=voxels,
                volume_ml=volume_ml,
                mean_hu=mean_hu,
                best_slice=best,
                best_slice_area_mm2=float(per_slice[best] * volume.pixel_area_mm2),
            )
        return out


# ------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class PlaneRef:
    dataset: Dataset
    frame_number: int | None  # 1-based frame for multi-frame sources


def _plane(volume: Volume, k: int) -> PlaneRef:
    s = volume.slices[k]
    return PlaneRef(s.dataset, None if s.frame is None else s.frame + 1)


def source_order(volume: Volume) -> tuple[list[Dataset], NDArray[np.int64]]:
    """Source images for the SEG and, per SEG plane, the volume slice it holds."""
    if all(s.frame is None for s in volume.slices):
        return [s.dataset for s in volume.slices], np.arange(len(volume.slices))
    datasets = {id(s.dataset) for s in volume.slices}
    if len(datasets) != 1:
        raise ValueError("a multi-frame series must be one instance for the SEG")
    n_frames = int(volume.slices[0].dataset.NumberOfFrames)
    index = np.full(n_frames, -1, dtype=np.int64)
    for k, s in enumerate(volume.slices):
        index[int(s.frame)] = k  # type: ignore[arg-type]
    if np.any(index < 0):
        raise ValueError("some frames of the multi-frame source are not in the volume")
    return [volume.slices[0].dataset], index


class TissueOutputs:
    """Stage: masks and measurements -> SEG (+ SR, + optional volume SR) files in ``work_dir``."""

    name = "dicom-outputs"

    def __init__(self, options: TissueHuOptions, identity: Identity) -> None:
        self.options = options
        self.identity = identity

    def algorithm(self) -> Any:
        from dicom_templates.common import Algorithm

        o = self.options
        return Algorithm(
            name=NAME,
            version=VERSION,
            family="family-histogram",
            parameters={
                "body_threshold_hu": f"{o.body_threshold_hu:g}",
                "adipose_hu": f"{o.adipose_min_hu:g}..{o.adipose_max_hu:g}",
                "soft_tissue_hu": f"{o.soft_min_hu:g}..{o.soft_max_hu:g}",
            },
        )

    def run(
        self,
        volume: Volume,
        masks: Mapping[str, NDArray[np.bool_]],
        stats: Mapping[str, SegmentStats],
        work_dir: Path,
        predecessors: Sequence[Predecessor] = (),
    ) -> list[Path]:
        from dicom_templates.geometry import mask_polygon
        from dicom_templates.seg import build_seg
        from dicom_templates.sr import (
            Measurement,
            PlanarGroup,
            VolumeGroup,
            build_measurement_report,
            polygon_area_mm2,
        )

        algorithm = self.algorithm()
        sources, index = source_order(volume)
        identity_order = bool(np.array_equal(index, np.arange(len(volume.slices))))  # no copy of the masks
        seg = build_seg(
            sources,
            {k: masks[k] if identity_order else masks[k][index] for k in SEGMENTS},
            algorithm,
            self.identity,
            self.options.seg_series_description,
        )
        groups = []
        evidence: dict[str, Dataset] = {}
        for key in SEGMENTS:
            st = stats[key]
            if st.voxels == 0:
                continue
            plane = _plane(volume, st.best_slice)
            evidence[str(plane.dataset.SOPInstanceUID)] = plane.dataset
            # OHIF shows the statistics of the polygon itself, so the polygon traces the
            # segment's largest region on its largest slice with its holes cut out, and the
            # Area NUM is that outlined region's area
            polygon = mask_polygon(masks[key][st.best_slice])
            groups.append(
                PlanarGroup(
                    tracking_id=f"{NAME}/{key}",
                    finding=key,
                    image=plane.dataset,
                    frame_number=plane.frame_number,
                    polygon=polygon,
                    measurements=[
                        Measurement("volume", round(st.volume_ml, 3), "ml"),
                        Measurement("attenuation", round(st.mean_hu, 2), "[hnsf'U]", derivation="mean"),
                        Measurement("area", round(polygon_area_mm2(polygon, plane.dataset), 2), "mm2"),
                    ],
                )
            )
        work_dir.mkdir(parents=True, exist_ok=True)
        seg_path = work_dir / "tissue-hu-seg.dcm"
        sr_path = work_dir / "tissue-hu-sr.dcm"
        seg.save_as(seg_path)
        if groups:
            sr = build_measurement_report(
                list(evidence.values()), groups, algorithm, self.identity, self.options.sr_series_description,
                predecessors=predecessors,
            )
        else:
            sr = build_measurement_report(
                sources, [], algorithm, self.identity, self.options.sr_series_description,
                predecessors=predecessors, not_evaluable_reason="no adipose or soft tissue inside the body",
            )
        sr.save_as(sr_path)
        files = [seg_path, sr_path]
        if self.options.volume_sr and groups:
            vgroups = [
                VolumeGroup(
                    tracking_id=f"{NAME}/{key}/volume",
                    finding=key,
                    segmentation=seg,
                    segment_number=i + 1,
                    measurements=[
                        Measurement("volume", round(stats[key].volume_ml, 3), "ml"),
                        Measurement("attenuation", round(stats[key].mean_hu, 2), "[hnsf'U]", derivation="mean"),
                    ],
                )
                for i, key in enumerate(SEGMENTS)
                if stats[key].voxels
            ]
            vsr = build_measurement_report(
                [*sources, seg], vgroups, algorithm, self.identity,
                f"{self.options.sr_series_description} (volumes)"[:64], allow_scoordless=True,
                instance_number=2,
            )
            vpath = work_dir / "tissue-hu-sr-volumes.dcm"
            vsr.save_as(vpath)
            files.append(vpath)
        return files


# ------------------------------------------------------------------------------------------
# Pipeline


class TissueHuPipeline:
    """Body mask, adipose and soft tissue on every slice; SEG + TID 1500 SR."""

    name = NAME
    version = VERSION

    def __init__(self, options: TissueHuOptions) -> None:
        self.options = options
        self.series_to_volume = SeriesToVolume()
        self.body_mask = BodyMask(options.body_threshold_hu, options.table_erosion_mm, options.min_body_area_mm2)
        self.tissue_masks = TissueMasks(
            (options.adipose_min_hu, options.adipose_max_hu), (options.soft_min_hu, options.soft_max_hu)
        )
        self.measurements = TissueMeasurements()

    def run(self, ctx: PipelineContext) -> PipelineOutput:
        if len(ctx.series) != 1:
            raise StageError("input", "", f"{NAME} takes exactly one series, got {len(ctx.series)}")
        series = ctx.series[0]
        volume = self.series_to_volume.run(series.files)
        return self.run_volume(volume, ctx.work_dir, ctx.identity, ctx.predecessors)

    def run_volume(
        self, volume: Volume, work_dir: Path, identity: Identity, predecessors: Sequence[Predecessor] = ()
    ) -> PipelineOutput:
        uid = volume.series_uid
        outputs = TissueOutputs(self.options, identity)
        try:
            modality = str(volume.first_dataset.get("Modality", ""))
            if modality != "CT":
                raise NotEvaluable(f"modality {modality or 'missing'} is not CT", stage="input")
            body = self.body_mask.run(volume).body
            if not body.any():
                raise NotEvaluable("no body found above the body threshold", stage=self.body_mask.name)
        except NotEvaluable as e:
            return self._not_evaluable(volume, work_dir, identity, predecessors, e.reason, outputs)
        try:
            masks = self.tissue_masks.run(volume, body).masks
            stats = self.measurements.run(volume, masks)
        except (ValueError, MemoryError) as e:
            raise StageError(self.measurements.name, uid, str(e)) from e
        try:
            files = outputs.run(volume, masks, stats, work_dir, predecessors)
        except (ValueError, KeyError, AttributeError) as e:  # highdicom reads source attributes directly
            raise StageError(outputs.name, uid, f"{type(e).__name__}: {e}") from e
        summary = {
            "pipeline": NAME,
            "version": VERSION,
            "series_uid": uid,
            "slices": volume.shape[0],
            "segments": {
                k: {"volume_ml": s.volume_ml, "mean_hu": s.mean_hu if s.voxels else None, "voxels": s.voxels}
                for k, s in stats.items()
            },
        }
        from dicom_templates.codes import TABLE_VERSION

        summary["code_table"] = TABLE_VERSION
        log.info("tissue-hu %s: %s", uid, {k: round(s.volume_ml, 1) for k, s in stats.items()})
        return PipelineOutput(files=tuple(files), summary=summary)

    def _not_evaluable(
        self,
        volume: Volume,
        work_dir: Path,
        identity: Identity,
        predecessors: Sequence[Predecessor],
        reason: str,
        outputs: TissueOutputs,
    ) -> PipelineOutput:
        from dicom_templates.sr import build_measurement_report

        work_dir.mkdir(parents=True, exist_ok=True)
        sources, _ = source_order(volume)
        sr = build_measurement_report(
            sources, [], outputs.algorithm(), identity, self.options.sr_series_description,
            predecessors=predecessors, not_evaluable_reason=reason,
        )
        path = work_dir / "tissue-hu-sr.dcm"
        sr.save_as(path)
        log.info("tissue-hu %s: not evaluable: %s", volume.series_uid, reason)
        return PipelineOutput(
            files=(path,), summary={"pipeline": NAME, "version": VERSION, "series_uid": volume.series_uid},
            evaluable=False, reason=reason,
        )


def warm() -> None:
    """Worker preload hook: pay the one-off costs of a fresh process before the first job
    rather than in it (scipy.ndimage, highdicom and the builders, pydicom's pixel handlers,
    highdicom's standard tables that the SEG constructor consults).  No effect on results."""
    import importlib

    from scipy import ndimage  # noqa: F401

    for module in ("highdicom", "dicom_templates.seg", "dicom_templates.sr", "dicom_templates.geometry",
                   "pydicom.pixels", "pipelines.common.volume"):
        importlib.import_module(module)
    tables = importlib.import_module("highdicom._standard_utils")
    for loader in ("get_module_attribute_map", "get_iod_module_map", "get_sop_class_iod_map"):
        fn = getattr(tables, loader, None)  # private highdicom API: skipped if it moves
        if callable(fn):
            fn()


def create(options: Mapping[str, Any]) -> TissueHuPipeline:
    """Registry factory: ``[pipelines.tissue-hu]`` options -> pipeline (ValueError names bad keys)."""
    return TissueHuPipeline(TissueHuOptions.from_mapping(options))
