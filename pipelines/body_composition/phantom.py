"""Schematic abdominal CT phantoms with known truth, written as real DICOM CT series.

Schematic: it tests bookkeeping (areas, SEG/SR round trips, the training path), not anatomy.
For anatomy-true phantoms built around real spines (ribs, pelvis, organs touching the muscles,
arms, habitus, contrast, every patient position) use :mod:`.anatomy_phantom`.

The phantom is schematic but anatomically ordered, so the weight-free level finder can
count: a wide sacrum at the bottom, L5..L1 above it, then T12 and T11 with rib heads beside
the vertebral body; discs (soft tissue) between vertebral bodies.  Every slice carries a
body ellipse, a ring of subcutaneous fat, an abdominal-wall muscle ring, visceral fat with
an organ and a gas bubble, the psoas (lumbar levels only) and the erector spinae, with
intermuscular fat blobs in the erector spinae and the wall.  Truth is the painted label
map, so areas are pixel counts and mean HU is the mean over the truth mask.

Labels (``Truth.labels``): see :data:`LABELS`.  Geometry is LPS: columns increase to the
patient's left, rows increase posteriorly, slices are stored from feet to head.

Use::

    truth = write_phantom(PhantomSpec(), out_dir)        # out_dir/CT0001.dcm ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LABELS: Mapping[str, int] = {
    "muscle_other": 1,
    "psoas_left": 2,
    "psoas_right": 3,
    "erector_left": 4,
    "erector_right": 5,
    "sat": 6,
    "vat": 7,
    "imat": 8,
    "bone": 10,
    "organ": 11,
    "gas": 12,
    "disc": 13,
    "canal": 14,
    "erector_fat_left": 15,
    "erector_fat_right": 16,
}
MUSCLE_LABELS = (1, 2, 3, 4, 5)
# a structure as the pipeline measures it, as labels: the erector is its compartment (its IMAT in; see
# tissues.py), and that fat is IMAT as well
PARTS: Mapping[str, tuple[str, ...]] = {
    "erector_left": ("erector_left", "erector_fat_left"),
    "erector_right": ("erector_right", "erector_fat_right"),
    "imat": ("imat", "erector_fat_left", "erector_fat_right"),
}


def _ids(name: str) -> list[int]:
    return [LABELS[n] for n in PARTS.get(name, (name,))]

HU = {
    "air": -1000.0, "fat": -100.0, "imat": -80.0, "muscle": 45.0, "psoas": 50.0, "erector": 40.0,
    "bone": 400.0, "organ": 60.0, "gas": -950.0, "disc": 90.0, "canal": 15.0,
}


@dataclass(frozen=True)
class PhantomSpec:
    size: int = 128  # rows = columns
    pixel_mm: float = 3.0
    slice_mm: float = 5.0
    vertebra_mm: float = 25.0
    disc_mm: float = 10.0
    sacrum_mm: float = 30.0
    thoracic: int = 2  # T12, T11, ... above L1 (rib-bearing)
    with_sacrum: bool = True
    with_ribs: bool = True
    body_semi_mm: tuple[float, float] = (165.0, 130.0)  # (x, y) semi-axes of the body ellipse
    sat_mm: float = 20.0
    wall_mm: float = 15.0
    truncate: bool = False  # body wider than the field of view
    tilt_deg: float = 0.0  # gantry tilt: slice planes rotated about the x axis
    noise_sd: float = 0.0
    seed: int = 0
    sex: str | None = "M"
    height_m: float | None = 1.75
    weight_kg: float | None = 80.0
    age: str | None = "060Y"
    modality: str = "CT"
    region: str = "abdomen"  # or "neck": T2, T1 (rib-bearing), C7..C3, C2 (tall) from feet to head
    patient_id: str = "PHANTOM-001"
    patient_name: str = "Phantom^Abdomen"


@dataclass
class Truth:
    labels: NDArray[np.uint8]  # (slices, rows, columns), slices feet -> head
    hu: NDArray[np.float32]
    levels: list[str]  # per slice: "L3", "L3-L4" (disc), "S" ...
    level_slices: dict[str, int]  # vertebra -> middle slice index
    pixel_area_mm2: float
    slice_mm: float
    files: list[Path] = field(default_factory=list)
    series_uid: str = ""
    study_uid: str = ""

    def area_cm2(self, name: str, k: int) -> float:
        return float(np.count_nonzero(np.isin(self.labels[k], _ids(name)))) * self.pixel_area_mm2 / 100.0

    def muscle_area_cm2(self, k: int) -> float:
        return float(np.count_nonzero(np.isin(self.labels[k], MUSCLE_LABELS))) * self.pixel_area_mm2 / 100.0

    def mean_hu(self, name: str, k: int) -> float:
        return float(self.hu[k][np.isin(self.labels[k], _ids(name))].mean())

    def muscle_mean_hu(self, k: int) -> float:
        return float(self.hu[k][np.isin(self.labels[k], MUSCLE_LABELS)].mean())

    def volume_cm3(self, name: str, k0: int, k1: int) -> float:
        """Volume of a label over slices k0..k1 inclusive."""
        n = np.count_nonzero(np.isin(self.labels[k0 : k1 + 1], _ids(name)))
        return float(n) * self.pixel_area_mm2 * self.slice_mm / 1000.0


def _layout(spec: PhantomSpec) -> list[tuple[str, bool]]:
    """(level name, is vertebral body) per slice, feet -> head."""
    names = ["L5", "L4", "L3", "L2", "L1"] + [f"T{12 - i}" for i in range(spec.thoracic)]
    out: list[tuple[str, bool]] = []

    def add(name: str, mm: float, body: bool) -> None:
        out.extend([(name, body)] * max(1, int(round(mm / spec.slice_mm))))

    add("below", spec.disc_mm, False)
    if spec.region == "neck":
        neck = ["T2", "T1", "C7", "C6", "C5", "C4", "C3", "C2"]
        for i, name in enumerate(neck):
            add(name, spec.vertebra_mm * (1.8 if name == "C2" else 1.0), True)
            add(f"{name}-{neck[i + 1]}" if i + 1 < len(neck) else "above", spec.disc_mm, False)
        return out
    if spec.with_sacrum:
        add("S", spec.sacrum_mm, True)
        add("L5-S", spec.disc_mm, False)
    for i, name in enumerate(names):
        add(name, spec.vertebra_mm, True)
        add(f"{name}-{names[i + 1]}" if i + 1 < len(names) else "above", spec.disc_mm, False)
    return out


def _paint_slice(spec: PhantomSpec, level: str, body: bool, x: NDArray[np.float64], y: NDArray[np.float64]
                 ) -> NDArray[np.uint8]:
    lab = np.zeros(x.shape, dtype=np.uint8)
    L = LABELS

    def ell(cx: float, cy: float, ax: float, ay: float) -> NDArray[np.bool_]:
        return np.asarray(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0)

    bx, by = spec.body_semi_mm
    s, w = spec.sat_mm, spec.wall_mm
    lab[ell(0, 0, bx, by)] = L["sat"]
    lab[ell(0, 0, bx - s, by - s)] = L["muscle_other"]
    lab[ell(0, 0, bx - s - w, by - s - w)] = L["vat"]
    lab[ell(0, -60, 45, 30)] = L["organ"]
    lab[ell(-10, -60, 10, 10)] = L["gas"]
    lab[ell(0, -(by - s - w / 2), 3.5, 3.5)] = L["imat"]  # in the anterior wall
    lumbar_or_disc = level[:1] == "L"
    sacral = level == "S"
    # psoas beside the lumbar spine (grows caudally)
    if lumbar_or_disc:
        grow = {"L1": 0.7, "L2": 0.8, "L3": 0.9, "L4": 1.0, "L5": 1.05}.get(level.split("-")[0], 0.9)
        for side, lbl in ((1, L["psoas_left"]), (-1, L["psoas_right"])):
            lab[ell(side * 52, 32, 16 * grow, 20 * grow)] = lbl
    for side, lbl, fat in ((1, L["erector_left"], L["erector_fat_left"]), (-1, L["erector_right"], L["erector_fat_right"])):
        lab[ell(side * 42, 70, 22, 15)] = lbl
        lab[ell(side * 48, 72, 4.5, 4.5)] = fat
    if body:
        if sacral:
            lab[ell(0, 25, 95, 20)] = L["bone"]
        else:
            lab[ell(0, 20, 22, 16)] = L["bone"]
            lab[ell(0, 45, 11, 11)] = L["bone"]
            lab[ell(0, 45, 6, 6)] = L["canal"]
            lab[(np.abs(x) <= 4) & (y >= 54) & (y <= 80)] = L["bone"]
            if spec.with_ribs and level.startswith("T"):
                for side in (1, -1):
                    lab[ell(side * 36, 28, 5, 5)] = L["bone"]
                    lab[ell(side * 80, 20, 5, 8)] = L["bone"]
    else:
        if level != "below" and level != "above":
            lab[ell(0, 20, 22, 16)] = L["disc"]
    return lab


_HU_OF = {1: "muscle", 2: "psoas", 3: "psoas", 4: "erector", 5: "erector", 6: "fat", 7: "fat", 8: "imat",
          10: "bone", 11: "organ", 12: "gas", 13: "disc", 14: "canal", 15: "imat", 16: "imat"}


def make_phantom(spec: PhantomSpec) -> Truth:
    """The label map and HU volume (no files)."""
    n, px = spec.size, spec.pixel_mm
    c = (np.arange(n) - (n - 1) / 2.0) * px
    x, y = np.meshgrid(c, c)  # x along columns, y along rows
    layout = _layout(spec)
    labels = np.zeros((len(layout), n, n), dtype=np.uint8)
    for k, (level, body) in enumerate(layout):
        labels[k] = _paint_slice(spec, level, body, x, y)
    lut = np.full(256, HU["air"], dtype=np.float32)
    for lbl, name in _HU_OF.items():
        lut[lbl] = HU[name]
    hu = lut[labels]
    if spec.noise_sd > 0:
        rng = np.random.default_rng(spec.seed)
        hu = hu + rng.normal(0.0, spec.noise_sd, hu.shape).astype(np.float32)
        hu[labels == 0] = HU["air"]
    levels = [lv for lv, _ in layout]
    level_slices: dict[str, int] = {}
    for name in sorted({lv for lv, b in layout if b}):
        ks = [k for k, (lv, b) in enumerate(layout) if lv == name and b]
        level_slices[name] = ks[len(ks) // 2]
    return Truth(labels=labels, hu=hu.astype(np.float32), levels=levels, level_slices=level_slices,
                 pixel_area_mm2=px * px, slice_mm=spec.slice_mm)


def to_stored(hu: NDArray[np.floating]) -> NDArray[np.uint16]:  # type: ignore[type-arg]
    """HU to the 12-bit unsigned values :func:`set_ct_pixels` writes (rounded, clipped to 0..4095)."""
    return np.clip(np.round(hu + 1024.0), 0, 4095).astype(np.uint16)


def set_ct_pixels(ds: Dataset, stored: NDArray[np.uint16]) -> None:
    """Image Pixel and CT Image attributes of one slice stored as 12-bit unsigned values, HU = stored - 1024."""
    ds.Rows, ds.Columns = (int(v) for v in stored.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()


def write_phantom(spec: PhantomSpec, out_dir: Path, study_uid: str | None = None) -> Truth:
    """Write the phantom as one DICOM CT series (one file per slice) and return its truth.

    ``spec.truncate`` widens the body beyond the field of view; ``spec.tilt_deg`` writes the
    slices as gantry-tilted planes (orientation rotated about x, table positions along z).
    """
    truth = make_phantom(spec) if not spec.truncate else make_phantom(
        PhantomSpec(**{**spec.__dict__, "body_semi_mm": (spec.size * spec.pixel_mm / 2 + 30.0, spec.body_semi_mm[1])}))
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = generate_uid()
    n, px = spec.size, spec.pixel_mm
    t = np.deg2rad(spec.tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)])
    half = (n - 1) / 2.0 * px
    files = []
    stored = to_stored(truth.hu)
    for k in range(truth.hu.shape[0]):
        z = k * spec.slice_mm
        centre = np.array([0.0, 0.0, z])
        ipp = centre - half * row_dir - half * col_dir
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = spec.modality
        ds.PatientName = spec.patient_name
        ds.PatientID = spec.patient_id
        ds.PatientBirthDate = "19600101"
        if spec.sex is not None:
            ds.PatientSex = spec.sex
        else:
            ds.PatientSex = ""
        if spec.age is not None:
            ds.PatientAge = spec.age
        if spec.height_m is not None:
            ds.PatientSize = f"{spec.height_m:.2f}"
        if spec.weight_kg is not None:
            ds.PatientWeight = f"{spec.weight_kg:.1f}"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.SeriesDate = "20260101"
        ds.ContentDate = "20260101"
        ds.ContentTime = "120000"
        ds.AccessionNumber = "PH0001"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "prognode phantom"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = "Abdomen phantom"
        ds.StudyDescription = "Body composition phantom"
        ds.BodyPartExamined = "ABDOMEN"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "120"
        ds.PatientPosition = "FFS"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.GantryDetectorTilt = f"{spec.tilt_deg:.1f}"
        ds.SliceThickness = f"{spec.slice_mm:.2f}"
        ds.SliceLocation = f"{z:.2f}"
        ds.PixelSpacing = [f"{px:.4f}", f"{px:.4f}"]
        set_ct_pixels(ds, stored[k])
        path = out_dir / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    truth.files = files
    truth.series_uid = series_uid
    truth.study_uid = study_uid
    # stored values are rounded to integers: truth HU is what a reader gets back
    truth.hu = (stored.astype(np.float32) - 1024.0)
    return truth


def training_labels(truth: Truth, level: str = "L3") -> NDArray[np.uint8]:
    """train-seg label map from the truth: classes 1-8 as they are, the erector's fat as its erector (the
    compartment), 20 on the level vertebra's bone."""
    lab = truth.labels
    lab = np.where(lab == LABELS["erector_fat_left"], LABELS["erector_left"], lab)
    lab = np.where(lab == LABELS["erector_fat_right"], LABELS["erector_right"], lab)
    out = np.where(lab <= 8, lab, 0).astype(np.uint8)
    ks = [k for k, lv in enumerate(truth.levels) if lv == level]
    for k in ks:
        out[k][truth.labels[k] == LABELS["bone"]] = 20
    return out


def write_training_case(spec: PhantomSpec, case_dir: Path, level: str = "L3") -> Truth:
    """One train-seg case: ``case_dir/ct/*.dcm`` plus ``case_dir/labels.nii.gz``."""
    import SimpleITK as sitk

    truth = write_phantom(spec, case_dir / "ct")
    img = sitk.GetImageFromArray(training_labels(truth, level))
    n = spec.size
    img.SetSpacing((spec.pixel_mm, spec.pixel_mm, spec.slice_mm))  # type: ignore[no-untyped-call]
    img.SetOrigin((-(n - 1) / 2.0 * spec.pixel_mm, -(n - 1) / 2.0 * spec.pixel_mm, 0.0))  # type: ignore[no-untyped-call]
    sitk.WriteImage(img, str(case_dir / "labels.nii.gz"))
    return truth
