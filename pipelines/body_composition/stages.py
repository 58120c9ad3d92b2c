"""Typed stages of the body-composition pipeline: config in ``__init__``, pure ``run``.

Each stage works without the node: ``QCGate().run(volume)``, ``LevelFinder(...).run(volume)``,
``TissueSegmenter(...).run(SegmentInput(...))``, ``Measure(...).run(MeasureInput(...))``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from pipelines.body_composition.levels import SpineLevelFinder, anatomy_for_slice
from pipelines.body_composition.plausibility import (
    Gates,
    apply_gates,
    around_level_reason,
    continuity_reason,
    load_gates,
    metal_in_volume,
    metal_mm2,
    trend_reason,
    unseen_outline,
)
from pipelines.body_composition.reference import (
    Classification,
    PatientFactors,
    ReferenceTable,
    Unavailable,
    c3_to_l3,
    classify,
    smi,
)
from pipelines.body_composition.roll import RollParams, SpineRoll, turn_back, turned_anatomy
from pipelines.body_composition.tissues import (
    TissueParams,
    TissueSlicer,
    bony_landmarks,
    process_reach_mm,
    with_neighbours,
)
from pipelines.body_composition.types import (
    C3_NAMED,
    NAMED_MUSCLES,
    WHOLE_SLICE,
    LevelResult,
    Measurements,
    QCResult,
    Segmentation,
    SideBone,
    SliceAnatomy,
    SliceSegmentation,
    Value,
    keys_for_level,
    named_for_level,
)
from pipelines.common.forked import fork_safe, map_forked
from pipelines.common.volume import Volume

log = logging.getLogger(__name__)

LUMBAR = ("L1", "L2", "L3", "L4", "L5")


class Backend(Protocol):
    """What a segmentation backend provides (weight-free or MONAI)."""

    name: str
    model_version: str

    def find_level(self, volume: Volume, levels: Sequence[str]) -> LevelResult: ...

    def segment_slice(self, hu: NDArray[np.float32], spacing: tuple[float, float],
                      anatomy: SliceAnatomy, level: str = "L3", roll_deg: float = 0.0) -> SliceSegmentation: ...

    def segment_named(self, hu: NDArray[np.float32], spacing: tuple[float, float],
                      anatomy: SliceAnatomy, roll_deg: float = 0.0) -> Mapping[str, NDArray[np.bool_]]: ...


class ClassicalBackend:
    """The weight-free default: HU windows plus anatomical reasoning."""

    name = "classical"
    model_version = ""

    def __init__(self, tissue: TissueParams | None = None) -> None:
        tissue = tissue or TissueParams()
        self.finder = SpineLevelFinder(tissue=tissue)  # the same arm cut as the segmenter's
        self.segmenter = TissueSlicer(tissue)

    def find_level(self, volume: Volume, levels: Sequence[str]) -> LevelResult:
        return self.finder.run(volume, levels)

    def segment_slice(self, hu: NDArray[np.float32], spacing: tuple[float, float],
                      anatomy: SliceAnatomy, level: str = "L3", roll_deg: float = 0.0) -> SliceSegmentation:
        return self.segmenter.run(hu, spacing, anatomy, level, roll_deg)

    def segment_named(self, hu: NDArray[np.float32], spacing: tuple[float, float],
                      anatomy: SliceAnatomy, roll_deg: float = 0.0) -> Mapping[str, NDArray[np.bool_]]:
        return self.segmenter.named(hu, spacing, anatomy, roll_deg)


class QCGate:
    """Header and geometry checks before any heavy work."""

    name = "qc-gate"

    def __init__(self, max_slice_thickness_mm: float = 5.0, max_tilt_deg: float = 0.5,
                 require_uniform_spacing: bool = True) -> None:
        self.max_slice_thickness_mm = max_slice_thickness_mm
        self.max_tilt_deg = max_tilt_deg
        self.require_uniform_spacing = require_uniform_spacing

    def run(self, volume: Volume) -> QCResult:
        ds = volume.first_dataset
        reasons: list[str] = []
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            reasons.append(f"modality is {modality or 'missing'}, not CT")
        if volume.tilt_degrees > self.max_tilt_deg:
            reasons.append(f"gantry tilt of {volume.tilt_degrees:.1f} degrees (slices are sheared; "
                           "areas on tilted planes are not axial cross-sections and are not reported)")
        elif not volume.is_axial:
            reasons.append("slices are not axial (normal more than 10 degrees from the head-feet axis)")
        thickness = volume.slice_thickness if volume.slice_thickness is not None else volume.slice_spacing
        if thickness > self.max_slice_thickness_mm:
            reasons.append(f"slice thickness {thickness:.1f} mm above the limit of {self.max_slice_thickness_mm:.1f} mm")
        if self.require_uniform_spacing and not volume.spacing_uniform:
            reasons.append(f"uneven slice spacing (up to {volume.max_spacing_deviation:.2f} mm from the median)")
        if len(volume.slices) < 3:
            reasons.append(f"only {len(volume.slices)} slice(s): vertebrae cannot be counted")
        return QCResult(evaluable=not reasons, reason="; ".join(reasons))


class LevelFinder:
    name = "level-finder"

    def __init__(self, backend: Backend, levels: Sequence[str] = ("L3", "C3")) -> None:
        self.backend = backend
        self.levels = tuple(levels)

    def run(self, volume: Volume) -> LevelResult:
        return self.backend.find_level(volume, self.levels)


@dataclass(frozen=True)
class SegmentInput:
    volume: Volume
    level: LevelResult


class TissueSegmenter:
    """Tissue and named muscles on the level slice; named muscles in 3D over L1-L5 when in view."""

    name = "tissue-segmentation"

    def __init__(self, backend: Backend, volumes_3d: bool = True, workers: int = 2,
                 roll: RollParams | None = None, processes: bool = True) -> None:
        self.backend = backend
        self.volumes_3d = volumes_3d
        self.workers = workers
        self.roll = roll or RollParams()
        self.processes = processes  # forked processes where this process may fork (else threads)

    def _turned(self, vol: Volume, level: LevelResult
                ) -> tuple[Callable[[int], float], Callable[[int], NDArray[np.float32]]]:
        """Slice ``k``'s spine roll (``roll.SpineRoll``: the weight-free backend at L1-L5 and C3) and its HU turned
        back by it (the stored slice where the roll is 0), for its bony landmarks (lumbar slices)."""
        if not (isinstance(self.backend, ClassicalBackend) and level.level in (*LUMBAR, "C3") and self.roll.enabled):
            return (lambda k: 0.0), (lambda k: vol.hu[k])
        sr = SpineRoll(vol.hu, vol.pixel_spacing, vol.slice_spacing, lambda k: anatomy_for_slice(level, k), self.roll)

        def hu_at(k: int) -> NDArray[np.float32]:  # read once per slice: its landmarks are cached
            deg = sr.at(k)
            return vol.hu[k] if deg == 0.0 else turn_back(vol.hu[k], vol.pixel_spacing,
                                                            anatomy_for_slice(level, k).centre_rc, deg)

        return sr.at, hu_at

    def _anatomy(self, vol: Volume, level: LevelResult, roll: Callable[[int], float],
                 hu_at: Callable[[int], NDArray[np.float32]]) -> Callable[[int], SliceAnatomy]:
        """Slice ``k``'s vertebral anatomy (on the slice turned back by ``roll``); for the weight-free backend with
        the bony landmarks of nearby slices (a slice between transverse processes takes theirs:
        ``tissues.with_neighbours``), each measured on its own turned-back slice."""
        def own(k: int) -> SliceAnatomy:
            deg = roll(k)
            a = anatomy_for_slice(level, k)
            return a if deg == 0.0 else turned_anatomy(a, vol.pixel_spacing, deg)

        if not isinstance(self.backend, ClassicalBackend) or level.level == "C3":
            return own
        p = self.backend.segmenter.p

        @functools.cache
        def landmarks(k: int) -> tuple[SideBone, SideBone]:
            return bony_landmarks(hu_at(k), vol.pixel_spacing, own(k), p)

        n = vol.hu.shape[0]
        return lambda k: with_neighbours(own(k), k, landmarks, n, vol.slice_spacing, p,
                                         process_reach_mm(level, k, vol.slice_spacing, p))

    def _volume_range(self, level: LevelResult) -> tuple[tuple[int, int] | None, str]:
        """The slices of the 3D lumbar masks (L5's first to L1's last), or None with the reason."""
        if not self.volumes_3d:
            return None, ""
        if level.level not in LUMBAR:
            return None, f"3D volumes are measured over the lumbar spine only (level {level.level})"
        l1, l5 = level.vertebra("L1"), level.vertebra("L5")
        if l1 is None or l5 is None or l1.touches_edge or l5.touches_edge:
            return None, "3D volumes need L1 to L5 completely in the field of view"
        return (l5.first, l1.last), ""

    def _segment(self, level_slice: Callable[[], SliceSegmentation],
                 one: Callable[[int], Mapping[str, NDArray[np.bool_]]], todo: list[int], shape: tuple[int, int]
                 ) -> tuple[SliceSegmentation, dict[int, Mapping[str, NDArray[np.bool_]]]]:
        """The level slice's full segmentation and the named muscles on the ``todo`` slices, side by side: in
        forked processes for the weight-free backend (numpy and scipy, held back by the GIL in threads:
        ``pipelines.common.forked``) where this process may fork, else in threads (the level slice beside them)."""
        forked = (self.processes and isinstance(self.backend, ClassicalBackend) and self.workers > 1
                  and len(todo) >= 2 * self.workers and fork_safe())
        if forked:
            h, w = shape

            def packed(kk: int) -> dict[str, NDArray[np.uint8]]:  # an eighth of the bytes through the pipe
                return {key: np.packbits(m) for key, m in one(kk).items()}

            try:
                with map_forked(packed, todo, self.workers) as results:
                    seg = level_slice()  # the parent works too
                    named: dict[int, Mapping[str, NDArray[np.bool_]]] = {
                        kk: {key: np.unpackbits(b, count=h * w).reshape(h, w).view(np.bool_) for key, b in r.items()}
                        for kk, r in zip(todo, results, strict=True)}
                log.debug("named muscles on %d slices in %d forked processes", len(todo), self.workers)
                return seg, named
            except BrokenProcessPool as e:  # a child killed (out of memory): the same work in threads
                log.warning("tissue-segmentation: a forked worker died (%s); segmenting in threads", e)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:  # scipy releases the GIL in part
            # the level slice's full segmentation runs beside the other slices, not before them
            level_seg = pool.submit(level_slice)
            return level_seg.result(), dict(zip(todo, pool.map(one, todo), strict=True))

    def run(self, data: SegmentInput) -> Segmentation:
        vol, level = data.volume, data.level
        assert level.slice_index is not None
        k = level.slice_index
        roll, hu_at = self._turned(vol, level)
        anatomy = self._anatomy(vol, level, roll, hu_at)
        # the slices just above and below the level slice: the consistency gate's reference (lumbar named muscles)
        near = [kk for kk in (k - 1, k + 1) if 0 <= kk < vol.hu.shape[0]] if level.level in LUMBAR else []
        rng, note = self._volume_range(level)
        todo = [kk for kk in range(rng[0], rng[1] + 1) if kk != k] if rng is not None else []
        todo += [kk for kk in near if kk not in set(todo)]

        def one(kk: int) -> Mapping[str, NDArray[np.bool_]]:
            return self.backend.segment_named(vol.hu[kk], vol.pixel_spacing, anatomy(kk), roll_deg=roll(kk))

        def level_slice() -> SliceSegmentation:
            return self.backend.segment_slice(vol.hu[k], vol.pixel_spacing, anatomy(k), level=level.level or "L3",
                                              roll_deg=roll(k))

        seg, named_at = self._segment(level_slice, one, todo, (vol.hu.shape[1], vol.hu.shape[2]))
        masks: dict[str, NDArray[np.bool_]] = {}
        if rng is not None:
            masks = {key: np.zeros(vol.hu.shape, bool) for key in NAMED_MUSCLES}
            for kk, named in [(k, seg.masks), *named_at.items()]:
                if rng[0] <= kk <= rng[1]:
                    for key in NAMED_MUSCLES:
                        masks[key][kk] = named[key]
        return Segmentation(level=level, slice_seg=seg, volume_masks=masks, volume_range=rng, volume_note=note,
                            backend=self.backend.name, model_version=self.backend.model_version,
                            neighbour_masks=tuple(named_at[kk] for kk in near))


@dataclass(frozen=True)
class MeasureInput:
    volume: Volume
    segmentation: Segmentation
    factors: PatientFactors


def _touches_border(mask: NDArray[np.bool_]) -> bool:
    return bool(mask[0, :].any() or mask[-1, :].any() or mask[:, 0].any() or mask[:, -1].any())


class Measure:
    """Areas, mean HU, volumes, SMI and sarcopenia by the configured cut-offs."""

    name = "measurements"

    def __init__(self, table: ReferenceTable, cutoffs: Sequence[str] = ("prado-2008", "martin-2013"),
                 conversion: str = "swartz-2016", gates: Gates | None = None) -> None:
        unknown = [c for c in cutoffs if c not in table.cutoffs]
        if unknown:
            raise ValueError(f"unknown cut-off(s) {unknown}; known: {sorted(table.cutoffs)}")
        self.table = table
        self.cutoffs = tuple(cutoffs)
        self.conversion = conversion
        self.gates = gates or load_gates()

    def run(self, data: MeasureInput) -> Measurements:
        vol, seg, f = data.volume, data.segmentation, data.factors
        level = seg.level.level or ""
        k = seg.level.slice_index if seg.level.slice_index is not None else -1
        px_cm2 = vol.pixel_area_mm2 / 100.0
        hu = vol.hu[k]
        truncated = seg.slice_seg.truncated
        cut = "body cut off at the edge of the field of view: whole-slice tissue areas unreliable"
        named = named_for_level(level)
        areas: dict[str, Value] = {}
        means: dict[str, Value] = {}
        for key in keys_for_level(level):
            m = seg.slice_seg.masks.get(key)
            reason = seg.slice_seg.not_evaluable.get(key, "")
            if reason:
                pass
            elif m is None:
                reason = f"not segmented by the {seg.backend} backend"
            elif truncated and key in WHOLE_SLICE:
                reason = cut
            elif key in named and _touches_border(m):
                reason = "structure touches the edge of the field of view"
            elif not m.any():
                reason = "structure not found on the level slice"
            else:
                reason = seg.slice_seg.parted_by_line.get(key, "")
            if reason or m is None:
                areas[key] = Value(None, "cm2", reason)
                means[key] = Value(None, "HU", reason)
            else:
                areas[key] = Value(float(m.sum()) * px_cm2, "cm2")
                means[key] = Value(float(hu[m].mean()), "HU")
        body = seg.slice_seg.body if seg.slice_seg.limbs is None else seg.slice_seg.body | seg.slice_seg.limbs
        near = [{key: float(m.sum()) * px_cm2 for key, m in n.items() if key in named} for n in seg.neighbour_masks]
        unseen = {g.key: unseen_outline(seg.slice_seg.masks[g.key], hu, vol.pixel_spacing, g)
                  for g in self.gates.outline if g.level == level and g.key in seg.slice_seg.masks}
        areas, means, failed = apply_gates(level, areas, means, seg.slice_seg, self.gates,
                                           metal_mm2(hu, body, vol.pixel_area_mm2, self.gates), near,
                                           vol.slice_spacing if near else 0.0, unseen)
        k0, k1 = seg.volume_range if seg.volume_range is not None else (0, -1)
        courses: dict[str, list[float]] = {}

        def course(key: str, vm: NDArray[np.bool_]) -> list[float]:
            """The 3D mask's area (cm2) on each slice of the volume range, counted once for the trend and the
            continuity gates."""
            if key not in courses:
                courses[key] = (np.count_nonzero(vm[k0 : k1 + 1], axis=(1, 2)) * px_cm2).tolist()
            return courses[key]

        def hold(key: str, gate: str, why: str, source: str) -> None:
            """The level slice's value of ``key`` not evaluable by a gate judged on its 3D course."""
            areas[key] = Value(None, "cm2", why)
            means[key] = Value(None, "HU", why)
            failed.append({"key": key, "gate": gate, "reason": why, "source": source})

        if k0 <= k <= k1:
            # the level slice's area against the muscle's own course along the spine, beyond what an organ lying on it
            # reaches (the neighbour slices' consistency gate cannot see an organ that spans them too)
            for g in self.gates.trend:
                vm, val = seg.volume_masks.get(g.key), areas.get(g.key)
                if vm is None or val is None or val.value is None or g.level != level:
                    continue
                why = trend_reason(g.key, val.value, course(g.key, vm), k - k0, vol.slice_spacing, self.gates, level)
                if why:
                    hold(g.key, "trend", why, g.source)
            # ... and against the 3D outline's stability around it: where the segmenter takes in or loses tissue from
            # slice to slice, the level slice's area is one draw of that
            for cg in self.gates.continuity:
                vm, val = seg.volume_masks.get(cg.key), areas.get(cg.key)
                if vm is None or val is None or val.value is None:
                    continue
                why = around_level_reason(cg.key, course(cg.key, vm), k - k0, vol.slice_spacing, self.gates, level)
                if why:
                    hold(cg.key, "continuity at the level", why, cg.source)
        if level == "C3" and areas["skeletal_muscle"].value is not None:
            # Swartz 2016: the C3 area is the paravertebral muscles plus BOTH sternocleidomastoids
            # (a part parted from its neighbour by a line is in the sum all the same)
            missing = [f"{key.replace('_', ' ')} ({areas[key].reason})" for key in C3_NAMED
                       if areas[key].value is None and areas[key].reason != seg.slice_seg.parted_by_line.get(key)]
            if missing:
                why = "C3 muscle area (Swartz 2016) needs all of its parts; not evaluable: " + "; ".join(missing)
                areas["skeletal_muscle"] = Value(None, "cm2", why)
                means["skeletal_muscle"] = Value(None, "HU", why)
        volumes: dict[str, Value] = {}
        vmeans: dict[str, Value] = {}
        if level != "C3":
            metal = None
            if seg.volume_range is not None:
                metal = metal_in_volume(vol.hu[k0 : k1 + 1], k0, vol.pixel_area_mm2, self.gates)
            for key in NAMED_MUSCLES:
                vm = seg.volume_masks.get(key)
                if vm is not None and vm.shape != vol.hu.shape:
                    raise ValueError(f"measurements: series {vol.series_uid}: 3D mask {key!r} has shape {vm.shape}, "
                                     f"the series {vol.hu.shape}")
                # the voxels of a (sparse) whole-series mask, in the order hu[vm] gives them: one scan
                idx = np.flatnonzero(vm) if vm is not None and not metal else None
                unstable = None
                if vm is not None and seg.volume_range is not None and not metal:
                    unstable = continuity_reason(key, course(key, vm), vol.slice_spacing, self.gates)
                no_volume = metal or unstable
                if no_volume:
                    volumes[key] = Value(None, "cm3", no_volume)
                    vmeans[key] = Value(None, "HU", no_volume)
                    if unstable:
                        failed.append({"key": f"{key}_volume", "gate": "continuity", "reason": unstable,
                                       "source": next(g.source for g in self.gates.continuity if g.key == key)})
                elif idx is None or not idx.size:
                    reason = seg.volume_note or "not segmented"
                    volumes[key] = Value(None, "cm3", reason)
                    vmeans[key] = Value(None, "HU", reason)
                else:
                    volumes[key] = Value(float(idx.size) * vol.voxel_volume_mm3 / 1000.0, "cm3")
                    vmeans[key] = Value(float(vol.hu.reshape(-1)[idx].mean()), "HU")
        gates = {"version": self.gates.version, "failed": failed}

        derived: dict[str, Value] = {}
        sarc: dict[str, Any] = {}
        muscle = areas["skeletal_muscle"]
        l3_area: float | Unavailable
        if muscle.value is None:
            l3_area = Unavailable(f"skeletal muscle area not evaluable: {muscle.reason}")
            if level == "C3":
                derived["l3_muscle_area_estimate"] = Value(None, "cm2", f"{self.conversion} conversion needs the C3 "
                                                           f"muscle area: {muscle.reason}")
        elif level == "C3":
            l3_area = c3_to_l3(muscle.value, f, self.table.conversions[self.conversion])
            derived["l3_muscle_area_estimate"] = (
                Value(l3_area, "cm2") if not isinstance(l3_area, Unavailable) else Value(None, "cm2", l3_area.reason))
        else:
            l3_area = muscle.value
        s = smi(l3_area, f) if not isinstance(l3_area, Unavailable) else l3_area
        # every input of the formulas behind the classification, named
        inputs: dict[str, Any] = {"muscle_area_cm2": muscle.value, "height_m": f.height_m, "sex": f.sex}
        if level == "C3":
            inputs = {"c3_muscle_area_cm2": muscle.value, "age_years": f.age_years, "weight_kg": f.weight_kg,
                      "sex": f.sex, "height_m": f.height_m, "l3_muscle_area_estimate_cm2": l3_area}
        if f.bmi is not None:
            inputs["bmi"] = round(f.bmi, 2)
        derived["smi"] = Value(s, "cm2/m2") if not isinstance(s, Unavailable) else Value(None, "cm2/m2", s.reason)
        for cid in self.cutoffs:
            cutoff = self.table.cutoffs[cid]
            if isinstance(s, Unavailable):
                sarc[cid] = {"not_evaluable": s.reason, "citation": cutoff.citation}
                continue
            c = classify(s, f, cutoff)
            if isinstance(c, Classification):
                sarc[cid] = {"sarcopenic": c.sarcopenic, "threshold": c.threshold, "unit": cutoff.unit,
                             "citation": c.citation, "via": self.conversion if level == "C3" else None,
                             "inputs": inputs}
            else:
                sarc[cid] = {"not_evaluable": c.reason, "citation": cutoff.citation}
        return Measurements(level=level, slice_index=k, areas=areas, mean_hu=means, volumes=volumes,
                            volume_mean_hu=vmeans, derived=derived, sarcopenia=sarc, table_version=self.table.version,
                            gates=gates)
