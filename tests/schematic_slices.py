"""Schematic axial slices on canonical axes (rows -> back, columns -> patient's left), with truth.

``neck_slice``: C3.  Paravertebral muscles (deep posterior muscles, splenius/trapezius, scalenes, longus colli) and
both sternocleidomastoids are painted as muscle; carotid and jugular vessels enhance; the
airway is air; the vertebra has a body, transverse processes, laminae and a spinous process.

``trunk_with_arm``: an abdomen (SAT, wall muscle ring, VAT, an organ, psoas, erector spinae,
vertebra) with the patient's right arm (humerus in muscle in fat) lying against it, pressed
``overlap_mm`` into the trunk outline (about 0: a skin contact; 20 mm or more: fused).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

PIXEL_MM = 1.0
SIZE = 160


@dataclass
class NeckSlice:
    hu: NDArray[np.float32]
    truth: dict[str, NDArray[np.bool_]]  # C3 keys -> mask
    centre_rc: tuple[float, float]  # vertebral body centre
    half_width_mm: float
    half_height_mm: float


def neck_slice(noise_sd: float = 5.0, seed: int = 0, without_scm: str = "") -> NeckSlice:
    c = (np.arange(SIZE) - (SIZE - 1) / 2.0) * PIXEL_MM
    x, y = np.meshgrid(c, c)  # x: to the patient's left, y: to the back

    def ell(cx: float, cy: float, ax: float, ay: float) -> NDArray[np.bool_]:
        return np.asarray(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0)

    hu = np.full(x.shape, -1000.0)
    body = ell(0, 0, 60, 55)
    hu[body] = -100.0  # fat
    truth = {k: np.zeros(x.shape, bool) for k in ("sternocleidomastoid_left", "sternocleidomastoid_right",
                                                   "paravertebral_left", "paravertebral_right")}
    for name, s in (("left", 1.0), ("right", -1.0)):
        pv = ell(s * 18, 24, 16, 14) | ell(s * 25, 37, 15, 8) | ell(s * 27, 2, 6, 7) | ell(s * 6, -10, 4, 3)
        pv &= (x * s > 0)
        truth[f"paravertebral_{name}"] = pv
        if name != without_scm:
            truth[f"sternocleidomastoid_{name}"] = ell(s * 42, -18, 7, 12)
    for m in truth.values():
        hu[m] = 45.0
    bone = ell(0, 0, 9, 8) | ell(0, 14, 10, 9) | ((np.abs(x) <= 2) & (y >= 20) & (y <= 34))
    bone |= (np.abs(x) >= 8) & (np.abs(x) <= 20) & (y >= -2) & (y <= 3)
    hu[bone] = 400.0
    hu[ell(0, 14, 6, 5)] = 15.0  # canal
    hu[ell(0, -25, 10, 8)] = -1000.0  # airway
    for s in (1.0, -1.0):
        hu[ell(s * 22, -14, 4, 4)] = 250.0  # carotid
        hu[ell(s * 31, -12, 5, 4)] = 180.0  # jugular
    for k in truth:
        truth[k] &= ~bone & (hu > -29) & (hu < 150)
    if noise_sd:
        hu = hu + np.random.default_rng(seed).normal(0.0, noise_sd, hu.shape)
        hu[~body] = -1000.0
    r0 = c0 = (SIZE - 1) / 2.0
    return NeckSlice(hu=hu.astype(np.float32), truth=truth, centre_rc=(r0, c0), half_width_mm=9.0, half_height_mm=8.0)


@dataclass
class TrunkSlice:
    hu: NDArray[np.float32]
    trunk: NDArray[np.bool_]  # the painted trunk (no arm)
    arm: NDArray[np.bool_]  # the painted arm outside the trunk
    centre_rc: tuple[float, float]
    half_width_mm: float
    half_height_mm: float
    pixel_mm: float


def trunk_with_arm(overlap_mm: float = 2.0, size: int = 224, pixel_mm: float = 2.0) -> TrunkSlice:
    c = (np.arange(size) - (size - 1) / 2.0) * pixel_mm
    x, y = np.meshgrid(c, c)

    def ell(cx: float, cy: float, ax: float, ay: float) -> NDArray[np.bool_]:
        return np.asarray(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0)

    hu = np.full(x.shape, -1000.0)
    trunk = ell(0, 0, 120, 90)
    hu[trunk] = -100.0
    hu[ell(0, 0, 105, 75)] = 45.0  # wall muscle ring
    hu[ell(0, 0, 93, 63)] = -100.0  # VAT
    hu[ell(0, -30, 35, 20)] = 60.0  # organ
    for s in (1.0, -1.0):
        hu[ell(s * 35, 25, 12, 15)] = 50.0  # psoas
        hu[ell(s * 30, 52, 18, 11)] = 40.0  # erector spinae
    hu[ell(0, 20, 20, 14)] = 400.0
    hu[ell(0, 42, 9, 9)] = 400.0
    hu[ell(0, 42, 5, 5)] = 15.0
    hu[(np.abs(x) <= 3) & (y >= 48) & (y <= 62)] = 400.0
    ax = -(120.0 + 38.0 - overlap_mm)
    arm = ell(ax, 10, 38, 45) & ~trunk
    hu[arm] = -100.0
    hu[ell(ax, 10, 30, 37) & ~trunk] = 45.0
    hu[ell(ax, 10, 9, 9)] = 500.0  # humerus
    hu[ell(ax, 10, 5, 5)] = 50.0  # marrow
    r0 = (size - 1) / 2.0 + 20.0 / pixel_mm
    return TrunkSlice(hu=hu.astype(np.float32), trunk=trunk, arm=arm, centre_rc=(r0, (size - 1) / 2.0),
                      half_width_mm=20.0, half_height_mm=14.0, pixel_mm=pixel_mm)
