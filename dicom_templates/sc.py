"""Secondary Capture key images: the result burned into pixels, for PACS that show neither SEG nor SR.

IOD: Secondary Capture Image (PS3.3 A.8.1; SOP Class 1.2.840.10008.5.1.4.1.1.7), built with
highdicom's :class:`highdicom.sc.SCImage`: one single-frame RGB instance per key slice, Patient
and General Study modules copied from the source CT (the same patient and study as the SEG/SR),
a new series (``Identity.sc_series_number``), Contributing Equipment naming this node and the
algorithm.  Pixel Spacing is left out on purpose: the picture is a rendering (CT plus a text
panel), so nobody may measure on it.  Burned In Annotation is YES (PS3.3 C.7.6.1): the picture
carries text (it holds no patient name, only values, the model and "NOT FOR DIAGNOSIS"); Image
Laterality is U (unpaired), which is what a CT slice of the trunk or neck shows.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicom_templates.common import Algorithm, check_identity, contributing_equipment, with_type2
from dicom_templates.identity import Identity

__all__ = ["build_key_image", "patient_orientation"]

_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x / +y, -y / +z, -z in LPS


def _letter(direction: tuple[float, float, float]) -> str:
    """The PatientOrientation letter of the main axis of a unit vector in LPS (PS3.3 C.7.6.1.1.1)."""
    axis = int(np.argmax(np.abs(direction)))
    plus, minus = _LETTERS[axis]
    return plus if direction[axis] > 0 else minus


def patient_orientation(ref: Dataset) -> tuple[str, str]:
    """(row direction, column direction) letters of a CT image from its ImageOrientationPatient."""
    iop = [float(v) for v in ref.ImageOrientationPatient]
    return _letter((iop[0], iop[1], iop[2])), _letter((iop[3], iop[4], iop[5]))


def build_key_image(ref: Dataset, rgb: NDArray[np.uint8], algorithm: Algorithm, identity: Identity,
                    series_uid: str, instance_number: int, series_description: str) -> hd.sc.SCImage:
    """One SC instance of ``rgb`` (rows x columns x 3, uint8), rendered from the CT image ``ref``.

    ``rgb`` must keep ``ref``'s orientation (rows and columns of the picture's CT part run as the
    CT's), so the Patient Orientation copied from ``ref`` holds for it.
    """
    check_identity(identity)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"SC key image: expected rows x columns x 3 uint8 pixels, got {rgb.shape} {rgb.dtype}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_type2(ref),
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=identity.sc_series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=identity.manufacturer,
        patient_orientation=patient_orientation(ref),
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        contributing_equipment=[contributing_equipment(identity, algorithm)],
        series_description=series_description[:64],
        manufacturer_model_name=algorithm.name[:64],
        software_versions=identity.software_version,
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution_name or None,
    )
    # General Image module attributes highdicom does not take (PS3.3 C.7.6.1, both Type 3):
    sc.BurnedInAnnotation = "YES"  # the pixels carry text
    sc.ImageLaterality = "U"  # unpaired: a CT slice of the trunk or neck (so General Series Laterality is not needed)
    return sc
