"""Small synthetic CT studies with known truth for the tumour pipelines (written with highdicom/pydicom)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from pipelines.base import Identity

IDENTITY = Identity(manufacturer="prognode-tests", software_version="0.1.0", device_serial_number="TEST-0001")


def sphere_phantom(shape: tuple[int, int, int], spacing: tuple[float, float, float], radius_mm: float,
                   centre: Sequence[float] | None = None, body_radius_mm: float | None = None,
                   tumour_hu: float = 60.0, seed: int = 0) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """HU volume (body cylinder of soft tissue with fat, tumour sphere) and the tumour mask."""
    z, y, x = (np.indices(shape).astype(np.float64).T * 1.0).T
    c = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape])
    dz, dy, dx = ((z - c[0]) * spacing[0], (y - c[1]) * spacing[1], (x - c[2]) * spacing[2])
    tumour = dz**2 + dy**2 + dx**2 <= radius_mm**2
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0)
    rb = body_radius_mm if body_radius_mm is not None else 0.45 * shape[1] * spacing[1]
    body = dy**2 + dx**2 <= rb**2
    hu[body] = 40.0
    hu[body & (dy**2 + dx**2 > (0.8 * rb) ** 2)] = -100.0  # subcutaneous fat
    hu[tumour] = tumour_hu
    hu += rng.normal(0, 12, shape)
    return hu.astype(np.float32), tumour


def write_ct(hu: NDArray[np.float32], spacing: tuple[float, float, float], folder: Path,
             origin: Sequence[float] = (-100.0, -100.0, 0.0), study_uid: str | None = None,
             frame_of_reference: str | None = None, description: str = "phantom", series_number: int = 1,
             patient_id: str = "PHANTOM1") -> list[Path]:
    """Write ``hu`` (z, y, x) as an axial CT series, slice k at z = origin_z + k * dz."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or hd.UID()
    series_uid, for_uid = hd.UID(), frame_of_reference or hd.UID()
    paths = []
    for k in range(hu.shape[0]):
        meta = FileMetaDataset()
        sop = hd.UID()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Tumour", patient_id, "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "A1", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = "CT", series_number, k + 1, description
        ds.Manufacturer, ds.PatientPosition = "phantom", "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[0]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP, ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = 120, "20260101", "120000", 1
        ds.PixelData = np.round(hu[k] + 1024).astype(np.int16).tobytes()
        p = folder / f"ct_{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def write_seg(ct_files: Sequence[Path], mask: NDArray[np.bool_], path: Path, label: str = "Tumour") -> Path:
    """A BINARY SEG of ``mask`` (z, y, x in slice order of ``ct_files``) written by 'another tool'."""
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(f) for f in ct_files]
    sources.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="other tool", manufacturer_model_name="drawer", software_versions="1",
        device_serial_number="X1",
    )
    seg.save_as(path)
    return path
