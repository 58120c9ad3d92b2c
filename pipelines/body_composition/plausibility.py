"""Gates that stop wrong numbers: published plausible ranges and the body's own size.

The ranges live in ``plausibility.toml`` (versioned, one source per row); this module reads
them and applies them to one level's areas and mean HU.  A value that fails a gate becomes
"not evaluable" with the reason (the gate, the value and the bound), never a number.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from pipelines.body_composition.types import WHOLE_SLICE, SliceSegmentation, Value

logger = logging.getLogger(__name__)

GATES_PATH = Path(__file__).with_name("plausibility.toml")


@dataclass(frozen=True)
class Bound:
    key: str
    level: str
    min: float
    max: float
    source: str
    quantity: str = "area"  # ranges: "area" (cm2) or "mean_hu" (HU)


@dataclass(frozen=True)
class Symmetry:
    left: str
    right: str
    max_ratio: float
    source: str


@dataclass(frozen=True)
class Consistency:
    """A named muscle's area on the level slice against the slices just above and below it."""

    key: str
    level: str
    max_change: float  # |area - mean of the neighbours' areas| / that mean
    source: str


@dataclass(frozen=True)
class Continuity:
    """A 3D muscle's area slice by slice over its range (L5-L1): each slice against the median of the slices within
    ``reach_mm`` above and below it."""

    key: str
    max_change: float  # a slice this far (share of that median) from it, or empty beside muscle, is unstable
    max_unstable: float  # share of the judged slices that may be unstable before the volume is not evaluable
    reach_mm: float
    min_share: float  # slices whose median is below this share of the muscle's median area are not judged (its ends)
    source: str
    # the level slice's area (at around_levels) is not evaluable where more than around_level_max_unstable of the judged
    # slices within around_level_mm of it are unstable (0: no such bound)
    around_level_mm: float = 0.0
    around_level_max_unstable: float = 1.0
    around_levels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trend:
    """A named muscle's area on the level slice against its own course along the spine: the line through the median
    areas of the slices ``near_mm`` to ``far_mm`` above and of those below the level slice.  One-sided: only an area
    larger than the line's value by more than ``max_change`` of it fails (an organ joined on the level slice and its
    neighbours); an organ joined on the far slices raises the line, which must not hold back a right value."""

    key: str
    level: str
    near_mm: float  # the slices nearer than this are not used (an organ lying on the muscle reaches them too)
    far_mm: float
    max_change: float  # (area - the line's value at the level slice) / that value
    source: str


@dataclass(frozen=True)
class Outline:
    """How much of a named muscle's outline on the level slice the image shows: an edge pixel is seen where fat (its
    plane) or denser tissue (bone, an enhancing vessel or organ) lies within ``reach_mm``; elsewhere the outline runs
    through tissue of the muscle's own density, where the segmenter's rules drew it and the image cannot confirm it."""

    key: str
    level: str
    fat_max_hu: float  # tissue at or below this (lightly smoothed) is fat: a plane that shows the edge
    dense_above_hu: float  # tissue this far above the muscle's own median HU (bone, enhancing) shows it as well
    reach_mm: float  # an edge pixel this near such tissue is seen
    max_unseen: float  # the share of the edge that may run unseen
    source: str


@dataclass(frozen=True)
class Gates:
    version: str
    ranges: tuple[Bound, ...]
    fractions: tuple[Bound, ...]
    vertebra_ratios: tuple[Bound, ...]
    symmetry: tuple[Symmetry, ...]
    max_half_width_ratio: float
    max_lateral_concavity: float
    trunk_source: str
    metal_hu: float = float("inf")
    metal_max_mm2: float = float("inf")
    metal_source: str = ""
    consistency: tuple[Consistency, ...] = ()
    continuity: tuple[Continuity, ...] = ()
    trend: tuple[Trend, ...] = ()
    outline: tuple[Outline, ...] = ()


def load_gates(path: Path = GATES_PATH) -> Gates:
    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    trunk = data.get("trunk", {})
    return Gates(
        version=str(data["version"]),
        ranges=tuple(Bound(**r) for r in data.get("range", [])),
        fractions=tuple(Bound(**r) for r in data.get("fraction", [])),
        vertebra_ratios=tuple(Bound(**r) for r in data.get("vertebra_ratio", [])),
        symmetry=tuple(Symmetry(**r) for r in data.get("symmetry", [])),
        max_half_width_ratio=float(trunk.get("max_half_width_ratio", float("inf"))),
        max_lateral_concavity=float(trunk.get("max_lateral_concavity", float("inf"))),
        trunk_source=str(trunk.get("source", "")),
        metal_hu=float(data.get("metal", {}).get("hu", float("inf"))),
        metal_max_mm2=float(data.get("metal", {}).get("max_mm2", float("inf"))),
        metal_source=str(data.get("metal", {}).get("source", "")),
        consistency=tuple(Consistency(**r) for r in data.get("consistency", [])),
        continuity=tuple(Continuity(**{**r, "around_levels": tuple(r.get("around_levels", ()))})
                         for r in data.get("continuity", [])),
        trend=tuple(Trend(**r) for r in data.get("trend", [])),
        outline=tuple(Outline(**r) for r in data.get("outline", [])),
    )


def _unstable_flags(areas: Sequence[float], slice_mm: float, gate: Continuity) -> NDArray[np.int8]:
    """Per slice of one 3D muscle's per-slice areas: 1 unstable, 0 stable, -1 not judged (:func:`unstable_slices`)."""
    a = np.asarray(areas, dtype=np.float64)
    flags = np.full(a.size, -1, dtype=np.int8)
    present = a[a > 0]
    if a.size < 3 or not present.size or slice_mm <= 0:
        return flags
    floor = gate.min_share * float(np.median(present))
    r = max(1, int(round(gate.reach_mm / slice_mm)))
    for k in range(a.size):
        near = np.concatenate([a[max(0, k - r) : k], a[k + 1 : k + 1 + r]])
        ref = float(np.median(near)) if near.size else 0.0
        if ref <= 0.0 or ref < floor:
            continue
        flags[k] = int(abs(a[k] - ref) > gate.max_change * ref)
    return flags


def unstable_slices(areas: Sequence[float], slice_mm: float, gate: Continuity) -> tuple[int, int]:
    """(unstable, judged) slices of one 3D muscle's per-slice areas along its range (:class:`Continuity`).

    A muscle's cross-section changes slowly along the spine (psoas major grows by 1-2 cm2 per cm from L1 to L4),
    so a slice whose area is far from the median of its neighbours within ``reach_mm``, or empty beside them, was
    outlined wrong (an organ joined, part of the muscle cut off, the muscle missed).  Slices whose neighbours'
    median is below ``min_share`` of the muscle's median area (where it begins or ends) are not judged."""
    flags = _unstable_flags(areas, slice_mm, gate)
    return int(np.count_nonzero(flags == 1)), int(np.count_nonzero(flags >= 0))


def around_level_reason(key: str, areas: Sequence[float], at: int, slice_mm: float, gates: Gates, level: str
                        ) -> str | None:
    """Why ``key``'s area on the level slice (slice ``at`` of its 3D per-slice ``areas``) is not evaluable because its
    3D outline is unstable within ``around_level_mm`` of it (None: it passes, has no such bound, or is not judged)."""
    for g in gates.continuity:
        if g.key != key or g.around_level_mm <= 0 or level not in g.around_levels or not 0 <= at < len(areas):
            continue
        flags = _unstable_flags(areas, slice_mm, g)
        r = int(np.floor(g.around_level_mm / slice_mm + 1e-6)) if slice_mm > 0 else 0
        near = flags[max(0, at - r) : at + r + 1]
        judged = int(np.count_nonzero(near >= 0))
        bad = int(np.count_nonzero(near == 1))
        if judged and bad > g.around_level_max_unstable * judged:
            return (f"implausible (continuity at the level): {key.replace('_', ' ')}'s outline is unstable on {bad} of "
                    f"the {judged} slices within {g.around_level_mm:g} mm of the level slice (area more than "
                    f"{100 * g.max_change:.0f} % from its neighbours' within {g.reach_mm:g} mm; at most "
                    f"{100 * g.around_level_max_unstable:.0f} % may be): the segmenter takes in or loses tissue from "
                    "slice to slice here, and the level slice's area is one draw of it")
    return None


def continuity_reason(key: str, areas: Sequence[float], slice_mm: float, gates: Gates) -> str | None:
    """Why the 3D volume of ``key`` is not evaluable by its continuity gate (None: it passes or has no gate)."""
    for g in gates.continuity:
        if g.key != key:
            continue
        bad, judged = unstable_slices(areas, slice_mm, g)
        if judged and bad > g.max_unstable * judged:
            return (f"implausible (continuity): the outline is unstable on {bad} of {judged} slices along L5-L1 (area "
                    f"more than {100 * g.max_change:.0f} % from its neighbours' within {g.reach_mm:g} mm, or missing "
                    f"beside them; at most {100 * g.max_unstable:.0f} % may be): the volume would not be the muscle's")
    return None


def trend_expected(areas: Sequence[float], at: int, slice_mm: float, gate: Trend) -> float | None:
    """The area a muscle's course along the spine puts on slice ``at`` of ``areas`` (its per-slice areas along its
    range): the line through (median distance, median area) of the slices ``gate.near_mm`` to ``gate.far_mm`` on each
    side where the muscle was found.  None where either side has no such slice (the level near the range's end)."""
    a = np.asarray(areas, dtype=np.float64)
    if slice_mm <= 0 or not 0 <= at < a.size:
        return None
    dz = (np.arange(a.size) - at) * slice_mm
    use = (np.abs(dz) >= gate.near_mm - 1e-6) & (np.abs(dz) <= gate.far_mm + 1e-6) & (a > 0)
    lo, hi = use & (dz < 0), use & (dz > 0)
    if not lo.any() or not hi.any():
        return None
    z0, a0 = float(np.median(dz[lo])), float(np.median(a[lo]))
    z1, a1 = float(np.median(dz[hi])), float(np.median(a[hi]))
    return a0 + (a1 - a0) * (0.0 - z0) / (z1 - z0)


def trend_reason(key: str, value: float, areas: Sequence[float], at: int, slice_mm: float, gates: Gates,
                 level: str) -> str | None:
    """Why ``value`` (``key``'s area on the level slice, slice ``at`` of ``areas``) is not evaluable by its trend
    gate (None: it passes, has no gate, or is not judged)."""
    for g in gates.trend:
        if g.key != key or g.level != level:
            continue
        want = trend_expected(areas, at, slice_mm, g)
        if want is None or want <= 0.0:
            continue
        change = (value - want) / want
        logger.debug("trend gate %s: %.2f cm2 on the level slice, %.2f cm2 from its course (%+.0f %%)", key, value,
                     want, 100.0 * change)
        if change > g.max_change:
            return (f"implausible (trend): {key.replace('_', ' ')} {value:.1f} cm2 on the level slice against "
                    f"{want:.1f} cm2 from its course along the spine ({g.near_mm:g}-{g.far_mm:g} mm above and below): "
                    f"{100 * change:.0f} % larger (> {100 * g.max_change:.0f} %): an organ lying on it is taken in")
    return None


def unseen_outline(mask: NDArray[np.bool_], hu: NDArray[np.float32], spacing: tuple[float, float], gate: Outline
                   ) -> float:
    """The share of ``mask``'s edge (its pixels beside the background) that no fat and no denser tissue lies within
    ``gate.reach_mm`` of: where the outline runs through tissue of the muscle's own density (an unenhanced organ, a
    vessel or another muscle touching it without a fat plane).  Denser is ``gate.dense_above_hu`` above the median HU
    inside ``mask`` (bone, an enhancing organ or vessel: its edge shows on a contrast scan and not on a plain one).
    The HU are smoothed by 0.7 mm first, so noise does not make fat or bone of soft tissue.  On pixels coarser than
    ``reach_mm`` / 1.5 the pixels next to the edge (diagonals included) are what may show it.  0 for an empty mask."""
    if not mask.any():
        return 0.0
    dy, dx = spacing
    smooth = ndi.gaussian_filter(hu.astype(np.float32), sigma=(0.7 / dy, 0.7 / dx))
    dense = float(np.median(hu[mask])) + gate.dense_above_hu
    shows = (smooth <= gate.fat_max_hu) | (smooth >= dense)
    edge = mask & ~ndi.binary_erosion(mask)
    # on coarse pixels the pixel beside the edge is the nearest that can show it, however far its centre lies
    far = ndi.distance_transform_edt(~shows, sampling=spacing) > max(gate.reach_mm, 1.5 * max(dy, dx))
    return float(np.count_nonzero(edge & far)) / float(np.count_nonzero(edge))


def outline_reason(key: str, unseen: float, gates: Gates, level: str) -> str | None:
    """Why ``key``'s area is not evaluable by its outline gate, given its :func:`unseen_outline` share (None: it
    passes or has no gate)."""
    for g in gates.outline:
        if g.key == key and g.level == level and unseen > g.max_unseen:
            return (f"{key.replace('_', ' ')}: {100 * unseen:.0f} % of its outline on the level slice runs through "
                    f"tissue of its own density, with no fat plane or bone within {g.reach_mm:g} mm (> "
                    f"{100 * g.max_unseen:.0f} %): organs or vessels touch it there and the image does not show where "
                    "it ends")
    return None


def metal_mm2(hu: NDArray[np.float32], body: NDArray[np.bool_], pixel_area_mm2: float, gates: Gates) -> float:
    """Area (mm2) of ``body`` above the metal threshold: implants (pedicle screws, rods, clips, a prosthesis)."""
    return float(np.count_nonzero((hu > gates.metal_hu) & body)) * pixel_area_mm2


def metal_in_volume(hu: NDArray[np.float32], first: int, pixel_area_mm2: float, gates: Gates) -> str | None:
    """Why the 3D volumes over ``hu`` (slices ``first``, ``first`` + 1, ...) are not evaluable: a slice holding
    more metal than the gate allows, anywhere in it; None without."""
    per = np.count_nonzero(hu > gates.metal_hu, axis=(1, 2)) * pixel_area_mm2
    hits = np.nonzero(per > gates.metal_max_mm2)[0]
    if not hits.size:
        return None
    return (f"implausible (metal): more than {gates.metal_max_mm2:g} mm2 of metal (implant) on {hits.size} slice(s) "
            f"of L5-L1 (first {first + int(hits[0])}): streak artefacts make the HU windows unreliable")


def apply_gates(level: str, areas: Mapping[str, Value], means: Mapping[str, Value], seg: SliceSegmentation,
                gates: Gates, metal_mm2: float = 0.0, neighbour_areas: Sequence[Mapping[str, float]] = (),
                neighbour_mm: float = 0.0, unseen: Mapping[str, float] | None = None
                ) -> tuple[dict[str, Value], dict[str, Value], list[dict[str, Any]]]:
    """Areas and mean HU with every value that fails a gate replaced by "not evaluable" (reason = the gate).

    ``metal_mm2``: the metal on the level slice (:func:`metal_mm2`).  ``neighbour_areas``: the named muscles'
    areas (cm2) on the slices just above and below the level slice, ``neighbour_mm`` away.  ``unseen``: the named
    muscles' :func:`unseen_outline` shares on the level slice."""
    a, m = dict(areas), dict(means)
    failed: list[dict[str, Any]] = []

    def fail(key: str, gate: str, reason: str, source: str) -> None:
        if key not in a or a[key].value is None:
            return
        text = f"implausible ({gate}): {reason}"
        a[key] = Value(None, a[key].unit, text)
        m[key] = Value(None, m[key].unit, text)
        failed.append({"key": key, "gate": gate, "reason": reason, "source": source})

    # the trunk outline: an arm that could not be cut off makes every whole-slice area wrong
    if seg.trunk_half_widths_mm is not None:
        lw, rw = seg.trunk_half_widths_mm
        ratio = max(lw, rw) / max(min(lw, rw), 1e-6)
        if ratio > gates.max_half_width_ratio:
            for key in WHOLE_SLICE:
                fail(key, "trunk symmetry", f"trunk half-widths left {lw:.0f} mm and right {rw:.0f} mm about the "
                     f"spine (ratio {ratio:.2f} > {gates.max_half_width_ratio}): an arm or other structure may be "
                     "joined to the trunk", gates.trunk_source)
    notch = seg.trunk_lateral_concavity
    if notch is not None and notch > gates.max_lateral_concavity:
        for key in WHOLE_SLICE:
            fail(key, "trunk outline", f"notches beside the trunk ({notch:.3f} of its area inside its convex hull, "
                 f"> {gates.max_lateral_concavity:g}): an arm lying against the trunk may not have been cut off",
                 gates.trunk_source)
    # metal on the level slice: its streaks move the HU of everything around it across the tissue windows
    if metal_mm2 > gates.metal_max_mm2:
        for key in list(a):
            fail(key, "metal", f"{metal_mm2:.0f} mm2 of metal (implant) on the level slice (> "
                 f"{gates.metal_max_mm2:g} mm2): streak artefacts make the HU windows unreliable; a reader can "
                 "confirm a level slice clear of it", gates.metal_source)
    # values are judged on what was measured, before any other gate removed a partner
    raw = {k: v.value for k, v in a.items()}
    raw_hu = {k: v.value for k, v in m.items()}
    for b in gates.ranges:
        if b.level != level:
            continue
        val = raw.get(b.key) if b.quantity == "area" else raw_hu.get(b.key)
        if val is None:
            continue
        unit = "cm2" if b.quantity == "area" else "HU"
        if not b.min <= val <= b.max:
            fail(b.key, f"{b.quantity} range", f"{b.quantity.replace('_', ' ')} {val:.1f} {unit} outside "
                 f"{b.min:g}..{b.max:g} {unit}", b.source)
    # areas as a share of a reference area on the same slice: the body cross-section, the vertebral body
    relative = ((gates.fractions, seg.body_area_cm2, "share of the body cross-section",
                 f"of the {seg.body_area_cm2 or 0:.0f} cm2 body cross-section"),
                (gates.vertebra_ratios, seg.vertebral_body_cm2, "size against the vertebral body",
                 f"times the {seg.vertebral_body_cm2 or 0:.1f} cm2 vertebral body"))
    for bounds, reference, check, against in relative:
        for b in bounds:
            val = raw.get(b.key)
            if b.level != level or val is None or not reference:
                continue
            f = val / reference
            if not b.min <= f <= b.max:
                fail(b.key, check, f"{val:.1f} cm2 is {f:.2f} {against} (plausible {b.min:g}..{b.max:g})", b.source)
    # a muscle's cross-section changes by a few per cent per centimetre along the spine: a level slice whose area
    # differs much from the slices next to it (or a muscle not found there) is an outline that is not stable here
    for c in gates.consistency:
        val = raw.get(c.key)
        if c.level != level or val is None:
            continue
        near = [n[c.key] for n in neighbour_areas if c.key in n]
        if not near:
            continue
        name = c.key.replace("_", " ")
        if min(near) <= 0.0:
            fail(c.key, "slice consistency", f"{name} not found on a slice next to the level slice "
                 f"({neighbour_mm:.1f} mm away): its outline on the level slice is not trusted", c.source)
            continue
        ref = float(np.mean(near))
        change = abs(val - ref) / ref
        if change > c.max_change:
            fail(c.key, "slice consistency", f"{name} {val:.1f} cm2 on the level slice against {ref:.1f} cm2 on "
                 f"the slices next to it ({neighbour_mm:.1f} mm away): {100 * change:.0f} % apart (> "
                 f"{100 * c.max_change:.0f} %)", c.source)
    # an outline the image does not show (organs of the muscle's density touching it all round) is the segmenter's
    # guess, however plausible its area
    for key, share in (unseen or {}).items():
        why = outline_reason(key, share, gates, level) if raw.get(key) is not None else None
        if why:
            fail(key, "outline", why, next(g.source for g in gates.outline if g.key == key))
    for s in gates.symmetry:
        if s.left not in a or s.right not in a:
            continue
        lv, rv = raw.get(s.left), raw.get(s.right)
        if (lv is None) != (rv is None):
            # a paired muscle found on one side only: that find is not trusted either
            found, other = (s.left, s.right) if lv is not None else (s.right, s.left)
            if "field of view" in a[other].reason:  # cut off by the image edge: the found side stands
                continue
            fail(found, "left/right symmetry", f"{other.replace('_', ' ')} not evaluable "
                 f"({a[other].reason}): a one-sided find is not trusted", s.source)
            continue
        if lv is None or rv is None:
            continue
        ratio = max(lv, rv) / max(min(lv, rv), 1e-6)
        if ratio > s.max_ratio:
            why = f"left {lv:.1f} cm2 and right {rv:.1f} cm2 differ by a factor {ratio:.2f} (> {s.max_ratio:g})"
            fail(s.left, "left/right symmetry", why, s.source)
            fail(s.right, "left/right symmetry", why, s.source)
    return a, m, failed
