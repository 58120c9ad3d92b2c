"""Dataclasses passed between the body-composition stages (no heavy imports)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines.common.volume import Reorient, Volume

# Structures per level, in SEG order; labels and codes of each come from dicom_templates/codes.toml
# (pipelines.body_composition.dicom_out.template_key).
# L3 (and any lumbar slice): whole-slice tissues plus the named lumbar muscles.
L3_NAMED = ("psoas_left", "psoas_right", "erector_left", "erector_right")
L3_KEYS = ("skeletal_muscle", *L3_NAMED, "sat", "vat", "imat")
# C3 (Swartz et al. 2016, Oral Oncol 62:28-33): the cross-sectional muscle area is the
# paravertebral muscles plus both sternocleidomastoids; no SAT, VAT, cavity or psoas.
C3_NAMED = ("sternocleidomastoid_left", "sternocleidomastoid_right", "paravertebral_left", "paravertebral_right")
C3_KEYS = ("skeletal_muscle", *C3_NAMED)
LEVEL_KEYS: Mapping[str, tuple[str, ...]] = {"L3": L3_KEYS, "C3": C3_KEYS}
SEGMENT_KEYS = L3_KEYS  # the lumbar set (kept for callers that only know L3)
NAMED_MUSCLES = L3_NAMED  # measured in 3D over the lumbar spine
NAMED_BY_LEVEL: Mapping[str, tuple[str, ...]] = {"L3": L3_NAMED, "C3": C3_NAMED}
WHOLE_SLICE = ("skeletal_muscle", "sat", "vat", "imat")  # need the whole body cross-section in view


def keys_for_level(level: str) -> tuple[str, ...]:
    """The structures measured at ``level`` (lumbar levels measure the L3 set)."""
    return LEVEL_KEYS.get(level, L3_KEYS)


def named_for_level(level: str) -> tuple[str, ...]:
    return NAMED_BY_LEVEL.get(level, L3_NAMED)


@dataclass(frozen=True)
class Vertebra:
    name: str  # "L3", "T12", ... or "" before naming
    first: int  # first and last slice index of the vertebral body run
    last: int
    width_mm: float  # widest bone component through the spine (sacrum detection)
    rib_bearing: bool
    centre_rc: tuple[float, float]  # vertebral body centre (row, column)
    half_width_mm: float
    half_height_mm: float
    touches_edge: bool = False
    middle: float | None = None  # slice position (fractional) of the middle of the vertebral body, disc to disc
    rib_sides: tuple[str, ...] = ()  # "left"/"right": sides with a rib articulating with this vertebra
    pitch: float | None = None  # slices from the disc below to the disc above (None at the edge)


@dataclass(frozen=True)
class Anchor:
    """One anatomical landmark and the name it gives to a vertebra (its vote)."""

    name: str  # "sacrum", "iliac crest", "lowest rib-bearing vertebra", "highest rib-bearing vertebra", ...
    slices: tuple[int, int]  # where the landmark was seen (first, last slice index)
    vertebra_slices: tuple[int, int]  # the vertebra it names (first, last slice index)
    names: tuple[str, ...]  # the name(s) it gives that vertebra ("L5"; the iliac crest: "L4" or "L5")
    implies: Mapping[str, int | None] = field(default_factory=dict)  # level -> its slice under this vote alone
    agrees: bool = True  # with the naming finally used

    def as_json(self) -> dict[str, Any]:
        return {"anchor": self.name, "slices": list(self.slices), "vertebra_slices": list(self.vertebra_slices),
                "names": list(self.names), "implies": dict(self.implies), "agrees": self.agrees}

    def describe(self, where: Callable[[int, int], str]) -> str:
        """One sentence for a reader (the SR's anchor vote), naming images as a viewer does: ``where`` labels slices
        ``a``..``b`` of the series as stored (:meth:`Volume.slices_label`)."""
        alone = [f"{lv} on {where(k, k)}" for lv, k in self.implies.items() if k is not None]
        return (f"{self.name} ({where(*self.slices)}) names the vertebra on {where(*self.vertebra_slices)} "
                f"{' or '.join(self.names)}" + (f"; alone it puts {', '.join(alone)}" if alone else "")
                + ("; counted" if self.agrees else "; not counted"))

    def to_source(self, reorient: Reorient) -> Anchor:
        """The same vote with its slice indices in the stored series' order (found on patient axes)."""
        return replace(self, slices=reorient.span_to_source(*self.slices),
                       vertebra_slices=reorient.span_to_source(*self.vertebra_slices),
                       implies={lv: None if k is None else reorient.index_to_source(k) for lv, k in self.implies.items()})


@dataclass(frozen=True)
class LevelResult:
    level: str | None  # the level found ("L3", "C3") or None
    slice_index: int | None  # index into the volume of the level slice
    vertebrae: tuple[Vertebra, ...]
    spine_centre_rc: tuple[float, float]
    notes: tuple[str, ...] = ()
    method: str = ""
    anchors: tuple[Anchor, ...] = ()
    confidence: str = ""  # "high" (>= 2 independent anchors agree), "moderate" (one), "low" (none or disagree)
    # per slice (canonical index): vertebral-body centre (row, column) and its half width / half depth (mm)
    body_line: tuple[tuple[float, float], ...] = ()
    body_size_mm: tuple[tuple[float, float], ...] = ()
    canal_line: tuple[tuple[float, float], ...] = ()  # per slice: spinal canal centre (row, column)

    def vertebra(self, name: str) -> Vertebra | None:
        for v in self.vertebrae:
            if v.name == name:
                return v
        return None


@dataclass(frozen=True)
class SideBone:
    """One side's posterior bony landmarks on one slice, relative to the vertebral body centre."""

    tip_mm: float | None  # the transverse process tip, mm from the midline (None: no process on the slice)
    floor_mm: tuple[float, ...] = ()  # the posterior bony floor, mm behind the centre, at 0, 1, 2, ... mm lateral
    # where ribs lie beside the compartment: the most posterior bone (vertebra and ribs) in each column, mm behind the
    # centre at 0, 1, 2, ... mm lateral, NaN where the column holds none (the chest wall nearby slices lie behind)
    wall_mm: tuple[float, ...] = ()


@dataclass(frozen=True)
class NeighbourBone:
    """The bony landmarks of a nearby slice (``dz_mm`` along the spine from the slice measured)."""

    dz_mm: float
    left: SideBone
    right: SideBone


@dataclass(frozen=True)
class SliceAnatomy:
    centre_rc: tuple[float, float]
    half_width_mm: float
    half_height_mm: float
    canal_rc: tuple[float, float] | None = None  # spinal canal centre on this slice, where known
    neighbours: tuple[NeighbourBone, ...] = ()  # bony landmarks of nearby slices (tissues.with_neighbours)
    # False where the slice's vertebra is named L2-L5 (or it is the L3 level slice): no rib can lie beside its
    # paraspinal muscles, so a bone piece there is a transverse process parted by partial volume; None: unknown
    ribs_possible: bool | None = None


@dataclass(frozen=True)
class SliceSegmentation:
    masks: Mapping[str, NDArray[np.bool_]]  # keys_for_level(level) -> (rows, columns)
    body: NDArray[np.bool_]  # the trunk (or neck), limbs cut off
    truncated: bool = False
    limbs: NDArray[np.bool_] | None = None  # what was cut off as arms (never muscle, SAT or VAT)
    notes: tuple[str, ...] = ()
    body_area_cm2: float | None = None  # trunk cross-section (plausibility of areas against body size)
    vertebral_body_cm2: float | None = None  # vertebral body cross-section on the slice
    trunk_half_widths_mm: tuple[float, float] | None = None  # trunk outline left / right of the vertebra
    trunk_lateral_concavity: float | None = None  # hull area beside the spine not in the trunk, per trunk area
    not_evaluable: Mapping[str, str] = field(default_factory=dict)  # key -> reason found while segmenting
    # key -> reason: a structure parted from its neighbour by a line, not a fascia or fat plane (its own area is not
    # evaluable; the sum of the two, where it is measured, is)
    parted_by_line: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QCResult:
    evaluable: bool
    reason: str = ""
    warnings: tuple[str, ...] = ()
    sat_reliable: bool = True


@dataclass(frozen=True)
class SeriesAndQC:
    volume: Volume
    qc: QCResult


@dataclass(frozen=True)
class Segmentation:
    """Everything segmented: the level slice and, where the lumbar spine is in view, 3D masks."""

    level: LevelResult
    slice_seg: SliceSegmentation
    volume_masks: Mapping[str, NDArray[np.bool_]] = field(default_factory=dict)  # NAMED_MUSCLES -> (z, y, x)
    volume_range: tuple[int, int] | None = None  # slice range of the 3D masks (inclusive)
    volume_note: str = ""
    backend: str = "classical"
    model_version: str = ""
    # the named muscles (NAMED_MUSCLES -> (y, x)) on the slices just above and below a lumbar level slice, where the
    # series has them: what the consistency gate compares the level slice's values with
    neighbour_masks: tuple[Mapping[str, NDArray[np.bool_]], ...] = ()


@dataclass(frozen=True)
class Value:
    """A measurement or the reason it is not evaluable."""

    value: float | None
    unit: str
    reason: str = ""

    @property
    def evaluable(self) -> bool:
        return self.value is not None

    def as_json(self) -> Any:
        return {"value": self.value, "unit": self.unit} if self.value is not None else {
            "value": None, "unit": self.unit, "not_evaluable": self.reason}


@dataclass(frozen=True)
class Measurements:
    level: str
    slice_index: int
    areas: Mapping[str, Value]  # keys_for_level(level) -> cm2 (only the keys of its level)
    mean_hu: Mapping[str, Value]  # keys_for_level(level) -> HU
    volumes: Mapping[str, Value]  # NAMED_MUSCLES -> cm3 (lumbar levels only; empty at C3)
    volume_mean_hu: Mapping[str, Value]
    derived: Mapping[str, Value]  # smi, l3_muscle_area (from C3), ...
    sarcopenia: Mapping[str, Any]  # cutoff id -> {"sarcopenic": bool, ...} or {"not_evaluable": reason}
    table_version: str = ""
    gates: Mapping[str, Any] = field(default_factory=dict)  # plausibility checks applied (version, failures)
