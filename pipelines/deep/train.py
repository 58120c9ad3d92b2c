"""``prognode train-deep``: fine-tune a MONAI encoder on a site's own cohort.

The CSV has one row per study: ``study`` (a folder holding the CT series and the tumour
SEG/RTSTRUCT; relative paths are relative to the CSV's folder) and either survival columns
(``--time``, ``--event``: Cox partial-likelihood loss) or a binary label (``--label``:
logistic loss).  Patches are cut around the tumour exactly as the ``deep-features`` pipeline
does, so the weights written (``weights.safetensors`` plus ``model_card.json``) plug into
config ``[models]`` unchanged.  ``--init`` starts from local weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

VERSION = "1.0.0"


@dataclass(frozen=True)
class TrainData:
    patches: NDArray[np.float32]  # (n, size, size[, size])
    time: NDArray[np.float64] | None
    event: NDArray[np.float64] | None
    label: NDArray[np.float64] | None
    studies: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def cox_loss(risk: Any, time: Any, event: Any) -> Any:
    """Negative Cox partial log-likelihood (Breslow ties), averaged over events."""
    import torch

    order = torch.argsort(time, descending=True)
    r, e = risk[order], event[order]
    log_cum = torch.logcumsumexp(r, dim=0)
    n_events = torch.clamp(e.sum(), min=1.0)
    return -((r - log_cum) * e).sum() / n_events


def load_cohort(csv_path: Path, args: argparse.Namespace) -> TrainData:
    from pipelines.base import NotEvaluable, StageError
    from pipelines.common.volume import SeriesToVolume
    from pipelines.deep.crop import RoiCrop
    from pipelines.radiomics.cohort import classify
    from pipelines.radiomics.pipeline import check_volume, load_roi

    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    patches, times, events, labels, names, skipped = [], [], [], [], [], []
    crop = RoiCrop(args.dims, args.size, args.crop_mm)
    for row in rows:
        folder = Path(row["study"])
        folder = folder if folder.is_absolute() else csv_path.parent / folder
        try:
            ct, rois = classify(folder)
            volume = SeriesToVolume().run(ct)
            check_volume(volume)
            roi = load_roi(volume, rois, args.roi_label)
            patches.append(crop.run(volume, roi.mask).array)
        except (StageError, NotEvaluable, OSError) as e:
            skipped.append((row["study"], getattr(e, "reason", str(e))))
            continue
        names.append(row["study"])
        if args.label:
            labels.append(float(row[args.label]))
        else:
            times.append(float(row[args.time]))
            events.append(float(row[args.event]))
    if not patches:
        raise SystemExit("train-deep: no usable study in the CSV")
    return TrainData(
        np.stack(patches).astype(np.float32),
        np.asarray(times) if times else None, np.asarray(events) if events else None,
        np.asarray(labels) if labels else None, tuple(names), tuple(skipped),
    )


def train(data: TrainData, args: argparse.Namespace) -> tuple[Any, list[float]]:
    import torch

    from pipelines.deep.encoders import build, load_weights

    torch.manual_seed(args.seed)
    net = build(args.arch, args.dims)
    if args.init:
        load_weights(net, Path(args.init))
    net = net.to(args.device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    x_all = torch.from_numpy(data.patches)[:, None]
    n = x_all.shape[0]
    rng = np.random.default_rng(args.seed)
    losses: list[float] = []
    for _step in range(args.steps):
        idx = rng.choice(n, size=min(args.batch_size, n), replace=False)
        x = x_all[idx].to(args.device)
        out = net(x).flatten()
        if data.label is not None:
            y = torch.as_tensor(data.label[idx], dtype=torch.float32, device=args.device)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out, y)
        else:
            assert data.time is not None and data.event is not None
            t = torch.as_tensor(data.time[idx], dtype=torch.float32, device=args.device)
            e = torch.as_tensor(data.event[idx], dtype=torch.float32, device=args.device)
            loss = cox_loss(out, t, e)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach().cpu()))
    return net.eval(), losses


def run(args: argparse.Namespace) -> int:
    from pipelines.deep.encoders import save_weights
    from pipelines.deep.pipeline import sha256_of

    if not args.label and not (args.time and args.event):
        print("train-deep: give --label, or --time and --event", file=sys.stderr)
        return 2
    data = load_cohort(args.data, args)
    net, losses = train(data, args)
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "weights.safetensors"
    save_weights(net, weights)
    card = {
        "name": f"prognode deep encoder {args.arch} {args.dims}D",
        "version": VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "architecture": {"family": "monai.networks.nets", "arch": args.arch, "spatial_dims": args.dims,
                         "in_channels": 1, "num_classes": 1},
        "input": {"crop_mm": args.crop_mm, "size": args.size, "window_hu": [-200.0, 300.0],
                  "centre": "tumour centroid" if args.dims == 3 else "tumour centroid on its largest slice"},
        "objective": "binary (logistic)" if args.label else "Cox partial likelihood",
        "training_data": {
            "csv": str(args.data), "n_studies": len(data.studies), "skipped": [list(s) for s in data.skipped],
            "events": int(data.event.sum()) if data.event is not None else None,
            "positives": int(data.label.sum()) if data.label is not None else None,
        },
        "training": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "init": str(args.init) if args.init else None, "first_loss": losses[0], "last_loss": losses[-1]},
        "weights": {"file": weights.name, "sha256": sha256_of(weights), "format": "safetensors"},
        "intended_use": "Research feature extractor for the deep-features pipeline on the site's own CT; "
                        "not a diagnostic device. Validate on held-out data before any use.",
    }
    (args.out / "model_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    key = "deep2d" if args.dims == 2 else "deep3d"
    print(f"train-deep: {len(data.studies)} studies, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"wrote {weights}\n  config: [models] {key} = \"{weights}\"")
    return 0


def register(subparsers: Any) -> None:
    """Add ``train-deep`` to the ``prognode`` command line."""
    p = subparsers.add_parser("train-deep", help="fine-tune a MONAI encoder on a site's cohort (Cox or binary)")
    p.add_argument("--data", type=Path, required=True, help="CSV: study folder + survival or label columns")
    p.add_argument("--time", default="", help="survival time column (Cox loss)")
    p.add_argument("--event", default="", help="event column, 1 = event")
    p.add_argument("--label", default="", help="binary label column (logistic loss)")
    p.add_argument("--roi-label", default="", help="segment label / ROI name of the tumour")
    p.add_argument("--arch", default="resnet18", help="resnet10/18/34/50 or seresnet50")
    p.add_argument("--dims", type=int, choices=(2, 3), default=3)
    p.add_argument("--size", type=int, default=64, help="patch side in voxels")
    p.add_argument("--crop-mm", type=float, default=64.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None, help="local weights to start from (.safetensors)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prognode")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
