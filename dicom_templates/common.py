"""Pieces shared by the SEG and SR builders: the algorithm and the writer's identity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import generate_uid

from dicom_templates import codes
from dicom_templates.identity import Identity


@dataclass(frozen=True)
class Algorithm:
    """The algorithm that produced a result (SEG Segment Algorithm Identification; SR TID 4019).

    ``family`` is a concept key of the code table (CID 7162, e.g. ``"family-histogram"``,
    ``"family-ai"``).  ``parameters`` are written as name=value strings.
    """

    name: str
    version: str
    family: str = "family-histogram"
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("Algorithm needs a name and a version")
        codes.concept(self.family)  # KeyError naming an unknown family

    def seg_identification(self) -> hd.AlgorithmIdentificationSequence:
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=codes.concept(self.family),
            version=self.version,
            parameters={str(k): str(v) for k, v in self.parameters.items()} or None,
        )

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[f"{k}={v}" for k, v in self.parameters.items()] or None,
        )


def check_identity(identity: Identity) -> None:
    """Refuse empty identity fields: no placeholder manufacturer, version or serial."""
    for name in ("manufacturer", "software_version", "device_serial_number"):
        if not str(getattr(identity, name)).strip():
            raise ValueError(f"Identity.{name} is empty: configure [output] / [node] (no placeholders)")


def contributing_equipment(identity: Identity, algorithm: Algorithm) -> hd.ContributingEquipment:
    """Contributing Equipment item naming this node as the processing equipment."""
    return hd.ContributingEquipment(
        manufacturer=identity.manufacturer,
        purpose_of_reference=dcm_codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution_name or None,
        contribution_description=f"{algorithm.name} {algorithm.version}",
    )


def device_uid(identity: Identity) -> str:
    """A stable Device Observer UID for this node, derived from manufacturer and serial."""
    return str(generate_uid(entropy_srcs=["prognode-device", identity.manufacturer, identity.device_serial_number]))


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1) that
# highdicom copies from the first source: a source that lacks one gets it empty, which is
# what Type 2 means for "unknown".
_TYPE2_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def with_type2(ds: Dataset) -> Dataset:
    """``ds`` itself, or a copy of its elements with missing Patient/Study Type 2 attributes empty.

    The input dataset is never modified.
    """
    missing = [kw for kw in _TYPE2_SOURCE if kw not in ds]
    if not missing:
        return ds
    out = Dataset({tag: elem for tag, elem in ds.items()})
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    for kw in missing:
        setattr(out, kw, "")
    return out
