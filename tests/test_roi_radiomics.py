"""Tumour ROI from SEG/RTSTRUCT, peritumoral rings in mm, pyradiomics, and the tumour-radiomics pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from pipelines.base import PipelineContext, SeriesInput, StageError
from pipelines.common.volume import load_series
from pipelines.radiomics.features import Params, PeritumoralRings, RingsInput
from pipelines.registry import create
from pipelines.roi import RoiToMask
from tests.peers import dciodvfy
from tests.phantoms import IDENTITY, sphere_phantom

RT = "rtutils_phantom_rtstruct"


def _check_dicom(path: Path) -> None:
    ok, out = dciodvfy(path)
    assert ok, out


def test_seg_from_dcmqi_maps_onto_ct(shared_data: Path) -> None:
    ct = sorted((shared_data / "dcmqi_seg_sr_refs/segmentations/ct-3slice").glob("*.dcm"))
    vol = load_series(ct)
    roi = RoiToMask().run(shared_data / "dcmqi_seg_sr_refs/segmentations/liver.dcm", vol)
    ref = hd.seg.segread(shared_data / "dcmqi_seg_sr_refs/segmentations/liver.dcm")
    # The SEG frames reference the CT instances: per-image counts must match exactly.
    for k, s in enumerate(vol.slices):
        frame = ref.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(s.dataset.SOPInstanceUID)], segment_numbers=[1], ignore_spatial_locations=True
        )
        assert int(roi.mask[k].sum()) == int(np.asarray(frame).sum())
    assert roi.label == "Liver" and roi.source_kind == "SEG"


@pytest.mark.parametrize("name", ["seg_image_ct_binary.dcm", "seg_image_ct_binary_fractional.dcm"])
def test_highdicom_segs_on_ct2(shared_data: Path, name: str) -> None:
    vol = load_series(sorted((shared_data / "pydicom_testfiles/CT2_series").iterdir()))
    roi = RoiToMask().run(shared_data / "highdicom_testfiles" / name, vol)
    expected = np.asarray(hd.seg.segread(shared_data / "highdicom_testfiles" / name).get_volume().array)
    assert int(roi.mask.sum()) == int((expected > 0.5).sum())


def test_rtstruct_rasterised_in_mm(shared_data: Path) -> None:
    vol = load_series([shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm"])
    roi = RoiToMask().run(shared_data / RT / "rt.dcm", vol)
    # Outer square 24x24 mm with an inner 15x15-ish octagon hole on the slice at z = 60 mm.
    assert roi.mask[1].sum() == 0 and roi.mask[0].sum() > 0
    outer, hole = 24.0 * 24.0, 15.0 * 15.0 - 2 * 0.5
    assert roi.mask[0].sum() * vol.pixel_area_mm2 == pytest.approx(outer - hole, rel=0.05)


@pytest.mark.parametrize("name", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_bad_rtstruct_references_refused(shared_data: Path, name: str) -> None:
    vol = load_series([shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm"])
    with pytest.raises(StageError, match="not in the CT series") as e:
        RoiToMask().run(shared_data / RT / name, vol)
    assert e.value.stage == "roi-to-mask" and vol.series_uid in str(e.value)


def test_seg_on_other_frame_of_reference_refused(shared_data: Path) -> None:
    vol = load_series([shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm"])
    with pytest.raises(StageError, match="frame of reference"):
        RoiToMask().run(shared_data / "dcmqi_seg_sr_refs/segmentations/liver.dcm", vol)


def test_unknown_label_refused(shared_data: Path) -> None:
    vol = load_series([shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm"])
    with pytest.raises(StageError, match="no ROI named 'GTV'"):
        RoiToMask(label="GTV").run(shared_data / RT / "rt.dcm", vol)


@pytest.mark.parametrize("spacing", [(2.5, 0.8, 0.8), (1.25, 0.9, 0.9)])
def test_rings_match_analytic_shells_on_anisotropic_voxels(spacing: tuple[float, float, float]) -> None:
    radius = 12.0
    shape = tuple(int(2 * (radius + 14) / s) + 3 for s in spacing)
    _, tumour = sphere_phantom(shape, spacing, radius, body_radius_mm=1e6)  # type: ignore[arg-type]
    rings = PeritumoralRings((3, 6, 9)).run(RingsInput(tumour, spacing))
    voxel = float(np.prod(spacing))
    for r, mask in zip((3, 6, 9), rings.values(), strict=True):
        analytic = 4 / 3 * np.pi * ((radius + r) ** 3 - radius**3)
        assert not (mask & tumour).any()
        assert mask.sum() * voxel == pytest.approx(analytic, rel=0.04), f"{r} mm ring"
    annular = PeritumoralRings((3, 6, 9), mode="annular").run(RingsInput(tumour, spacing))
    assert not (annular["ring3"] & annular["ring6"]).any()
    assert (annular["ring6"] | annular["ring3"]).sum() == rings["ring6"].sum()


def test_rings_stay_in_body_and_organ() -> None:
    spacing = (2.0, 1.0, 1.0)
    _, tumour = sphere_phantom((20, 40, 40), spacing, 8.0)
    body = np.zeros(tumour.shape, bool)
    body[:, :, :22] = True
    organ = np.zeros(tumour.shape, bool)
    organ[:, :24, :] = True
    rings = PeritumoralRings((3, 6, 9)).run(RingsInput(tumour, spacing, body, organ))
    for m in rings.values():
        assert m.any() and not (m & ~body).any() and not (m & ~organ).any()


def test_params_hash_is_of_the_shipped_file() -> None:
    import hashlib
    from importlib import resources

    raw = resources.files("pipelines.radiomics").joinpath("params", "ct_v1.yaml").read_bytes()
    assert Params.load().sha256 == hashlib.sha256(raw).hexdigest()


def _run(ct: tuple[Path, ...], roi: Path, work: Path, options: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    ctx = PipelineContext(series=(SeriesInput("", "", ct, role="ct"),), work_dir=work, identity=IDENTITY,
                          extra_files=(roi,))
    return create("tumour-radiomics", options or {}).run(ctx)


def _check_outputs(out, work: Path) -> None:  # type: ignore[no-untyped-def]
    seg_path, sr_path = out.files
    for p in out.files:
        _check_dicom(p)
    seg = hd.seg.segread(seg_path)
    labels = [str(d.segment_label) for d in seg.SegmentSequence]
    assert labels[0].startswith("Tumour") and labels[1:] == ["Peritumoral 3 mm", "Peritumoral 6 mm", "Peritumoral 9 mm"]
    assert [str(d.SegmentedPropertyTypeCodeSequence[0].CodeValue) for d in seg.SegmentSequence][1:] == ["PTR3", "PTR6", "PTR9"]
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 1
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any(out.summary["params_sha256"] in t for t in texts)
    scoords = [e.value for e in sr.iterall() if e.keyword == "GraphicType"]
    assert scoords and set(scoords) == {"POLYLINE"}
    measurements = groups[0].get_measurements()
    names = {m.name.meaning for m in measurements}
    assert {"Volume", "Area", "Attenuation Coefficient"} <= names
    volume = next(m for m in measurements if m.name.meaning == "Volume")
    assert volume.value == pytest.approx(out.summary["tumour_volume_mm3"], rel=1e-3)
    row = json.loads((work / "features.json").read_text())
    assert row["params_sha256"] == out.summary["params_sha256"]
    for prefix in ("intra_", "ring3_", "ring6_", "ring9_"):
        assert any(k.startswith(prefix + "glcm_") for k in row), prefix
    assert "intra_shape_VoxelVolume" in row and not any(k.startswith("ring3_shape") for k in row)


def test_pipeline_with_rtstruct(shared_data: Path, tmp_path: Path) -> None:
    out = _run((shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm"), shared_data / RT / "rt.dcm", tmp_path)
    assert out.evaluable and out.summary["roi_source"] == "RTSTRUCT"
    _check_outputs(out, tmp_path)


@pytest.mark.slow
def test_pipeline_with_seg(shared_data: Path, tmp_path: Path) -> None:
    ct = tuple(sorted((shared_data / "dcmqi_seg_sr_refs/segmentations/ct-3slice").glob("*.dcm")))
    out = _run(ct, shared_data / "dcmqi_seg_sr_refs/segmentations/liver.dcm", tmp_path)
    assert out.evaluable and out.summary["roi_source"] == "SEG" and out.summary["roi_label"] == "Liver"
    _check_outputs(out, tmp_path)


def test_pipeline_without_roi_is_not_evaluable(shared_data: Path, tmp_path: Path) -> None:
    ctx = PipelineContext(series=(SeriesInput("", "", (shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm")),),
                          work_dir=tmp_path, identity=IDENTITY)
    out = create("tumour-radiomics", {}).run(ctx)
    assert not out.evaluable and "no SEG or RTSTRUCT" in out.reason
    (sr_path,) = out.files
    _check_dicom(sr_path)
    sr = hd.sr.srread(sr_path)
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any("no SEG or RTSTRUCT" in t for t in texts)
    assert {e.value for e in sr.iterall() if e.keyword == "GraphicType"} == {"POLYLINE"}


def test_bad_option_named() -> None:
    with pytest.raises(ValueError, match="pipelines.tumour-radiomics.ring_mm"):
        create("tumour-radiomics", {"ring_mm": [3]})


def test_body_mask_fills_lungs_drops_noise_keeps_arms() -> None:
    from pipelines.radiomics.features import BodyMask

    hu = np.full((3, 80, 80), -1000.0, np.float32)
    yy, xx = np.mgrid[:80, :80]
    trunk = (yy - 40) ** 2 + (xx - 35) ** 2 <= 25**2
    lung = (yy - 40) ** 2 + (xx - 35) ** 2 <= 10**2
    arm = (yy - 40) ** 2 + (xx - 72) ** 2 <= 5**2
    hu[:, trunk] = 40
    hu[:, lung] = -850
    hu[:, arm] = 40
    hu[:, 2:4, 2:4] = 100  # a speck of noise
    body = BodyMask(min_area_mm2=20.0).run(hu, pixel_area_mm2=1.0, slices=range(1, 3))
    assert not body[0].any()
    assert body[1][lung].all() and body[1][arm].all() and not body[1, 2:4, 2:4].any()


def test_creating_tumour_pipelines_imports_no_torch_monai_or_pyradiomics() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom pipelines.registry import create\n"
            "for n in ('tumour-radiomics', 'dual-phase', 'deep-features'): create(n, {})\n"
            "import pipelines.radiomics.cohort, pipelines.deep.train\n"
            "print(sorted(m for m in ('torch', 'monai', 'radiomics') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_node_run_cli_with_rtstruct(shared_data: Path, tmp_path: Path) -> None:
    """`prognode run tumour-radiomics FOLDER`: the CT and its RTSTRUCT in one folder, no node."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("ct_1.dcm", "ct_2.dcm", "rt.dcm"):
        shutil.copy(shared_data / RT / name, folder / name)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "node", "run", "tumour-radiomics", str(folder), "--out", str(tmp_path / "out")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "tumour_sr.dcm").is_file() and (tmp_path / "out" / "tumour_rings_seg.dcm").is_file()
    assert json.loads((tmp_path / "out" / "features.json").read_text())["roi_source"] == "RTSTRUCT"
