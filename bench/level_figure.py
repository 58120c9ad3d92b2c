"""The figure in docs/level-finding.md: a VerSe-based volume (sub-verse004, 3 mm), sagittal view through the
traced column with the centre line, discs and names, the bone profile with the discs marked, and the anchors.

    PYTHONPATH=. python bench/level_figure.py   # writes docs/level-finding.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipelines.body_composition.levels as L  # noqa: E402
from tests.verse_spine import as_volume, build  # noqa: E402


def main() -> None:
    case = build("verse004", 3.0)
    vol, _ = as_volume(case).canonical_axial()
    keep: dict[str, list[float]] = {}
    orig = L._Ctx.find_discs

    def spy(self: L._Ctx) -> list[float]:
        d = orig(self)
        keep["prof"], keep["discs"] = [float(x) for x in self.prof], list(d)
        return d

    L._Ctx.find_discs = spy  # type: ignore[method-assign]
    res = L.SpineLevelFinder().run(vol, ("L3",))
    L._Ctx.find_discs = orig  # type: ignore[method-assign]
    body = np.array(res.body_line)
    canal = np.array(res.canal_line)
    c_mid = int(round(float(np.median(body[:, 1]))))
    n = vol.shape[0]
    fig, ax = plt.subplots(1, 2, figsize=(11, 8), gridspec_kw={"width_ratios": [1.3, 1]})
    ax[0].imshow(vol.hu[:, :, c_mid], cmap="gray", vmin=-200, vmax=700, origin="lower",
                 aspect=vol.slice_spacing / vol.pixel_spacing[0])
    ax[0].plot(body[:, 0], np.arange(n), "c-", lw=1, label="vertebral-body centre line")
    ax[0].plot(canal[:, 0], np.arange(n), "y-", lw=1, label="spinal canal centre line")
    for d in keep["discs"]:
        ax[0].axhline(d, color="r", lw=0.6)
    for v in res.vertebrae:
        if v.name:
            y = v.middle if v.middle is not None else 0.5 * (v.first + v.last)
            ax[0].text(5, y, v.name + (" (rib)" if v.rib_bearing else ""), color="w", fontsize=8, va="center")
    if res.slice_index is not None:
        ax[0].axhline(res.slice_index, color="lime", lw=1.2, ls="--", label=f"{res.level} level slice")
    ax[0].set_title("sub-verse004 based volume, 3 mm: sagittal", fontsize=9)
    ax[0].set_xlabel("row (anterior -> posterior)")
    ax[0].set_ylabel("slice (feet -> head)")
    ax[0].legend(loc="upper right", fontsize=7)
    prof = np.asarray(keep["prof"])
    ax[1].plot(prof, np.arange(n), "k-", lw=1)
    for d in keep["discs"]:
        ax[1].axhline(d, color="r", lw=0.6)
    for i, a in enumerate(res.anchors):
        ax[1].axhspan(a.slices[0], a.slices[1], alpha=0.12, color="b")
        ax[1].text(float(np.max(prof)) * 0.45, a.slices[1] - 2.0 - 4.0 * i,
                   f"{a.name} -> {' or '.join(a.names)} (slices {a.vertebra_slices[0]}-{a.vertebra_slices[1]})",
                   fontsize=7, color="b", va="top")
    ax[1].set_title(f"bone profile in the body; discs red; anchors blue ({res.confidence})", fontsize=9)
    ax[1].set_xlabel("HU")
    fig.tight_layout()
    out = Path(__file__).resolve().parents[1] / "docs" / "level-finding.png"
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
