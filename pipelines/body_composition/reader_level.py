"""A reader-confirmed level: a radiologist names the L3 (or C3) slice and the pipeline measures there.

The override reaches the pipeline as the option ``level_override`` (set per job by the node or
by ``prognode run --level``, never in a config file)::

    {"level": "L3", "sop_instance_uid": "1.2...", "reader": "Family^Given",
     "source": "ohif-sr" | "cli" | "api", "time": "2026-12-05T21:40:00Z",
     "marker_sop_instance_uid": "1.2..."}          # the viewer's SR, when it came from one

:func:`level_from_override` turns it into a :class:`LevelResult` with ``method="reader"``: the
slice is the reader's, never the automatic finder's.  The automatic finder still runs, for the
vertebral body centre and size that the tissue segmenter needs on that slice, and to say where
it would have put the level (a note, not a decision).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pipelines.base import NotEvaluable, StageError
from pipelines.body_composition.types import LevelResult
from pipelines.common.volume import Volume

log = logging.getLogger(__name__)

LEVELS = ("L3", "C3")
SOURCES = ("ohif-sr", "cli", "api")
METHOD = "reader"


@dataclass(frozen=True)
class LevelOverride:
    """The reader's level and slice, who confirmed it, from where and when."""

    level: str
    sop_instance_uid: str
    reader: str = ""  # DICOM person name (Family^Given); empty when the source did not name one
    source: str = "api"
    time: str = ""  # ISO 8601, UTC
    marker_sop_instance_uid: str = ""  # the viewer's SR (source "ohif-sr")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "level_override") -> LevelOverride:
        """Validate ``raw``; ``ValueError`` naming the field otherwise."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a table, got {raw!r}")
        known = {"level", "sop_instance_uid", "reader", "source", "time", "marker_sop_instance_uid"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        level = str(raw.get("level", ""))
        if level not in LEVELS:
            raise ValueError(f"{where}.level: {level!r}; a reader may confirm {' or '.join(LEVELS)}")
        sop = str(raw.get("sop_instance_uid", "") or "").strip()
        if not sop:
            raise ValueError(f"{where}.sop_instance_uid: required")
        source = str(raw.get("source", "api"))
        if source not in SOURCES:
            raise ValueError(f"{where}.source: {source!r} not in {SOURCES}")
        time = str(raw.get("time", "") or "") or now_iso()
        return cls(level=level, sop_instance_uid=sop, reader=str(raw.get("reader", "") or "").strip(),
                   source=source, time=time, marker_sop_instance_uid=str(raw.get("marker_sop_instance_uid", "") or ""))

    def as_json(self) -> dict[str, str]:
        return {"level": self.level, "sop_instance_uid": self.sop_instance_uid, "reader": self.reader,
                "source": self.source, "time": self.time, "marker_sop_instance_uid": self.marker_sop_instance_uid}

    def describe(self, instance_number: int | None = None) -> str:
        """One sentence for the SR and the logs."""
        image = f"image {self.sop_instance_uid}" + (f" (instance {instance_number})" if instance_number else "")
        who = f"by {self.reader}" if self.reader else "by a reader who was not named"
        via = {"ohif-sr": f"a measurement labelled {self.level} saved in the viewer"
                          + (f" (SR {self.marker_sop_instance_uid})" if self.marker_sop_instance_uid else ""),
               "cli": "the command line (prognode run --level)",
               "api": "the REST API (POST /api/series/{uid}/level)"}[self.source]
        return f"Reader-confirmed level {self.level} on {image}, {who}, at {self.time}, from {via}"


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def slice_of(volume: Volume, sop_instance_uid: str) -> int:
    """Index into ``volume`` of the image ``sop_instance_uid``; StageError when the series lacks it."""
    for k, s in enumerate(volume.slices):
        if str(s.dataset.get("SOPInstanceUID", "")) == sop_instance_uid:
            return k
    raise StageError("reader-level", volume.series_uid,
                     f"the reader's image {sop_instance_uid} is not an image of this series")


def level_from_override(volume: Volume, override: LevelOverride, automatic: LevelResult) -> LevelResult:
    """The reader's level on the reader's slice, with the automatic finder's vertebrae for anatomy.

    ``automatic`` is what the automatic finder found (it names the level it would have chosen, and
    gives the vertebral body centre and size near the slice).  Where it names the reader's slice
    differently, its names are dropped (they would put L1-L5 elsewhere) and a note says so.
    Raises :class:`NotEvaluable` when no vertebral body was found at all (nothing to centre on).
    """
    k = slice_of(volume, override.sop_instance_uid)
    notes = [override.describe(volume.instance_number(k))]

    def image(i: int) -> str:  # as a viewer numbers it (the volume is on patient axes: its index is not)
        return volume.slices_label(i, fallback=" from the feet")

    if not automatic.vertebrae:
        raise NotEvaluable(f"reader-confirmed level {override.level} on {image(k)}: no vertebral body found "
                           f"in the series to centre the muscle compartments on ({'; '.join(automatic.notes)})",
                           stage="reader-level")
    here = next((v for v in automatic.vertebrae if v.first <= k <= v.last), None)
    auto = (f"the automatic finder chose {automatic.level} on {image(automatic.slice_index)}"
            if automatic.level is not None and automatic.slice_index is not None
            else f"the automatic finder found no level ({'; '.join(automatic.notes) or 'no reason given'})")
    notes.append(auto)
    vertebrae = automatic.vertebrae
    if here is None or here.name != override.level:
        named = f"names that vertebra {here.name}" if here is not None and here.name else "names no vertebra there"
        notes.append(f"the automatic finder {named}: its vertebra names are not used (no 3D lumbar volumes)")
        vertebrae = tuple(replace(v, name="") for v in automatic.vertebrae)
    log.info("series %s: %s", volume.series_uid, notes[0])
    # the traced body and canal lines are the anatomy the tissue rules place their compartments by, slice by slice
    # (without them each slice took its vertebra's one centre and size and no canal)
    return LevelResult(level=override.level, slice_index=k, vertebrae=vertebrae,
                       spine_centre_rc=automatic.spine_centre_rc, notes=tuple(notes), method=METHOD,
                       body_line=automatic.body_line, body_size_mm=automatic.body_size_mm,
                       canal_line=automatic.canal_line)


def level_source(override: LevelOverride | None) -> dict[str, Any]:
    """The summary's ``level_source``."""
    if override is None:
        return {"method": "automatic"}
    return {"method": METHOD, **override.as_json()}
