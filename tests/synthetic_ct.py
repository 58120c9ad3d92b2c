"""Small synthetic CT studies for sweep tests and the sweep benchmark (pydicom only, no model data).

Each slice is a valid CT Image Storage instance (Explicit VR Little Endian) with a body-like disc
of soft tissue in air; UIDs are derived deterministically from a seed so that runs are reproducible.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

PREFIX = "1.2.826.0.1.3680043.10.1342."  # test-only UID root (pydicom's org root + suffix)


@dataclass(frozen=True)
class SyntheticStudy:
    study_uid: str
    series_uids: tuple[str, ...]
    files: tuple[Path, ...]
    study_date: str


def _uid(*parts: object) -> str:
    return generate_uid(prefix=PREFIX, entropy_srcs=[str(p) for p in parts])


def write_study(folder: Path, index: int, study_date: dt.date, series: int = 1, slices: int = 4,
                size: int = 16, seed: str = "prognode") -> SyntheticStudy:
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = _uid(seed, "study", index)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (size * 0.4) ** 2
    files: list[Path] = []
    series_uids: list[str] = []
    for s in range(series):
        series_uid = _uid(seed, "series", index, s)
        series_uids.append(series_uid)
        frame_uid = _uid(seed, "frame", index, s)
        for k in range(slices):
            sop = _uid(seed, "sop", index, s, k)
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = sop
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_uid
            ds.PatientName = f"Sweep^Phantom{index:03d}"
            ds.PatientID = f"SWEEP{index:04d}"
            ds.PatientBirthDate = "19600101"
            ds.PatientSex = "O"
            ds.StudyDate = study_date.strftime("%Y%m%d")
            ds.StudyTime = "080000"
            ds.SeriesDate = ds.StudyDate
            ds.AccessionNumber = f"ACC{index:05d}"
            ds.StudyID = str(index)
            ds.ReferringPhysicianName = ""
            ds.Modality = "CT"
            ds.Manufacturer = "prognode-tests"
            ds.SeriesNumber = s + 1
            ds.SeriesDescription = f"synthetic {s + 1}"
            ds.InstanceNumber = k + 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.PatientPosition = "FFS"
            ds.ImagePositionPatient = [0.0, 0.0, float(-2.0 * k)]
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
            ds.PixelSpacing = [1.0, 1.0]
            ds.SliceThickness = 2.0
            ds.KVP = 120
            ds.PositionReferenceIndicator = ""
            ds.AcquisitionNumber = 1
            ds.Laterality = ""
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = size
            ds.Columns = size
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept = 0
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
            img = np.where(disc, 40 + 5 * k, -1000).astype(np.int16)
            ds.PixelData = img.tobytes()
            path = folder / f"study{index:03d}_s{s}_{k:03d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return SyntheticStudy(study_uid, tuple(series_uids), tuple(files), study_date.strftime("%Y%m%d"))


def write_studies(folder: Path, count: int, first_date: dt.date, series: int = 1, slices: int = 4,
                  size: int = 16, seed: str = "prognode") -> list[SyntheticStudy]:
    """``count`` studies, one per day from ``first_date``."""
    return [write_study(folder, i, first_date + dt.timedelta(days=i % 5), series, slices, size, seed)
            for i in range(count)]
