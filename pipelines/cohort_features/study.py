"""What a study folder holds: its CT series (with the contrast phase each looks like) and ROI objects.

Headers only are read.  The phase of a CT series comes from its Series Description (and Contrast/
Bolus Agent Phase where present): ``arterial`` or ``portal``; anything else is unnamed.  A folder
with one series of each named phase is a dual-phase study.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom

from pipelines.base import SeriesInput
from pipelines.common.volume import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from pipelines.roi.mask import ROI_SOP_CLASSES

ARTERIAL = re.compile(r"arter|\bart\b|\bhat\b|\blat\b", re.IGNORECASE)
PORTAL = re.compile(r"portal|venous|\bpv\b|\bpvp\b", re.IGNORECASE)


@dataclass(frozen=True)
class CtSeries:
    series: SeriesInput
    description: str
    phase: str  # "arterial", "portal" or ""


@dataclass(frozen=True)
class StudyFolder:
    name: str
    path: Path
    ct: tuple[CtSeries, ...]  # largest first
    rois: tuple[Path, ...]  # SEG / RTSTRUCT objects

    def phase(self, phase: str) -> CtSeries | None:
        found = [s for s in self.ct if s.phase == phase]
        return found[0] if len(found) == 1 else None

    @property
    def dual_phase(self) -> bool:
        return self.phase("arterial") is not None and self.phase("portal") is not None

    def body_series(self) -> CtSeries | None:
        """The series body composition is measured on: the portal phase of a dual-phase study, else the largest."""
        return self.phase("portal") if self.dual_phase else (self.ct[0] if self.ct else None)


def phase_of(description: str) -> str:
    if ARTERIAL.search(description) and not PORTAL.search(description):
        return "arterial"
    if PORTAL.search(description) and not ARTERIAL.search(description):
        return "portal"
    return ""


def scan(folder: Path) -> StudyFolder:
    """Classify every DICOM file under ``folder`` (any names, any nesting)."""
    files: dict[str, list[Path]] = defaultdict(list)
    described: dict[str, str] = {}
    study: dict[str, str] = {}
    rois: list[Path] = []
    tags = ["SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "SeriesDescription", "ContrastBolusAgentPhase"]
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=tags)
        except Exception:
            continue
        cls = str(ds.get("SOPClassUID", ""))
        if cls in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
            uid = str(ds.get("SeriesInstanceUID", ""))
            files[uid].append(f)
            described[uid] = f"{ds.get('SeriesDescription', '')} {ds.get('ContrastBolusAgentPhase', '')}".strip()
            study[uid] = str(ds.get("StudyInstanceUID", ""))
        elif cls in ROI_SOP_CLASSES:
            rois.append(f)
    ct = [CtSeries(SeriesInput(uid, study[uid], tuple(fs)), described[uid], phase_of(described[uid]))
          for uid, fs in files.items()]
    ct.sort(key=lambda s: -len(s.series.files))
    return StudyFolder(folder.name, folder, tuple(ct), tuple(rois))
