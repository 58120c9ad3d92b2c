"""Deep features: tiny random encoders saved as safetensors, Grad-CAM SEG through dciodvfy, train-deep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from pipelines.base import PipelineContext, SeriesInput, StageError
from pipelines.registry import create
from tests.peers import dciodvfy
from tests.phantoms import IDENTITY, sphere_phantom, write_ct, write_seg

SPACING = (2.5, 1.0, 1.0)
OPTIONS = {"arch": "resnet10", "size_3d": 24, "size_2d": 48, "crop_mm": 48.0}


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deep")
    for i in range(4):
        hu, tumour = sphere_phantom((14, 56, 56), SPACING, 7.0 + i, seed=i, tumour_hu=40.0 + 15 * i)
        ct = write_ct(hu, SPACING, root / f"s{i}" / "ct", patient_id=f"P{i}")
        write_seg(ct, tumour, root / f"s{i}" / "seg.dcm")
    with (root / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study", "time", "event", "label"])
        for i, (t, e) in enumerate([(300, 1), (900, 0), (500, 1), (1200, 1)]):
            w.writerow([f"s{i}", t, e, i % 2])
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from pipelines.deep.encoders import build, save_weights

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for dims in (2, 3):
        out[f"deep{dims}d"] = root / f"resnet10_{dims}d.safetensors"
        save_weights(build("resnet10", dims), out[f"deep{dims}d"])
    return out


def _ctx(studies: Path, work: Path, models: dict[str, Path]) -> PipelineContext:
    ct = tuple(sorted((studies / "s1" / "ct").glob("*.dcm")))
    return PipelineContext(series=(SeriesInput("", "", ct),), work_dir=work, identity=IDENTITY,
                           extra_files=(studies / "s1" / "seg.dcm",), models=models)


def test_deep_features_with_attention_seg(studies: Path, weights: dict[str, Path], tmp_path: Path) -> None:
    out = create("deep-features", OPTIONS).run(_ctx(studies, tmp_path, weights))
    assert out.evaluable and out.summary["n_features"] == 2 * 512
    row = json.loads((tmp_path / "features.json").read_text())
    v2 = np.array([row[f"deep2d_{i:03d}"] for i in range(512)])
    v3 = np.array([row[f"deep3d_{i:03d}"] for i in range(512)])
    assert np.isfinite(v2).all() and np.isfinite(v3).all() and v3.std() > 0
    (seg_path,) = out.files
    ok, text = dciodvfy(seg_path)
    assert ok, text
    seg = hd.seg.segread(seg_path)
    labels = [str(d.segment_label) for d in seg.SegmentSequence]
    assert labels[0].startswith("Tumour") and any(lb.startswith("Attention 3D") for lb in labels)
    # The attention segment lies within the patch around the tumour (48 mm cube at the centroid).
    n = labels.index(next(lb for lb in labels if lb.startswith("Attention 3D"))) + 1
    att = np.asarray(seg.get_volume(segment_numbers=[n], combine_segments=False).array)[..., 0] > 0
    assert att.any()
    rows = np.nonzero(att.any(axis=(0, 2)))[0]
    assert rows.min() >= 28 - 25 and rows.max() <= 28 + 25
    # Same weights, same input: same embedding.
    again = create("deep-features", {**OPTIONS, "attention": False}).run(_ctx(studies, tmp_path / "b", weights))
    assert again.files == ()
    row2 = json.loads((tmp_path / "b" / "features.json").read_text())
    assert np.allclose([row2[f"deep3d_{i:03d}"] for i in range(512)], v3, atol=1e-5)


def test_refuses_without_weights(studies: Path, weights: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"\[models\] deep3d"):
        create("deep-features", {**OPTIONS, "dims": [3]}).run(_ctx(studies, tmp_path, {}))
    with pytest.raises(StageError, match="do not fit"):  # 2D weights for the 3D network
        create("deep-features", {**OPTIONS, "dims": [3]}).run(_ctx(studies, tmp_path, {"deep3d": weights["deep2d"]}))


@pytest.mark.slow
def test_train_deep_cox_then_use(studies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.deep.train import main

    out = tmp_path / "model"
    rc = main(["train-deep", "--data", str(studies / "labels.csv"), "--time", "time", "--event", "event",
               "--arch", "resnet10", "--dims", "3", "--size", "24", "--crop-mm", "48", "--steps", "3",
               "--batch-size", "4", "--lr", "1e-3", "--out", str(out)])
    assert rc == 0 and "4 studies" in capsys.readouterr().out
    card = json.loads((out / "model_card.json").read_text())
    assert card["objective"] == "Cox partial likelihood" and card["training_data"]["events"] == 3
    res = create("deep-features", {**OPTIONS, "dims": [3], "attention": False}).run(
        _ctx(studies, tmp_path / "w", {"deep3d": out / "weights.safetensors"}))
    assert res.summary["weights_sha256"]["3d"] == card["weights"]["sha256"]


def test_cox_loss_prefers_correct_ranking() -> None:
    import torch

    from pipelines.deep.train import cox_loss

    time = torch.tensor([1.0, 2.0, 3.0, 4.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0])
    good = cox_loss(torch.tensor([3.0, 2.0, 1.0, 0.0]), time, event)
    bad = cox_loss(torch.tensor([0.0, 1.0, 2.0, 3.0]), time, event)
    assert float(good) < float(bad)
