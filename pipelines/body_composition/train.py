"""``prognode train-seg``: train the MONAI body-composition models on a site's own labelled series.

Data layout: ``DATA/<case>/`` holds one CT series (DICOM files, any names) and
``labels.nii.gz``, a label map on the same patient geometry (any NIfTI orientation) with the
values of :data:`pipelines.body_composition.labels.TRAIN_CLASSES` (1 muscle other, 2/3 psoas
left/right, 4/5 erector spinae left/right, 6 SAT, 7 VAT, 8 IMAT) and 20 on the target
vertebra (e.g. the L3 body).  ``phantom.write_training_case`` writes such cases.

Recipe (seed 004): a 3D network finds the level section, a 2D network segments the slice;
k folds over the cases give k models of each, combined at inference by majority vote.
Writes ``fold<i>-2d.safetensors``, ``fold<i>-3d.safetensors``, ``model.json`` and
``MODEL_CARD.md`` into ``--out``.  Run as ``prognode train-seg`` or
``python -m pipelines.body_composition.train``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)


@dataclass
class Case:
    name: str
    hu: NDArray[np.float32]
    labels: NDArray[np.uint8]


def load_cases(data_dir: Path) -> list[Case]:
    from pipelines.body_composition.labels import read_labels_on_volume
    from pipelines.common.volume import load_series

    cases = []
    for d in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        lab = d / "labels.nii.gz"
        if not lab.exists():
            log.warning("%s: no labels.nii.gz, skipped", d)
            continue
        files = [p for p in sorted(d.rglob("*")) if p.is_file() and not p.name.endswith((".nii.gz", ".nii"))]
        vol = load_series(files)
        cases.append(Case(d.name, vol.hu, read_labels_on_volume(lab, vol)))
    if not cases:
        raise SystemExit(f"{data_dir}: no case folders with a DICOM series and labels.nii.gz")
    return cases


def _dice(pred: NDArray[Any], ref: NDArray[Any], classes: Sequence[int]) -> float:
    ds = []
    for c in classes:
        a, b = pred == c, ref == c
        if a.sum() + b.sum() == 0:
            continue
        ds.append(2.0 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return float(np.mean(ds)) if ds else float("nan")


def train(data_dir: Path, out_dir: Path, level: str = "L3", folds: int = 5, steps: int = 200, batch: int = 4,
          features: Sequence[int] = (16, 16, 32, 64, 128, 16), size2d: int = 256,
          shape3d: tuple[int, int, int] = (64, 96, 96), lr: float = 1e-3, seed: int = 0,
          device: str = "cpu") -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from monai.losses.dice import DiceCELoss
    from safetensors.torch import save_file

    from pipelines.body_composition.labels import LEVEL_VERTEBRA_LABEL, TRAIN_CLASSES
    from pipelines.body_composition.monai_backend import FORMAT, net2d, net3d, prep2d, prep3d

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cases = load_cases(data_dir)
    n_cls = len(TRAIN_CLASSES)
    out_dir.mkdir(parents=True, exist_ok=True)
    hu2d, hu3d = (-250.0, 250.0), (-200.0, 1000.0)
    k = max(1, min(folds, len(cases)))
    assignment = [i % k for i in range(len(cases))]
    fold_rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for f in range(k):
        train_cases = [c for c, a in zip(cases, assignment, strict=True) if a != f] or cases
        val_cases = [c for c, a in zip(cases, assignment, strict=True) if a == f]
        slices = [(c, z) for c in train_cases for z in range(c.labels.shape[0])
                  if np.isin(c.labels[z], range(1, n_cls)).any()]
        m2, m3 = net2d(features).to(device), net3d(features).to(device)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        opt2 = torch.optim.Adam(m2.parameters(), lr=lr)
        opt3 = torch.optim.Adam(m3.parameters(), lr=lr)
        last2 = last3 = float("nan")
        for _ in range(steps):
            pick = [slices[int(i)] for i in rng.integers(0, len(slices), size=batch)]
            x = torch.cat([prep2d(c.hu[z], size2d, hu2d) for c, z in pick]).to(device)
            y = torch.cat([F.interpolate(torch.from_numpy(np.where(c.labels[z] < n_cls, c.labels[z], 0)
                                                          .astype(np.float32))[None, None],
                                         size=(size2d, size2d), mode="nearest") for c, z in pick]).to(device)
            opt2.zero_grad()
            loss2 = loss_fn(m2(x), y)
            loss2.backward()
            opt2.step()
            last2 = float(loss2.detach())
            c = train_cases[int(rng.integers(0, len(train_cases)))]
            x3 = prep3d(c.hu, shape3d, hu3d).to(device)
            y3 = F.interpolate(torch.from_numpy((c.labels == LEVEL_VERTEBRA_LABEL).astype(np.float32))[None, None],
                               size=shape3d, mode="nearest").to(device)
            opt3.zero_grad()
            loss3 = loss_fn(m3(x3), y3)
            loss3.backward()
            opt3.step()
            last3 = float(loss3.detach())
        m2.eval()
        m3.eval()
        val_dice: list[float] = []
        with torch.no_grad():
            for c in val_cases:
                zs = np.nonzero((c.labels == LEVEL_VERTEBRA_LABEL).any(axis=(1, 2)))[0]
                if zs.size == 0:
                    continue
                z = int(zs[len(zs) // 2])
                logits = F.interpolate(m2(prep2d(c.hu[z], size2d, hu2d).to(device)), size=c.hu.shape[1:],
                                       mode="bilinear", align_corners=False)
                ref = np.where(c.labels[z] < n_cls, c.labels[z], 0)
                val_dice.append(_dice(logits.argmax(1)[0].cpu().numpy(), ref, range(1, n_cls)))
        names = {"net2d": f"fold{f}-2d.safetensors", "net3d": f"fold{f}-3d.safetensors"}
        save_file({k_: v.detach().cpu().contiguous() for k_, v in m2.state_dict().items()}, str(out_dir / names["net2d"]))
        save_file({k_: v.detach().cpu().contiguous() for k_, v in m3.state_dict().items()}, str(out_dir / names["net3d"]))
        fold_rows.append({**names, "train_cases": [c.name for c in train_cases],
                          "validation_cases": [c.name for c in val_cases], "final_loss_2d": last2,
                          "final_loss_3d": last3,
                          "validation_mean_dice_2d": float(np.nanmean(val_dice)) if val_dice else None})
    import monai
    import torch as _torch

    version = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    model = {"format": FORMAT, "version": version, "level": level, "features": list(features), "size2d": size2d,
             "shape3d": list(shape3d), "hu2d": list(hu2d), "hu3d": list(hu3d), "classes": list(TRAIN_CLASSES),
             "level_vertebra_label": LEVEL_VERTEBRA_LABEL, "folds": fold_rows,
             "training": {"data": str(data_dir), "cases": len(cases), "steps": steps, "batch": batch, "lr": lr,
                          "seed": seed, "seconds": round(time.perf_counter() - t_start, 2),
                          "torch": _torch.__version__, "monai": monai.__version__, "python": platform.python_version()}}
    (out_dir / "model.json").write_text(json.dumps(model, indent=1))
    (out_dir / "MODEL_CARD.md").write_text(_card(model))
    return model


def _card(m: dict[str, Any]) -> str:
    rows = "\n".join(f"| {i} | {len(f['train_cases'])} | {', '.join(f['validation_cases']) or '-'} | "
                     f"{f['final_loss_2d']:.4f} | {f['final_loss_3d']:.4f} | "
                     f"{'-' if f['validation_mean_dice_2d'] is None else format(f['validation_mean_dice_2d'], '.3f')} |"
                     for i, f in enumerate(m["folds"]))
    t = m["training"]
    return f"""# Model card: prognode body composition ({m['level']}), version {m['version']}

## What it is
Two MONAI `BasicUNet` networks per fold (features {m['features']}): a 3D network that marks the {m['level']}
vertebra (input resampled to {m['shape3d']}, HU window {m['hu3d']}) and a 2D network that segments the level slice
into {', '.join(m['classes'][1:])} (input {m['size2d']}x{m['size2d']}, HU window {m['hu2d']}).
{len(m['folds'])} fold model(s) of each, combined per voxel by majority vote (seed 004's recipe).
Weights: safetensors state dicts (`fold<i>-2d.safetensors`, `fold<i>-3d.safetensors`); no pickles.

## Intended use
Research use inside prognode's `body-composition` pipeline (`backend = "monai"`, config `[models]` pointing at
this `model.json`), on axial, untilted CT of the population it was trained on. Not a medical device.

## Training data
{t['cases']} case(s) from `{t['data']}`; labels from the site's own annotations. {t['steps']} steps per network per
fold, batch {t['batch']}, Adam lr {t['lr']}, seed {t['seed']}, {t['seconds']} s in total.
torch {t['torch']}, monai {t['monai']}, Python {t['python']}.

## Folds and validation
| fold | training cases | validation cases | final 2D loss | final 3D loss | validation mean Dice (2D, level slice) |
|---|---|---|---|---|---|
{rows}

## Limitations
Numbers above are from the site's own held-out cases only; a model trained for a few steps (as in tests) is not
usable. Check agreement with the weight-free backend and inspect the SEG before relying on it.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="folder of case folders (DICOM series + labels.nii.gz)")
    p.add_argument("--out", type=Path, required=True, help="where to write weights, model.json, MODEL_CARD.md")
    p.add_argument("--level", default="L3", choices=["L3", "C3"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--features", type=int, nargs=6, default=[16, 16, 32, 64, 128, 16])
    p.add_argument("--size2d", type=int, default=256)
    p.add_argument("--shape3d", type=int, nargs=3, default=[64, 96, 96])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _run(a: argparse.Namespace) -> int:
    model = train(a.data, a.out, level=a.level, folds=a.folds, steps=a.steps, batch=a.batch,
                  features=a.features, size2d=a.size2d, shape3d=tuple(a.shape3d), lr=a.lr, seed=a.seed,
                  device=a.device)
    print(json.dumps({"model": str(a.out / "model.json"), "folds": len(model["folds"]),
                      "validation_mean_dice_2d": [f["validation_mean_dice_2d"] for f in model["folds"]]}))
    return 0


def register(subparsers: Any) -> None:
    """Add ``train-seg`` to the ``prognode`` command line (node/cli.py EXTENSIONS)."""
    p = subparsers.add_parser("train-seg", help="train the MONAI body-composition models on labelled series",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train-seg", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    logging.basicConfig(level=logging.INFO)
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
