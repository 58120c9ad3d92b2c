"""Volume.canonical_axial: any stored axial orientation -> the same patient-axis array (LPS), and back."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipelines.common.volume import SeriesToVolume

# truth: A[k, r, c] at LPS point ORIGIN + (c*DX, r*DY, k*DZ)
ORIGIN = np.array([-40.0, -30.0, 100.0])
DZ, DY, DX = 3.0, 0.8, 0.7
SHAPE = (5, 6, 7)


def _truth() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(-1000, 1000, size=SHAPE).astype(np.float32)


def _world(k: float, r: float, c: float) -> np.ndarray:
    return ORIGIN + np.array([c * DX, r * DY, k * DZ])


def _series(row_dir: tuple[int, int, int], col_dir: tuple[int, int, int], feet_first: bool) -> list[Dataset]:
    """The truth volume stored with another orientation: same anatomy at the same LPS points."""
    a = _truth()
    rd, cd = np.array(row_dir, float), np.array(col_dir, float)
    # stored pixel (i, j) of a slice lies at corner + j * sx * rd + i * sy * cd
    sx = DX if abs(rd[0]) else DY
    sy = DY if abs(cd[1]) else DX
    ncols = SHAPE[2] if abs(rd[0]) else SHAPE[1]
    nrows = SHAPE[1] if abs(cd[1]) else SHAPE[2]
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    out = []
    ks = range(SHAPE[0] - 1, -1, -1) if feet_first else range(SHAPE[0])
    for n, k in enumerate(ks):
        # corner = the LPS point of stored pixel (0, 0): the truth extreme along each stored direction
        corner = _world(k, 0, 0).copy()
        for d, size, sp in ((rd, ncols, sx), (cd, nrows, sy)):
            if d.sum() < 0:
                corner += -d * (size - 1) * sp
        img = np.zeros((nrows, ncols), np.float32)
        for i in range(nrows):
            for j in range(ncols):
                p = corner + j * sx * rd + i * sy * cd
                c = int(round((p[0] - ORIGIN[0]) / DX))
                r = int(round((p[1] - ORIGIN[1]) / DY))
                img[i, j] = a[k, r, c]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
        ds.Modality, ds.InstanceNumber = "CT", n + 1
        ds.ImagePositionPatient = [float(v) for v in corner]
        ds.ImageOrientationPatient = [*map(float, rd), *map(float, cd)]
        ds.PixelSpacing = [sy, sx]
        ds.Rows, ds.Columns = nrows, ncols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = img.astype(np.int16).tobytes()
        out.append(ds)
    return out


CASES = {
    "supine head-first": ((1, 0, 0), (0, 1, 0), False),
    "rows mirrored": ((-1, 0, 0), (0, 1, 0), False),
    "prone": ((-1, 0, 0), (0, -1, 0), False),
    "feet-first": ((-1, 0, 0), (0, 1, 0), True),
    "columns mirrored": ((1, 0, 0), (0, -1, 0), True),
    "rows along y": ((0, 1, 0), (1, 0, 0), False),
    "rows along -y": ((0, -1, 0), (-1, 0, 0), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_canonical_axial_restores_patient_axes(case: str) -> None:
    rd, cd, ff = CASES[case]
    vol = SeriesToVolume().run(_series(rd, cd, ff))
    canon, reo = vol.canonical_axial()
    truth = _truth()
    assert canon.hu.shape == truth.shape
    np.testing.assert_array_equal(canon.hu, truth)
    assert canon.pixel_spacing == pytest.approx((DY, DX))
    np.testing.assert_allclose(canon.row_direction, [1, 0, 0], atol=1e-9)
    np.testing.assert_allclose(canon.column_direction, [0, 1, 0], atol=1e-9)
    np.testing.assert_allclose(canon.normal, [0, 0, 1], atol=1e-9)
    for k, r, c in ((0, 0, 0), (4, 5, 6), (2, 3, 1)):
        np.testing.assert_allclose(canon.index_to_world(k, r, c), _world(k, r, c), atol=1e-6)
    # back to the stored order, slice by slice and index by index
    np.testing.assert_array_equal(reo.to_source(canon.hu), vol.hu)
    for k in range(SHAPE[0]):
        np.testing.assert_array_equal(reo.slice_to_source(canon.hu[k]), vol.hu[reo.index_to_source(k)])
        assert canon.slices[k].dataset is vol.slices[reo.index_to_source(k)].dataset
