"""Pipeline "deep-features": MONAI encoder embeddings (2D and/or 3D) around the tumour, with Grad-CAM.

``ctx.series`` holds the CT, ``ctx.extra_files`` the tumour SEG/RTSTRUCT.  Weights come only
from config ``[models]`` (``model_2d``/``model_3d`` name the keys, default ``deep2d``/``deep3d``);
without them the pipeline refuses to run.  Features ``deep2d_000..`` and ``deep3d_000..`` (the
global-average-pooled embedding) go to features.json/csv in the work folder; the Grad-CAM map
of the encoder's head, thresholded, is exported as a SEG segment ("Attention 3D/2D") next to
the tumour so a viewer shows where the network looked.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines import registry
from pipelines.base import NotEvaluable, PipelineContext, PipelineOutput, StageError
from pipelines.common.options import parse_options
from pipelines.common.volume import SeriesToVolume, Volume
from pipelines.deep.crop import RoiCrop, patch_map_to_volume
from pipelines.radiomics.pipeline import check_volume, load_roi, pick_ct, write_table
from pipelines.roi.mask import RoiMask, find_roi_objects

log = logging.getLogger(__name__)

NAME = "deep-features"
VERSION = registry.version(NAME)  # the one place: pipelines/registry.py


@dataclass(frozen=True)
class DeepOptions:
    arch: str = "resnet18"
    dims: tuple[int, ...] = (2, 3)
    model_2d: str = "deep2d"
    model_3d: str = "deep3d"
    crop_mm: float = 64.0
    size_2d: int = 128
    size_3d: int = 64
    window: tuple[float, float] = (-200.0, 300.0)
    attention: bool = True
    attention_threshold: float = 0.5
    label: str = ""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> DeepOptions:
        from pipelines.deep.encoders import ARCHES

        opts = parse_options(cls, options, NAME)
        if opts.arch not in ARCHES:
            raise ValueError(f"pipelines.{NAME}.arch: {opts.arch!r} is not one of {ARCHES}")
        if not opts.dims or any(d not in (2, 3) for d in opts.dims):
            raise ValueError(f"pipelines.{NAME}.dims: expected 2, 3 or both")
        return opts


@dataclass(frozen=True)
class DeepResult:
    features: dict[str, float]
    attention: dict[int, NDArray[np.bool_]]  # dims -> mask on the CT grid
    scores: dict[int, float]
    weights_sha256: dict[int, str]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def deep_features(volume: Volume, roi: RoiMask, opts: DeepOptions, models: Mapping[str, Path], device: str) -> DeepResult:
    """Embeddings and attention for each requested dimensionality (torch imported here)."""
    import torch

    from pipelines.deep.encoders import build, load_weights
    from pipelines.deep.features import DeepEmbed

    torch.set_grad_enabled(True)
    features: dict[str, float] = {}
    attention: dict[int, NDArray[np.bool_]] = {}
    scores: dict[int, float] = {}
    hashes: dict[int, str] = {}
    for dims in opts.dims:
        key = opts.model_2d if dims == 2 else opts.model_3d
        if key not in models:
            raise StageError(NAME, volume.series_uid,
                             f"no weights for the {dims}D encoder: set [models] {key} = <local .safetensors> "
                             "(random weights are never used)")
        net = build(opts.arch, dims)
        try:
            load_weights(net, Path(models[key]))
        except (OSError, ValueError, RuntimeError) as e:
            raise StageError(NAME, volume.series_uid, f"models.{key}: {e}") from e
        hashes[dims] = sha256_of(Path(models[key]))
        size = opts.size_2d if dims == 2 else opts.size_3d
        patch = RoiCrop(dims, size, opts.crop_mm, opts.window).run(volume, roi.mask)
        emb = DeepEmbed(net, opts.arch, device, opts.attention).run(patch.array)
        features.update({f"deep{dims}d_{i:03d}": float(v) for i, v in enumerate(emb.vector)})
        scores[dims] = emb.score
        if opts.attention:
            cam = patch_map_to_volume(volume, patch, emb.cam)
            attention[dims] = cam >= opts.attention_threshold
    return DeepResult(features, attention, scores, hashes)


class DeepFeatures:
    name = NAME
    version = VERSION

    def __init__(self, options: DeepOptions) -> None:
        self.options = options

    def run(self, ctx: PipelineContext) -> PipelineOutput:
        opts = self.options
        try:
            ct = pick_ct(ctx.series)
            volume = SeriesToVolume().run(ct.files)
            check_volume(volume)
            others = [f for s in ctx.series if s is not ct for f in s.files]
            roi = load_roi(volume, find_roi_objects([*ctx.extra_files, *others]), opts.label)
        except NotEvaluable as e:
            return PipelineOutput(files=(), summary={"pipeline": NAME, "reason": e.reason}, evaluable=False, reason=e.reason)
        result = deep_features(volume, roi, opts, ctx.models, ctx.device)
        row: dict[str, Any] = {"study_uid": volume.study_uid, "series_uid": volume.series_uid, "roi_label": roi.label,
                               "arch": opts.arch, **result.features}
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        (ctx.work_dir / "features.json").write_text(json.dumps(row), encoding="utf-8")
        write_table(ctx.work_dir / "features.csv", row)
        files: list[Path] = []
        if opts.attention:
            files.append(self._write_seg(ctx, volume, roi, result))
        summary = {"pipeline": NAME, "version": VERSION, "arch": opts.arch, "dims": list(opts.dims),
                   "scores": {f"{d}d": s for d, s in result.scores.items()},
                   "weights_sha256": {f"{d}d": h for d, h in result.weights_sha256.items()},
                   "n_features": len(result.features),
                   "attention_voxels": {f"{d}d": int(m.sum()) for d, m in result.attention.items()}}
        return PipelineOutput(files=tuple(files), summary=summary)

    def _write_seg(self, ctx: PipelineContext, volume: Volume, roi: RoiMask, result: DeepResult) -> Path:
        from dicom_templates.common import Algorithm
        from pipelines.roi.dicom_out import build_mask_seg, save

        o = self.options
        masks = {"tumour": roi.mask}
        labels = {"tumour": f"Tumour ({roi.label})"[:64]}
        for dims, mask in sorted(result.attention.items()):
            if mask.any():
                masks[f"attention-map-{dims}d"] = mask
                labels[f"attention-map-{dims}d"] = f"Attention {dims}D"  # threshold: algorithm parameters
            else:
                log.warning("%dD Grad-CAM map has no voxel above %g: no attention segment", dims, o.attention_threshold)
        params = {"arch": o.arch, "crop_mm": f"{o.crop_mm:g}", "threshold": f"{o.attention_threshold:g}",
                  **{f"weights_{d}d_sha256": h for d, h in result.weights_sha256.items()}}
        algorithm = Algorithm(name=f"prognode {NAME}", version=VERSION, family="family-ai", parameters=params)
        seg = build_mask_seg(volume, masks, ctx.identity, algorithm, "Deep features attention", labels=labels)
        path = ctx.work_dir / "attention_seg.dcm"
        save(seg, path)
        return path


def create(options: Mapping[str, Any]) -> DeepFeatures:
    return DeepFeatures(DeepOptions.from_mapping(options))
