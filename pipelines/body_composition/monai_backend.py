"""MONAI backend: a 3D network finds the level section, a 2D network segments the slice.

Following seed 004's recipe: k cross-validation models of each network, combined by a
per-voxel majority vote.  Networks are ``monai.networks.nets.BasicUNet``; weights are read
only from local safetensors files listed in a ``model.json`` written by ``train-seg``
(``safetensors.torch.load_file``: no pickles, no code execution).  torch and monai are
imported here only; the registry and the pipeline module never import this at load time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets.basic_unet import BasicUNet
from numpy.typing import NDArray
from safetensors.torch import load_file

from pipelines.body_composition.labels import TRAIN_CLASSES
from pipelines.body_composition.levels import SpineLevelFinder
from pipelines.body_composition.morphology import runs as _runs
from pipelines.body_composition.types import (
    NAMED_MUSCLES,
    LevelResult,
    SliceAnatomy,
    SliceSegmentation,
    Vertebra,
    keys_for_level,
)
from pipelines.common.volume import Volume

log = logging.getLogger(__name__)

FORMAT = "prognode-bodycomp/1"


@dataclass(frozen=True)
class ModelSpec:
    level: str
    features: tuple[int, ...]
    size2d: int
    shape3d: tuple[int, int, int]
    hu2d: tuple[float, float]
    hu3d: tuple[float, float]
    folds: tuple[Mapping[str, str], ...]
    version: str

    @classmethod
    def read(cls, path: Path) -> ModelSpec:
        d: dict[str, Any] = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} model.json")
        return cls(level=d["level"], features=tuple(d["features"]), size2d=int(d["size2d"]),
                   shape3d=tuple(d["shape3d"]), hu2d=tuple(d["hu2d"]), hu3d=tuple(d["hu3d"]),  # type: ignore[arg-type]
                   folds=tuple(d["folds"]), version=str(d["version"]))


def net2d(features: Sequence[int]) -> torch.nn.Module:
    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=len(TRAIN_CLASSES), features=tuple(features))


def net3d(features: Sequence[int]) -> torch.nn.Module:
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=2, features=tuple(features))


def window(hu: NDArray[np.float32], lo_hi: tuple[float, float]) -> NDArray[np.float32]:
    lo, hi = lo_hi
    return np.asarray(np.clip((hu - lo) / (hi - lo), 0.0, 1.0), dtype=np.float32)


def prep2d(hu: NDArray[np.float32], spec_size: int, hu_window: tuple[float, float]) -> torch.Tensor:
    t = torch.from_numpy(window(hu, hu_window))[None, None]
    return F.interpolate(t, size=(spec_size, spec_size), mode="bilinear", align_corners=False)


def prep3d(hu: NDArray[np.float32], shape: tuple[int, int, int], hu_window: tuple[float, float]) -> torch.Tensor:
    t = torch.from_numpy(window(hu, hu_window))[None, None]
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=False)


def majority(votes: Sequence[NDArray[np.int64]], n_classes: int) -> NDArray[np.int64]:
    """Per-voxel majority vote over the folds' label maps (ties go to the lower class)."""
    counts = np.zeros((n_classes, *votes[0].shape), dtype=np.int16)
    for v in votes:
        for c in range(n_classes):
            counts[c] += v == c
    return np.asarray(np.argmax(counts, axis=0))


def _stored_slice_only(roll_deg: float) -> None:
    """The model segments the slice as stored (it learned turned patients, or not): it takes no spine roll."""
    if roll_deg:
        raise ValueError("MONAI backend: segments the stored slice; the spine's roll is the weight-free backend's")


class MonaiBackend:
    name = "monai"

    def __init__(self, spec: ModelSpec, nets2d: Sequence[torch.nn.Module], nets3d: Sequence[torch.nn.Module],
                 device: str = "cpu") -> None:
        self.spec = spec
        self.nets2d = list(nets2d)
        self.nets3d = list(nets3d)
        self.device = torch.device(device if device != "cuda" or torch.cuda.is_available() else "cpu")
        self.model_version = f"{spec.level} BasicUNet x{len(nets2d)} folds, {spec.version}"
        self.classical = SpineLevelFinder()  # the weight-free finder, for its anatomy and a second opinion

    @classmethod
    def load(cls, model_json: Path, device: str = "cpu") -> MonaiBackend:
        spec = ModelSpec.read(model_json)
        n2, n3 = [], []
        for fold in spec.folds:
            a, b = net2d(spec.features), net3d(spec.features)
            a.load_state_dict(load_file(str(model_json.parent / fold["net2d"])))
            b.load_state_dict(load_file(str(model_json.parent / fold["net3d"])))
            n2.append(a.eval())
            n3.append(b.eval())
        return cls(spec, n2, n3, device)

    def level_section(self, volume: Volume) -> NDArray[np.bool_]:
        """Per-slice flag: the slice belongs to the level vertebra (majority vote of the 3D folds)."""
        x = prep3d(volume.hu, self.spec.shape3d, self.spec.hu3d).to(self.device)
        votes = []
        with torch.no_grad():
            for net in self.nets3d:
                pred = net.to(self.device)(x).argmax(1, keepdim=True).float()
                up = F.interpolate(pred, size=volume.shape, mode="nearest")[0, 0]
                votes.append(up.cpu().numpy().astype(np.int64))
        vote = majority(votes, 2)
        return np.asarray(vote.reshape(vote.shape[0], -1).sum(axis=1) > 0)

    def find_level(self, volume: Volume, levels: Sequence[str]) -> LevelResult:
        classical = self.classical.run(volume, levels)
        if self.spec.level not in levels:
            return LevelResult(level=None, slice_index=None, vertebrae=classical.vertebrae,
                               spine_centre_rc=classical.spine_centre_rc,
                               notes=(f"model is trained for {self.spec.level}, not {'/'.join(levels)}",),
                               method="monai")
        flags = self.level_section(volume)
        runs = _runs(flags)
        notes = list(classical.notes)
        if not runs:
            return LevelResult(level=None, slice_index=None, vertebrae=classical.vertebrae,
                               spine_centre_rc=classical.spine_centre_rc,
                               notes=(*notes, f"3D model found no {self.spec.level} section in the field of view"),
                               method="monai")
        a, b = max(runs, key=lambda r: r[1] - r[0])
        if a == 0 or b == len(flags) - 1:
            return LevelResult(level=None, slice_index=None, vertebrae=classical.vertebrae,
                               spine_centre_rc=classical.spine_centre_rc,
                               notes=(*notes, f"{self.spec.level} section touches the edge of the field of view"),
                               method="monai")
        k = (a + b) // 2
        verts = classical.vertebrae
        if classical.level == self.spec.level and classical.slice_index is not None:
            at = volume.slices_label(classical.slice_index, fallback=" from the feet")  # as a viewer numbers it
            notes.append(f"weight-free level finder agrees ({classical.level} on {at})"
                         if a <= classical.slice_index <= b else
                         f"weight-free level finder disagrees ({classical.level} on {at})")
        else:
            verts = (Vertebra(name=self.spec.level, first=a, last=b, width_mm=0.0, rib_bearing=False,
                              centre_rc=classical.spine_centre_rc, half_width_mm=20.0, half_height_mm=15.0),)
        return LevelResult(level=self.spec.level, slice_index=k, vertebrae=verts,
                           spine_centre_rc=classical.spine_centre_rc, notes=tuple(notes), method="monai")

    def classes(self, hu: NDArray[np.float32]) -> NDArray[np.int64]:
        """Per-pixel class of the slice: majority vote of the 2D fold models."""
        x = prep2d(hu, self.spec.size2d, self.spec.hu2d).to(self.device)
        votes = []
        with torch.no_grad():
            for net in self.nets2d:
                logits = net.to(self.device)(x)
                up = F.interpolate(logits, size=hu.shape, mode="bilinear", align_corners=False)
                votes.append(up.argmax(1)[0].cpu().numpy().astype(np.int64))
        return majority(votes, len(TRAIN_CLASSES))

    def segment_slice(self, hu: NDArray[np.float32], spacing: tuple[float, float],
                      anatomy: SliceAnatomy, level: str = "L3", roll_deg: float = 0.0) -> SliceSegmentation:
        _stored_slice_only(roll_deg)
        if level == "C3":  # trained on lumbar classes only: the C3 structures are not segmented
            empty = np.zeros(hu.shape, bool)
            why = "the MONAI model segments lumbar structures only (not the C3 structures)"
            return SliceSegmentation(masks={k: empty for k in keys_for_level("C3")}, body=hu > -500,
                                     not_evaluable={k: why for k in keys_for_level("C3")})
        c = self.classes(hu)
        idx = {name: i for i, name in enumerate(TRAIN_CLASSES)}
        masks = {
            "skeletal_muscle": np.isin(c, [idx[k] for k in ("muscle_other", *NAMED_MUSCLES)]),
            **{k: c == idx[k] for k in NAMED_MUSCLES},
            "sat": c == idx["sat"], "vat": c == idx["vat"], "imat": c == idx["imat"],
        }
        body = hu > -500
        truncated = bool(body[0, :].any() or body[-1, :].any() or body[:, 0].any() or body[:, -1].any())
        return SliceSegmentation(masks={k: np.asarray(v) for k, v in masks.items()}, body=np.asarray(body),
                                 truncated=truncated)

    def segment_named(self, hu: NDArray[np.float32], spacing: tuple[float, float],
                      anatomy: SliceAnatomy, roll_deg: float = 0.0) -> Mapping[str, NDArray[np.bool_]]:
        _stored_slice_only(roll_deg)
        c = self.classes(hu)
        return {k: np.asarray(c == TRAIN_CLASSES.index(k)) for k in NAMED_MUSCLES}
