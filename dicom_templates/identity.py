"""Who writes the DICOM objects and which earlier results they supersede.

These two records belong to the lowest layer: the SEG/SR builders need them, pipelines fill
them in and the node configures them.  ``pipelines.base`` re-exports both, so
``from pipelines.base import Identity, Predecessor`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Identity", "Predecessor"]


@dataclass(frozen=True)
class Predecessor:
    """An earlier result that a re-run supersedes (SR Predecessor Documents Sequence)."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Identity:
    """Who wrote the objects: from config [output] and [node], never placeholders."""

    manufacturer: str
    software_version: str
    device_serial_number: str
    institution_name: str = ""
    seg_series_number: int = 9101
    sr_series_number: int = 9102
    map_series_number: int = 9103
    sc_series_number: int = 9104  # Secondary Capture key images
    pdf_series_number: int = 9105  # Encapsulated PDF report
