"""Partial coverage: slide windows over VerSe-based volumes; whenever L3 is named it must be within one slice.

    PYTHONPATH=. python bench/level_windows.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.body_composition.levels import SpineLevelFinder  # noqa: E402
from tests.verse_spine import SpineCase, as_volume, build  # noqa: E402


def main() -> None:
    for case, sp in (("verse004", 3.0), ("verse004", 5.0), ("verse010", 3.0)):
        c = build(case, sp)
        n, truth = c.hu.shape[0], c.truth_mid["L3"]
        windows = named = wrong = 0
        for a in range(0, n - 10, max(1, n // 14)):
            for b in range(a + 10, n + 1, max(1, n // 10)):
                w = SpineCase(hu=c.hu[a:b], spacing=c.spacing, truth_mid={}, names=())
                r = SpineLevelFinder().run(as_volume(w).canonical_axial()[0], ("L3",))
                windows += 1
                if r.level and r.slice_index is not None:
                    named += 1
                    if abs(r.slice_index + a - truth) > 1.0:
                        wrong += 1
                        print(f"  wrong: slices {a}-{b}: L3 at {r.slice_index + a}, truth {truth:.1f}")
        print(f"{case} {sp:.0f} mm: {windows} windows, L3 named in {named}, more than one slice off in {wrong}")


if __name__ == "__main__":
    main()
