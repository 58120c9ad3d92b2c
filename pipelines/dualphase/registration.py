"""Stage ``phase-registration``: rigid (or affine) SimpleITK registration of one CT phase onto another.

Mattes mutual information (the phases differ in contrast), multi-resolution (shrink 4/2/1,
smoothing 2/1/0 mm), regular-step gradient descent with a bounded number of iterations, on
the fixed image cropped around the tumour plus a margin, so it takes seconds.  The result maps
fixed-image points to moving-image points (SimpleITK's convention): ``translation_mm`` is how
far the anatomy moved between the phases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from pipelines.base import StageError

log = logging.getLogger(__name__)

STAGE = "phase-registration"


@dataclass(frozen=True)
class RegistrationInput:
    fixed: sitk.Image
    moving: sitk.Image
    roi: NDArray[np.bool_] | None = None  # on the fixed grid: crop the fixed image around it
    series_uid: str = ""


@dataclass(frozen=True)
class RegistrationResult:
    transform: sitk.Transform
    translation_mm: tuple[float, float, float]  # (x, y, z) LPS
    metric: float
    iterations: int
    stop_condition: str


class PhaseRegistration:
    name = STAGE

    def __init__(self, kind: str = "rigid", iterations: int = 100, margin_mm: float = 30.0, bins: int = 32,
                 sampling: float = 0.25, seed: int = 7) -> None:
        if kind not in ("rigid", "affine"):
            raise ValueError(f"registration kind {kind!r}: expected 'rigid' or 'affine'")
        self.kind, self.iterations, self.margin_mm = kind, iterations, margin_mm
        self.bins, self.sampling, self.seed = bins, sampling, seed

    def _crop(self, image: sitk.Image, roi: NDArray[np.bool_] | None) -> sitk.Image:
        if roi is None or not roi.any():
            return image
        spacing = image.GetSpacing()[::-1]
        idx = np.nonzero(roi)
        lo, hi = [], []
        for axis, size in enumerate(roi.shape):
            m = int(np.ceil(self.margin_mm / spacing[axis]))
            lo.append(max(int(idx[axis].min()) - m, 0))
            hi.append(min(int(idx[axis].max()) + 1 + m, int(size)))
        size_xyz = [b - a for a, b in zip(lo, hi, strict=True)][::-1]
        cropped: sitk.Image = sitk.RegionOfInterest(image, size_xyz, lo[::-1])
        return cropped

    def run(self, data: RegistrationInput) -> RegistrationResult:
        fixed = sitk.Cast(self._crop(data.fixed, data.roi), sitk.sitkFloat32)
        moving = sitk.Cast(data.moving, sitk.sitkFloat32)
        base = sitk.Euler3DTransform() if self.kind == "rigid" else sitk.AffineTransform(3)
        initial = sitk.CenteredTransformInitializer(fixed, moving, base, sitk.CenteredTransformInitializerFilter.GEOMETRY)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=self.bins)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(self.sampling, self.seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                     numberOfIterations=self.iterations,
                                                     gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(initial, inPlace=False)
        try:
            transform = reg.Execute(fixed, moving)
        except RuntimeError as e:
            raise StageError(STAGE, data.series_uid, f"registration failed: {e}") from e
        # Translation of the fixed tumour centre (or image centre) through the transform.
        centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
        moved = transform.TransformPoint(centre)
        shift = tuple(float(m - c) for m, c in zip(moved, centre, strict=True))
        log.info("registration %s: shift %s mm, metric %.4f, %d iterations (%s)", self.kind,
                 np.round(shift, 2).tolist(), reg.GetMetricValue(), reg.GetOptimizerIteration(),
                 reg.GetOptimizerStopConditionDescription())
        return RegistrationResult(transform, (shift[0], shift[1], shift[2]), float(reg.GetMetricValue()),
                                  int(reg.GetOptimizerIteration()), str(reg.GetOptimizerStopConditionDescription()))


def resample_to_fixed(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform,
                      default_hu: float = -1000.0) -> NDArray[np.float32]:
    """The moving image sampled on the fixed grid (z, y, x)."""
    out = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, default_hu, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayFromImage(out), dtype=np.float32)
