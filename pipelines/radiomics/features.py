"""Stages for tumour radiomics: body mask, peritumoral rings in millimetres, pyradiomics extraction.

Rings are built with a Euclidean distance transform in millimetres on the (possibly
anisotropic) voxel grid, ``distance_transform_edt(~tumour, sampling=(dz, dy, dx))``, so a 3 mm
ring is 3 mm in every direction whatever the slice spacing (see :func:`surface_distance_mm`).  ``cumulative`` rings are the
shells (0, r] mm outside the tumour (the usual 3/6/9 mm peritumoral regions); ``annular``
rings are (r_prev, r].  Rings are kept inside the body and optionally clipped to an organ.

Shape features in pyradiomics are slow for large or hollow masks (surface meshes) and
meaningless for rings, so by default they are computed once, on the tumour, and every mask
is cropped to its bounding box plus a margin before extraction.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import yaml
from numpy.typing import NDArray
from scipy import ndimage

from pipelines.base import StageError

log = logging.getLogger(__name__)

DEFAULT_PARAMS = "ct_v1.yaml"


# Body mask -------------------------------------------------------------------------------
class BodyMask:
    """Stage: HU array -> body mask, slice by slice.

    On each slice: voxels above ``threshold_hu``, holes filled (lungs, bowel gas), components
    smaller than ``min_area_mm2`` dropped (noise, thin table parts).  Arms and legs stay in.
    ``slices`` limits the work to the slices that matter (the rings' extent); others are False.
    """

    name = "body-mask"

    def __init__(self, threshold_hu: float = -500.0, min_area_mm2: float = 500.0) -> None:
        self.threshold_hu = threshold_hu
        self.min_area_mm2 = min_area_mm2

    def run(self, hu: NDArray[np.float32], pixel_area_mm2: float = 1.0, slices: range | None = None) -> NDArray[np.bool_]:
        body = np.zeros(hu.shape, dtype=bool)
        min_pixels = self.min_area_mm2 / pixel_area_mm2
        for k in slices if slices is not None else range(hu.shape[0]):
            filled = ndimage.binary_fill_holes(hu[k] > self.threshold_hu)
            labels, n = ndimage.label(filled)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel())
            keep = np.nonzero(sizes >= min_pixels)[0]
            keep = keep[keep > 0]
            body[k] = np.isin(labels, keep)
        return body


# Rings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingsInput:
    tumour: NDArray[np.bool_]
    spacing_zyx: tuple[float, float, float]
    body: NDArray[np.bool_] | None = None
    organ: NDArray[np.bool_] | None = None


class PeritumoralRings:
    """Stage: tumour mask -> ``{"ring3": mask, "ring6": mask, "ring9": mask}`` built in mm."""

    name = "peritumoral-rings"

    def __init__(self, radii_mm: Sequence[float] = (3.0, 6.0, 9.0), mode: str = "cumulative") -> None:
        if mode not in ("cumulative", "annular"):
            raise ValueError(f"rings mode {mode!r}: expected 'cumulative' or 'annular'")
        if not radii_mm or any(r <= 0 for r in radii_mm) or list(radii_mm) != sorted(radii_mm):
            raise ValueError(f"ring radii {list(radii_mm)}: expected increasing positive millimetres")
        self.radii_mm = tuple(float(r) for r in radii_mm)
        self.mode = mode

    def run(self, data: RingsInput) -> dict[str, NDArray[np.bool_]]:
        tumour = data.tumour
        if not tumour.any():
            raise ValueError("empty tumour mask")
        rmax = self.radii_mm[-1]
        # Work on the bounding box plus the largest radius (plus one voxel): the EDT of a full CT is slow.
        lo, hi = bbox(tumour, margin_mm=rmax, spacing=data.spacing_zyx, extra=1)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        dist = surface_distance_mm(tumour[sl], data.spacing_zyx)
        keep = np.ones(dist.shape, bool)
        if data.body is not None:
            keep &= data.body[sl]
        if data.organ is not None:
            keep &= data.organ[sl]
        out: dict[str, NDArray[np.bool_]] = {}
        prev = 0.0
        for r in self.radii_mm:
            inner = prev if self.mode == "annular" else 0.0
            ring = np.zeros(tumour.shape, bool)
            shell = (dist <= r) & ~tumour[sl]
            if inner > 0:
                shell &= dist > inner
            ring[sl] = shell & keep
            out[f"ring{r:g}"] = ring
            prev = r
        return out


def surface_distance_mm(mask: NDArray[np.bool_], spacing: Sequence[float]) -> NDArray[np.float64]:
    """Distance (mm) from each outside voxel centre to the surface of ``mask``; 0 inside.

    The EDT gives the distance to the nearest inside voxel *centre*.  The surface that a voxelised
    object stands for lies, on average, between its outermost centres and their voxel faces, so
    half of the centre-to-face distance along the same direction is subtracted.  On sphere
    phantoms this matches analytic shell volumes within about 2 % for slices up to 3 mm (the
    plain centre distance is 5-18 % short for a 3 mm ring on 2.5-3 mm slices).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    dist, idx = ndimage.distance_transform_edt(~mask, sampling=sp, return_indices=True)
    grid = np.indices(mask.shape)
    exit_mm = np.full(mask.shape, np.inf)
    for axis in range(mask.ndim):
        step = np.abs(grid[axis] - idx[axis]).astype(np.float64) * sp[axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            exit_mm = np.minimum(exit_mm, np.where(step > 0, 0.5 * sp[axis] * dist / step, np.inf))
    out = np.where(mask, 0.0, dist - 0.5 * exit_mm)
    return np.asarray(np.maximum(out, 0.0), dtype=np.float64)


def bbox(mask: NDArray[np.bool_], margin_mm: float, spacing: Sequence[float], extra: int = 0) -> tuple[list[int], list[int]]:
    """Bounding box (lo, hi exclusive) of ``mask`` grown by ``margin_mm`` (+``extra`` voxels), clipped."""
    idx = np.nonzero(mask)
    lo, hi = [], []
    for axis, size in enumerate(mask.shape):
        m = int(np.ceil(margin_mm / float(spacing[axis]))) + extra
        lo.append(max(int(idx[axis].min()) - m, 0))
        hi.append(min(int(idx[axis].max()) + 1 + m, int(size)))
    return lo, hi


# pyradiomics -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """A pyradiomics parameter file and its sha256 (written into every output)."""

    name: str
    data: Mapping[str, Any]
    sha256: str

    @classmethod
    def load(cls, source: str | Path = DEFAULT_PARAMS) -> Params:
        path = Path(source)
        if path.is_file():
            raw = path.read_bytes()
            name = path.name
        else:
            raw = resources.files("pipelines.radiomics").joinpath("params", str(source)).read_bytes()
            name = str(source)
        data = yaml.safe_load(raw)
        if not isinstance(data, dict):
            raise ValueError(f"radiomics params {name}: not a mapping")
        return cls(name=name, data=data, sha256=hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class ExtractionInput:
    image: sitk.Image  # HU image
    masks: Mapping[str, NDArray[np.bool_]]  # prefix -> mask on the image grid (z, y, x)
    series_uid: str = ""


class RadiomicsExtractor:
    """Stage: image + named masks -> ``{prefix_feature: value}`` with pyradiomics.

    Parameters
    ----------
    params:
        The parameter file.
    shape_on_rings:
        Also compute shape features for masks other than ``intra`` (slow, meaningless; for benchmarks).
    crop:
        Crop image and mask to the mask's bounding box plus ``crop_margin_mm`` before extraction.
    """

    name = "radiomics-extract"

    def __init__(self, params: Params, shape_on_rings: bool = False, crop: bool = True, crop_margin_mm: float = 10.0) -> None:
        self.params = params
        self.shape_on_rings = shape_on_rings
        self.crop = crop
        self.crop_margin_mm = crop_margin_mm

    def _extractor(self, with_shape: bool) -> Any:
        from radiomics import featureextractor

        logging.getLogger("radiomics").setLevel(logging.ERROR)
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.params.data.items()}
        classes = dict(data.get("featureClass") or {})
        if not with_shape:
            classes.pop("shape", None)
            classes.pop("shape2D", None)
        data["featureClass"] = classes
        return featureextractor.RadiomicsFeatureExtractor(data)

    def run(self, data: ExtractionInput) -> dict[str, float]:
        extractors = {True: self._extractor(True), False: self._extractor(False)}
        spacing = data.image.GetSpacing()[::-1]  # (z, y, x)
        out: dict[str, float] = {}
        for prefix, mask in data.masks.items():
            if not mask.any():
                raise StageError(self.name, data.series_uid, f"mask {prefix!r} is empty")
            image, label = data.image, _mask_image(mask, data.image)
            if self.crop:
                lo, hi = bbox(mask, self.crop_margin_mm, spacing)
                size = [b - a for a, b in zip(lo, hi, strict=True)]
                image = sitk.RegionOfInterest(data.image, size[::-1], lo[::-1])
                label = sitk.RegionOfInterest(label, size[::-1], lo[::-1])
            with_shape = prefix == "intra" or self.shape_on_rings
            try:
                result = extractors[with_shape].execute(image, label)
            except Exception as e:
                raise StageError(self.name, data.series_uid, f"pyradiomics on {prefix!r}: {e}") from e
            for key, value in result.items():
                if key.startswith("diagnostics_"):
                    continue
                name = key[len("original_"):] if key.startswith("original_") else key
                out[f"{prefix}_{name}"] = float(np.asarray(value))
        return out


def _mask_image(mask: NDArray[np.bool_], reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(reference)
    return img
