"""The ``body-composition`` pipeline: series -> QC -> level -> tissues -> measurements -> SEG + SR.

``create(options)`` builds it from config ``[pipelines.body-composition]``; ``run(ctx)`` is what
the node and ``prognode run`` call; :func:`run_folder` runs it on a folder of DICOM files.
Importing this module imports neither torch nor monai (the MONAI backend loads them lazily).

Options (all optional):

``levels`` (["L3", "C3"]) levels to look for, first found wins; ``backend`` ("classical" or
``"monai"``); ``model`` (name in config ``[models]`` of a model.json written by ``train-seg``);
``max_slice_thickness_mm`` (5.0); ``cutoffs`` (["prado-2008", "martin-2013"]), the first is the
one named in the SR; ``volumes_3d`` (true); ``spine_roll`` (true): lumbar slices and C3 of a patient lying turned
(or a rotated vertebra) are segmented along the spine's own axes (:mod:`pipelines.body_composition.roll`);
``forked_workers`` (true): the 3D muscles in forked processes where the process runs one thread
(:mod:`pipelines.common.forked`), else in threads, with the same masks.

``level_override`` is set per job, not in a config file: a reader-confirmed level and slice
(see :mod:`pipelines.body_composition.reader_level`); the pipeline then measures on exactly that
slice and the SR names the reader (Person Observer) and when.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from pipelines import registry
from pipelines.base import (
    Identity,
    NotEvaluable,
    PipelineContext,
    PipelineOutput,
    SeriesInput,
    StageError,
)
from pipelines.body_composition.reader_level import LevelOverride, level_from_override, level_source
from pipelines.body_composition.reference import load_table, patient_factors
from pipelines.body_composition.roll import RollParams
from pipelines.body_composition.stages import (
    Backend,
    ClassicalBackend,
    LevelFinder,
    Measure,
    MeasureInput,
    QCGate,
    SegmentInput,
    TissueSegmenter,
)
from pipelines.body_composition.types import LevelResult, Measurements, Segmentation, Vertebra
from pipelines.common.options import parse_options
from pipelines.common.volume import Reorient, SeriesToVolume, Volume

log = logging.getLogger(__name__)

NAME = "body-composition"
VERSION = registry.version(NAME)  # the one place: pipelines/registry.py
KNOWN_LEVELS = ("L3", "C3")


@dataclass(frozen=True)
class Options:
    levels: tuple[str, ...] = ("L3", "C3")
    backend: str = "classical"
    model: str = "body-composition"
    max_slice_thickness_mm: float = 5.0
    cutoffs: tuple[str, ...] = ("prado-2008", "martin-2013")
    volumes_3d: bool = True
    spine_roll: bool = True
    forked_workers: bool = True  # the 3D muscles in forked processes where safe (else threads)
    level_override: Mapping[str, Any] | None = None  # per job: a reader-confirmed level (reader_level.py)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> Options:
        opts = parse_options(cls, raw, NAME)  # unknown keys and types
        bad = [lv for lv in opts.levels if lv not in KNOWN_LEVELS]
        if bad or not opts.levels:
            raise ValueError(f"pipelines.{NAME}.levels: {bad or 'empty'}; supported: {KNOWN_LEVELS}")
        if opts.backend not in ("classical", "monai"):
            raise ValueError(f"pipelines.{NAME}.backend: {opts.backend!r}; use 'classical' or 'monai'")
        if opts.max_slice_thickness_mm <= 0:
            raise ValueError(f"pipelines.{NAME}.max_slice_thickness_mm: must be positive")
        if not opts.cutoffs:
            raise ValueError(f"pipelines.{NAME}.cutoffs: at least one cut-off")
        if opts.level_override is not None:
            LevelOverride.from_mapping(opts.level_override, f"pipelines.{NAME}.level_override")
        return opts


def _cpu_time() -> float:
    """CPU seconds of this process (all threads) and of its ended child processes (a stage's forked workers)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


@dataclass
class Timings:
    """Wall seconds per stage, and CPU seconds (all threads, and the stage's child processes) beside them."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    _cpu0: float = field(default_factory=_cpu_time)

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        cpu = _cpu_time()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - t0
        self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + cpu - self._cpu0
        self._cpu0 = cpu
        return now


def _software_version() -> str:
    try:
        return metadata.version("prognode")
    except metadata.PackageNotFoundError:
        return VERSION


def default_identity() -> Identity:
    """Identity for runs outside the node: the host's machine id as device serial number."""
    serial = ""
    for p in (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id")):
        if p.exists():
            serial = p.read_text().strip()[:16]
            break
    return Identity(manufacturer="prognode", software_version=_software_version(),
                    device_serial_number=serial or "unknown-host")


class BodyCompositionPipeline:
    name = NAME
    version = VERSION

    def __init__(self, options: Options) -> None:
        self.options = options
        self.table = load_table()
        self.loader = SeriesToVolume()
        self.qc = QCGate(max_slice_thickness_mm=options.max_slice_thickness_mm)
        self.measure = Measure(self.table, options.cutoffs)
        self.last_timings: dict[str, float] = {}
        self.last_cpu_timings: dict[str, float] = {}
        self.override = (LevelOverride.from_mapping(options.level_override)
                         if options.level_override is not None else None)

    def backend(self, ctx: PipelineContext) -> Backend:
        if self.options.backend == "classical":
            return ClassicalBackend()
        from pipelines.body_composition.monai_backend import MonaiBackend  # torch only here

        path = ctx.models.get(self.options.model)
        if path is None:
            raise StageError("load-model", ctx.series[0].series_uid if ctx.series else "",
                             f"backend 'monai' needs models.{self.options.model} (a model.json from train-seg)")
        return MonaiBackend.load(Path(path), device=ctx.device)

    def tilted_content(self, volume: Volume) -> str:
        """What a refused tilted series holds, so its "not evaluable" says whether a level was there at all.

        Counting vertebrae is a stack-direction profile of bone near the spine; the in-plane shear
        of a gantry tilt blurs it but does not remove vertebrae, so the weight-free finder is run
        on the sheared stack only to describe the content (never to measure).
        """
        levels = " or ".join(self.options.levels)
        part = str(volume.first_dataset.get("BodyPartExamined", "") or "").strip()
        where = f" (body part examined: {part})" if part else ""
        try:
            canonical = volume.canonical_axial()[0]
            level = ClassicalBackend().find_level(canonical, self.options.levels)
        except Exception as e:  # a description only: never let it hide the refusal itself
            log.info("series %s: content of the tilted series not described: %s", volume.series_uid, e)
            return f"content of the tilted series not assessed{where}"
        if level.level is not None and level.slice_index is not None:
            image = canonical.slices_label(level.slice_index, fallback=" from the feet")  # as a viewer numbers it
            return (f"{level.level} appears to be in the field of view (around {image}) but "
                    "is not measured on tilted slices: reconstruct the series without gantry tilt (axial) to "
                    "measure it")
        notes = "; ".join(level.notes) or "no vertebral level found"
        return f"even without the tilt, {levels} could not be measured in this series{where}: {notes}"

    # ------------------------------------------------------------------------------------------
    def run(self, ctx: PipelineContext) -> PipelineOutput:
        out = self._run(ctx)
        return replace(out, summary={**out.summary, "level_source": level_source(self.override)})

    def _run(self, ctx: PipelineContext) -> PipelineOutput:
        if len(ctx.series) != 1:
            raise StageError("input", "", f"{NAME} takes one series, got {len(ctx.series)}")
        series = ctx.series[0]
        t = Timings()
        t0 = time.perf_counter()
        try:
            volume = self.loader.run(list(series.files))
        except StageError:
            raise
        except Exception as e:
            raise StageError("series-to-volume", series.series_uid, str(e)) from e
        t0 = t.add("series-to-volume", t0)
        missing = sorted({kw for ds in volume.source_datasets() for kw in
                          ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
                          if not str(ds.get(kw, "") or "")})
        if missing:
            raise StageError("series-to-volume", series.series_uid,
                             f"instances lack {', '.join(missing)}: results could not reference them")
        from pipelines.body_composition import outputs  # highdicom import only when writing

        qc = self.qc.run(volume)
        t0 = t.add("qc-gate", t0)
        if not qc.evaluable:
            reason = qc.reason
            if volume.tilted and str(volume.first_dataset.get("Modality", "")) == "CT":
                reason = f"{reason}; {self.tilted_content(volume)}"
            out = outputs.write_not_evaluable(ctx, volume, reason, self, "qc-gate")
            self.last_timings, self.last_cpu_timings = t.seconds, t.cpu_seconds
            return out
        backend = self.backend(ctx)
        # every anatomical stage works on patient axes (k -> head, rows -> back, columns -> the
        # patient's left), whatever the stored orientation; results go back to the stored order
        source, (volume, reorient) = volume, volume.canonical_axial()
        level = LevelFinder(backend, self.options.levels).run(volume)
        if self.override is not None:  # the reader's slice wins; the finder only gives the anatomy there
            try:
                level = level_from_override(volume, self.override, level)
            except NotEvaluable as e:
                out = outputs.write_not_evaluable(ctx, source, e.reason, self, "reader-level", backend=backend)
                self.last_timings, self.last_cpu_timings = t.seconds, t.cpu_seconds
                return out
        t0 = t.add("level-finder", t0)
        if level.level is None or level.slice_index is None:
            reason = "; ".join(level.notes) or "level not found"
            level = level_to_source(level, reorient)  # the votes' slices as the series is stored
            out = outputs.write_not_evaluable(ctx, source, reason, self, "level-finder", backend=backend, level=level)
            # what each anchor said (and the confidence) goes with the refusal too
            out = replace(out, summary={**out.summary, "level_anchors": [a.as_json() for a in level.anchors],
                                        "level_confidence": level.confidence or None})
            self.last_timings, self.last_cpu_timings = t.seconds, t.cpu_seconds
            return out
        names_kept = self.override is None or any(v.name for v in level.vertebrae)
        seg = TissueSegmenter(backend, self.options.volumes_3d and names_kept,
                              roll=RollParams(enabled=self.options.spine_roll),
                              processes=self.options.forked_workers).run(SegmentInput(volume, level))
        if not names_kept and self.options.volumes_3d:
            seg = replace(seg, volume_note="3D lumbar volumes not measured: the automatic vertebra names disagree "
                                           f"with the reader's level {level.level}")
        t0 = t.add("segmentation", t0)
        meas = self.measure.run(MeasureInput(volume, seg, patient_factors(volume.first_dataset)))
        t0 = t.add("measurements", t0)
        seg, meas = segmentation_to_source(seg, meas, reorient)
        try:
            out = outputs.write_results(ctx, source, seg, meas, self, backend)
        except StageError:
            raise
        except Exception as e:
            raise StageError("seg-sr-writers", series.series_uid, f"{type(e).__name__}: {e}") from e
        t.add("seg-sr-writers", t0)
        self.last_timings, self.last_cpu_timings = t.seconds, t.cpu_seconds
        return out


def segmentation_to_source(seg: Segmentation, meas: Measurements,
                           reorient: Reorient) -> tuple[Segmentation, Measurements]:
    """Results found on patient axes, mapped back to the stored series' own slice, row and column order."""
    if reorient.identity:
        return seg, meas
    level = level_to_source(seg.level, reorient)
    slice_seg = replace(seg.slice_seg, masks={k: reorient.slice_to_source(m) for k, m in seg.slice_seg.masks.items()},
                        body=reorient.slice_to_source(seg.slice_seg.body))
    volume_masks = {k: reorient.to_source(m) for k, m in seg.volume_masks.items()}
    rng = reorient.span_to_source(*seg.volume_range) if seg.volume_range is not None else None
    seg = replace(seg, level=level, slice_seg=slice_seg, volume_masks=volume_masks, volume_range=rng)
    meas = replace(meas, slice_index=reorient.index_to_source(meas.slice_index))
    return seg, meas


def level_to_source(level: LevelResult, reorient: Reorient) -> LevelResult:
    """A level found on patient axes with its slice, vertebrae and anchor votes in the stored series' slice order
    (the per-slice body and canal lines stay on patient axes: they serve the stages, not the outputs)."""
    if reorient.identity:
        return level

    def moved(v: Vertebra) -> Vertebra:
        first, last = reorient.span_to_source(v.first, v.last)
        return replace(v, first=first, last=last)

    verts = tuple(moved(v) for v in level.vertebrae)
    k = None if level.slice_index is None else reorient.index_to_source(level.slice_index)
    anchors = tuple(a.to_source(reorient) for a in level.anchors)
    return replace(level, slice_index=k, vertebrae=verts, anchors=anchors)


def create(options: Mapping[str, Any]) -> BodyCompositionPipeline:
    return BodyCompositionPipeline(Options.parse(options))


def summary_of(meas: Measurements, seg: Segmentation) -> dict[str, Any]:
    return {
        "level": meas.level,
        "slice_index": meas.slice_index,
        "level_method": seg.level.method,
        "level_notes": list(seg.level.notes),
        "level_anchors": [a.as_json() for a in seg.level.anchors],
        "level_confidence": seg.level.confidence or None,
        "backend": seg.backend,
        "model_version": seg.model_version or None,
        "areas_cm2": {k: v.as_json() for k, v in meas.areas.items()},
        "mean_hu": {k: v.as_json() for k, v in meas.mean_hu.items()},
        "volumes_cm3": {k: v.as_json() for k, v in meas.volumes.items()},
        "volume_mean_hu": {k: v.as_json() for k, v in meas.volume_mean_hu.items()},
        "segmentation_notes": list(seg.slice_seg.notes),
        "plausibility": dict(meas.gates),
        "volume_slices": list(seg.volume_range) if seg.volume_range else None,
        "derived": {k: v.as_json() for k, v in meas.derived.items()},
        "sarcopenia": dict(meas.sarcopenia),
        "cutoff_table_version": meas.table_version,
    }


def series_of_folder(input_dir: Path) -> SeriesInput:
    """The one image series in ``input_dir`` (recursively); several series raise ValueError."""
    files = [p for p in sorted(Path(input_dir).rglob("*")) if p.is_file()]
    by_series: dict[str, list[Path]] = {}
    study = ""
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if "ImagePositionPatient" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
            continue
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(p)
        study = str(ds.get("StudyInstanceUID", ""))
    if len(by_series) != 1:
        raise ValueError(f"{input_dir}: expected one image series, found {len(by_series)}")
    uid, paths = next(iter(by_series.items()))
    return SeriesInput(series_uid=uid, study_uid=study, files=tuple(paths))


def run_folder(input_dir: Path, out_dir: Path, options: Mapping[str, Any] | None = None,
               models: Mapping[str, Path] | None = None, identity: Identity | None = None) -> PipelineOutput:
    """Run the pipeline on a folder holding one CT series; writes SEG, SR(s) and summary.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = create(options or {})
    ctx = PipelineContext(series=(series_of_folder(Path(input_dir)),), work_dir=out_dir,
                          identity=identity or default_identity(), options=dict(options or {}),
                          models=dict(models or {}))
    out = pipeline.run(ctx)
    summary = dict(out.summary)
    summary["timings_s"] = {k: round(v, 4) for k, v in pipeline.last_timings.items()}
    summary["cpu_timings_s"] = {k: round(v, 4) for k, v in pipeline.last_cpu_timings.items()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return out


def _json_default(o: object) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def volume_of(files: list[Path]) -> Volume:
    return SeriesToVolume().run(files)
