"""Tiny study folders for ``cohort features`` and the recipes: a spine phantom with a tumour SEG, dual-phase."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipelines.body_composition.phantom import PhantomSpec, write_phantom
from tests.phantoms import sphere_phantom, write_ct, write_seg

SPACING = (2.5, 1.0, 1.0)


def abdomen_study(folder: Path, index: int = 0, tumour_mm: float = 12.0, sat_mm: float = 20.0) -> Path:
    """A spine phantom CT (L3 findable, 128 x 3 mm pixels) with a spherical tumour SEG in the abdomen."""
    spec = PhantomSpec(sat_mm=sat_mm, seed=index, noise_sd=5.0, patient_id=f"ABD-{index:03d}",
                       sex="M" if index % 2 == 0 else "F", age=f"{55 + index % 20:03d}Y")
    truth = write_phantom(spec, folder / "ct")
    n, rows, cols = truth.hu.shape
    z, y, x = np.indices(truth.hu.shape).astype(float)
    k0 = truth.level_slices["L2"]
    centre = (k0, rows * 0.35, cols * 0.6)  # anterior left abdomen, in the organ block
    d = ((z - centre[0]) * spec.slice_mm) ** 2 + ((y - centre[1]) * spec.pixel_mm) ** 2 + \
        ((x - centre[2]) * spec.pixel_mm) ** 2
    write_seg(truth.files, d <= tumour_mm**2, folder / "tumour_seg.dcm")
    return folder


def sphere_study(folder: Path, index: int = 0, radius_mm: float = 8.0) -> Path:
    """A small cylinder-body CT with a tumour sphere and its SEG (no spine: body composition not evaluable)."""
    hu, tumour = sphere_phantom((12, 48, 48), SPACING, radius_mm, seed=index, tumour_hu=50.0 + 5 * index)
    ct = write_ct(hu, SPACING, folder / "ct", patient_id=f"SPH-{index:03d}")
    write_seg(ct, tumour, folder / "seg.dcm")
    return folder


def dual_phase_study(folder: Path, index: int = 0, enhancement_hu: float = 80.0) -> Path:
    """Arterial and portal-venous series of one study (the anatomy shifted by 2 mm), the SEG on the portal one."""
    shape, centre = (16, 64, 64), (7.0, 30.0, 34.0)
    pv_hu, tumour = sphere_phantom(shape, SPACING, 9.0, centre=centre, tumour_hu=60.0, seed=2 * index + 1)
    art_hu, _ = sphere_phantom(shape, SPACING, 9.0, centre=centre, tumour_hu=60.0 + enhancement_hu, seed=2 * index + 2)
    study_uid = "1.2.826.0.1.3680043.8.498." + str(int(hashlib.sha1(f"dp{index}".encode()).hexdigest()[:12], 16))
    pv = write_ct(pv_hu, SPACING, folder / "pv", origin=(-32.0, -32.0, 0.0), study_uid=study_uid,
                  frame_of_reference=study_uid + ".9", description="PORTAL VENOUS", series_number=3,
                  patient_id=f"DP-{index:03d}")
    write_ct(art_hu, SPACING, folder / "art", origin=(-30.0, -32.0, 0.0), study_uid=study_uid,
             frame_of_reference=study_uid + ".9", description="ARTERIAL", series_number=2, patient_id=f"DP-{index:03d}")
    write_seg(pv, tumour, folder / "seg.dcm")
    return folder


def encoder_weights(folder: Path, arch: str = "resnet10", dims: tuple[int, ...] = (2, 3)) -> dict[str, Path]:
    """Seeded encoder weights saved as safetensors ("pretrained" stand-ins for tests: not signal)."""
    import torch

    from pipelines.deep.encoders import build, save_weights

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for d in dims:
        out[f"deep{d}d"] = folder / f"{arch}_{d}d.safetensors"
        save_weights(build(arch, d), out[f"deep{d}d"])
    return out
