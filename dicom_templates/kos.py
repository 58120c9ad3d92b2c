"""IOCM rejection note: a Key Object Selection Document "Rejected for Quality Reasons".

IOD: Key Object Selection Document (PS3.3 A.35.4), content by TID 2010 "Key Object Selection"
(PS3.16), document title from CID 7011 "Rejected for Quality Reasons" (DCM 113001), as IHE
Radiology IOCM (Imaging Object Change Management) asks of a rejection: the KOS references every
rejected instance in its content and in the Current Requested Procedure Evidence Sequence, in the
study of those instances.  Built by :class:`highdicom.ko.KeyObjectSelectionDocument`; the title
comes from ``codes.toml``.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from dicom_templates import codes
from dicom_templates.common import check_identity, device_uid, with_type2
from dicom_templates.identity import Identity

__all__ = ["build_rejection_kos"]

MAX_DESCRIPTION = 1024  # Key Object Description is a TEXT item (TID 2010 row 3)


def build_rejection_kos(rejected: Sequence[Dataset], identity: Identity, series_number: int, reason: str,
                        series_instance_uid: str | None = None,
                        sop_instance_uid: str | None = None) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS that rejects ``rejected`` (the SEG/SR datasets of one study) for quality reasons.

    ``reason`` goes in the Key Object Description (TID 2010 row 3); the observer is this node as a
    device (TID 1002 via TID 2010 row 2: Device Observer UID, manufacturer, serial number)."""
    check_identity(identity)
    if not rejected:
        raise ValueError("a rejection note needs at least one rejected instance")
    studies = {str(ds.StudyInstanceUID) for ds in rejected}
    if len(studies) != 1:
        raise ValueError(f"the rejected instances span {len(studies)} studies; a rejection note covers one study")
    if not reason.strip():
        raise ValueError("a rejection note needs a reason")
    evidence = [with_type2(ds) for ds in rejected]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(identity), manufacturer_name=identity.manufacturer,
        serial_number=identity.device_serial_number)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.concept("rejected-for-quality-reasons"),
        referenced_objects=evidence,
        observer_device_context=hd.sr.ObserverContext(observer_type=dcm_codes.DCM.Device,
                                                      observer_identifying_attributes=device),
        description=reason.strip()[:MAX_DESCRIPTION],
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=identity.manufacturer,
        institution_name=identity.institution_name or None,
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        series_description="Rejected for Quality Reasons (prognode retraction)",
    )
