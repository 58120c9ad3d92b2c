"""Encapsulated PDF report: the key images as a PDF, for PACS and RIS that file documents.

IOD: Encapsulated PDF (PS3.3 A.45.1; SOP Class 1.2.840.10008.5.1.4.1.1.104.1).  highdicom has no
builder for it, so :class:`EncapsulatedPDF` is a thin :class:`highdicom.base.SOPClass` (which writes
the Patient, General Study, General Equipment and SOP Common modules and the series attributes,
from the source CT: the same patient and study as the SEG/SR) plus the two modules highdicom lacks:
SC Equipment (PS3.3 C.8.6.1: Conversion Type SYN, a synthetic document) and Encapsulated
Document (PS3.3 C.24.2: the PDF, its MIME type and length, the title, Burned In Annotation YES).
Modality DOC (Encapsulated Document Series, C.24.1), a new series (``Identity.pdf_series_number``).
"""

from __future__ import annotations

import datetime as dt

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage

from dicom_templates.common import Algorithm, check_identity, contributing_equipment, with_type2
from dicom_templates.identity import Identity

__all__ = ["EncapsulatedPDF", "build_pdf_report"]


class EncapsulatedPDF(hd.base.SOPClass):
    """An Encapsulated PDF instance (PS3.3 A.45.1)."""

    def __init__(self, ref: Dataset, pdf: bytes, title: str, series_uid: str, series_number: int,
                 identity: Identity, algorithm: Algorithm) -> None:
        src = with_type2(ref)
        now = dt.datetime.now()
        super().__init__(
            study_instance_uid=str(src.StudyInstanceUID), series_instance_uid=series_uid,
            series_number=series_number, sop_instance_uid=hd.UID(), sop_class_uid=EncapsulatedPDFStorage,
            instance_number=1, modality="DOC", manufacturer=identity.manufacturer,
            transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian
            patient_id=src.PatientID, patient_name=src.PatientName, patient_birth_date=src.PatientBirthDate,
            patient_sex=src.PatientSex, accession_number=src.AccessionNumber, study_id=src.StudyID,
            study_date=src.StudyDate, study_time=src.StudyTime, referring_physician_name=src.ReferringPhysicianName,
            series_description=title[:64], manufacturer_model_name=algorithm.name[:64],
            software_versions=identity.software_version, device_serial_number=identity.device_serial_number,
            institution_name=identity.institution_name or None, content_date=now.date(), content_time=now.time(),
        )
        self.ContributingEquipmentSequence = [contributing_equipment(identity, algorithm)]
        # SC Equipment (C.8.6.1): a synthetic document made by this software
        self.ConversionType = "SYN"
        # Encapsulated Document (C.24.2)
        self.AcquisitionDateTime = ""  # Type 2: not acquired
        self.BurnedInAnnotation = "YES"  # the document names the study's values
        self.DocumentTitle = title[:64]
        self.ConceptNameCodeSequence: list[Dataset] = []  # Type 2: no coded title
        self.MIMETypeOfEncapsulatedDocument = "application/pdf"
        self.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")  # OB: even length
        self.EncapsulatedDocumentLength = len(pdf)  # the PDF's own length, without the pad byte


def build_pdf_report(ref: Dataset, pdf: bytes, algorithm: Algorithm, identity: Identity, title: str) -> EncapsulatedPDF:
    """The report ``pdf`` (bytes of a PDF file) as an Encapsulated PDF of ``ref``'s study, in a new series."""
    check_identity(identity)
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("Encapsulated PDF: the document is not a PDF (no %PDF- header)")
    return EncapsulatedPDF(ref, pdf, title, hd.UID(), identity.pdf_series_number, identity, algorithm)
