"""Feature extraction time per study: radiomics (intratumoral + 3/6/9 mm rings) and deep features.

Realistic ROI: a 45 mm sphere in a 512 x 512 x 100 CT (0.8 x 0.8 mm pixels, 2.5 mm slices).
Radiomics is timed *before* the shape fix (shape features on every mask, whole volume given
to pyradiomics) and *after* it (shape on the tumour only, every mask cropped to its bounding
box plus 10 mm), plus the two changes separately.  Deep features: ResNet18 / SE-ResNet50,
2D (128 px patch) and 3D (64^3 patch), embedding with and without Grad-CAM.  Deep weights are
random (saved and re-loaded as safetensors like real ones): timing does not depend on them.

    .venv/bin/python bench/features.py            # everything
    .venv/bin/python bench/features.py --quick    # skip the slow 'before' radiomics row
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def phantom(shape: tuple[int, int, int] = (100, 512, 512), spacing: tuple[float, float, float] = (2.5, 0.8, 0.8),
            radius_mm: float = 22.5) -> tuple[Any, np.ndarray, np.ndarray, tuple[float, float, float]]:
    from pipelines.roi.geometry import to_sitk  # noqa: F401  (import cost outside the timings)

    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [(s - 1) / 2 for s in shape]
    d2 = ((z - c[0]) * spacing[0]) ** 2 + ((y - c[1]) * spacing[1]) ** 2 + ((x - c[2]) * spacing[2]) ** 2
    tumour = d2 <= radius_mm**2
    body = ((y - c[1]) * spacing[1]) ** 2 + ((x - c[2]) * spacing[2]) ** 2 <= 180.0**2
    rng = np.random.default_rng(0)
    hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, shape)
    hu[tumour] += 30.0 + 20.0 * np.sin(np.asarray(d2[tumour]) / 40.0)  # some texture
    return hu.astype(np.float32), tumour, body, spacing


CPU: dict[str, float] = {}


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best wall time of ``repeat`` runs; the CPU seconds of that run (all threads) go to CPU["last"]."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall = time.perf_counter() - t
        if wall < best:
            best, CPU["last"] = wall, time.process_time() - c
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the slow 'before' radiomics rows")
    ap.add_argument("--repeat", type=int, default=1, help="best of N")
    ap.add_argument("--no-deep", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import SimpleITK as sitk

    from pipelines.radiomics.features import (
        BodyMask,
        ExtractionInput,
        Params,
        PeritumoralRings,
        RadiomicsExtractor,
        RingsInput,
    )

    rows: list[tuple[str, float, float, str]] = []
    hu, tumour, _, spacing = phantom()
    img = sitk.GetImageFromArray(hu)
    img.SetSpacing(spacing[::-1])
    vol_ml = tumour.sum() * np.prod(spacing) / 1000
    print(f"phantom: {hu.shape} voxels, spacing {spacing} mm, tumour {vol_ml:.1f} ml; "
          f"cpu threads {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", file=sys.stderr)

    t, _ = timed(lambda: BodyMask().run(hu, spacing[1] * spacing[2]), args.repeat)
    rows.append(("body mask, all 100 slices (for reference)", t, CPU["last"], ""))
    zs = np.nonzero(tumour.any(axis=(1, 2)))[0]
    ring_slices = range(max(int(zs.min()) - 5, 0), min(int(zs.max()) + 6, hu.shape[0]))
    t, body = timed(lambda: BodyMask().run(hu, spacing[1] * spacing[2], ring_slices), args.repeat)
    rows.append((f"body mask, the rings' {len(ring_slices)} slices (pipeline)", t, CPU["last"], ""))
    t, rings = timed(lambda: PeritumoralRings().run(RingsInput(tumour, spacing, body)), args.repeat)
    rows.append(("rings 3/6/9 mm (EDT in mm on bbox)", t, CPU["last"], ""))
    masks = {"intra": tumour, **rings}
    params = Params.load()
    variants = [("radiomics after fix: shape on tumour only, cropped", dict(shape_on_rings=False, crop=True)),
                ("radiomics: shape on all masks, cropped", dict(shape_on_rings=True, crop=True)),
                ("radiomics: shape on tumour only, whole volume", dict(shape_on_rings=False, crop=False))]
    if not args.quick:
        variants.append(("radiomics before fix: shape on all masks, whole volume", dict(shape_on_rings=True, crop=False)))
    for name, kw in variants:
        t, feats = timed(lambda kw=kw: RadiomicsExtractor(params, **kw).run(ExtractionInput(img, masks)), args.repeat)
        rows.append((name, t, CPU["last"], f"{len(feats)} features"))

    if not args.no_deep:
        import torch

        from pipelines.common.volume import Volume
        from pipelines.deep.crop import RoiCrop
        from pipelines.deep.encoders import build, load_weights, save_weights
        from pipelines.deep.features import DeepEmbed

        torch.manual_seed(0)
        n = hu.shape[0]
        eye = np.eye(3)
        slices = tuple(type("S", (), {"position": np.array([0.0, 0.0, k * spacing[0]]), "dataset": None})() for k in range(n))
        volume = Volume(series_uid="bench", study_uid="bench", hu=hu, slices=slices,  # type: ignore[arg-type]
                        row_direction=eye[0], column_direction=eye[1], normal=eye[2],
                        pixel_spacing=(spacing[1], spacing[2]), positions=np.arange(n) * spacing[0],
                        slice_spacing=spacing[0], spacing_uniform=True, max_spacing_deviation=0.0, tilt_degrees=0.0,
                        slice_thickness=spacing[0])
        with tempfile.TemporaryDirectory() as tmp:
            for arch in ("resnet18", "seresnet50"):
                for dims, size in ((2, 128), (3, 64)):
                    path = Path(tmp) / f"{arch}{dims}.safetensors"
                    save_weights(build(arch, dims), path)
                    net = build(arch, dims)
                    t_load, _ = timed(lambda net=net, path=path: load_weights(net, path), 1)
                    t_crop, patch = timed(lambda dims=dims, size=size: RoiCrop(dims, size, 64.0).run(volume, tumour),
                                          args.repeat)
                    c_crop = CPU["last"]
                    emb = DeepEmbed(net, arch, args.device, attention=False)
                    emb.run(patch.array)  # warm-up
                    t_emb, e = timed(lambda emb=emb, patch=patch: emb.run(patch.array), args.repeat)
                    c_emb = CPU["last"]
                    cam = DeepEmbed(net, arch, args.device, attention=True)
                    t_cam, _ = timed(lambda cam=cam, patch=patch: cam.run(patch.array), args.repeat)
                    label = f"deep {dims}D {arch} ({size}{'^3' if dims == 3 else '^2'} patch)"
                    rows.append((f"{label}: crop", t_crop, c_crop, ""))
                    rows.append((f"{label}: embedding", t_emb, c_emb, f"{e.vector.size} features; load {t_load:.2f} s"))
                    rows.append((f"{label}: embedding + Grad-CAM", t_cam, CPU["last"], ""))

    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'wall s':>7}  {'cpu s':>7}  notes")
    for name, t, cpu, note in rows:
        print(f"{name:<{width}}  {t:7.2f}  {cpu:7.2f}  {note}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
