"""Compare two folders of written DICOM objects element by element (a writer change must not change them).

    .venv/bin/python bench/compare_dicom_outputs.py OLD_DIR NEW_DIR --source CT_DIR

Every ``*.dcm`` in both folders is read with pydicom and compared recursively: same tags in the
same order, same VRs, same sequence lengths, same values (PixelData byte for byte).  Dates and
times (DA, TM, DT) are skipped, and a UID may differ only where it was generated for the new
object (not a UID of a source instance in ``--source``) and consistently (one old UID always maps
to the same new one).  summary.json is compared too, its timings aside.  Exit status 1 on any
difference, which is listed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

_TIMINGS = ("timings_s", "cpu_timings_s")


def source_uids(folder: Path) -> set[str]:
    """Study, series, instance, Frame of Reference and SOP Class UIDs of every instance in ``folder``."""
    out: set[str] = set()
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        out |= {str(ds.get(kw, "")) for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID",
                                                "FrameOfReferenceUID", "SOPClassUID")}
    out.discard("")
    return out


class Comparison:
    def __init__(self, sources: set[str]) -> None:
        self.sources = sources
        self.uid_map: dict[str, str] = {}
        self.diffs: list[str] = []

    def datasets(self, x: Dataset, y: Dataset, path: str) -> None:
        tx, ty = [e.tag for e in x], [e.tag for e in y]
        if tx != ty:
            self.diffs.append(f"{path}: tags differ {sorted(set(tx) ^ set(ty))}")
            return
        for ex in x:
            ey = y[ex.tag]
            p = f"{path}.{ex.keyword or ex.tag}"
            if ex.VR != ey.VR:
                self.diffs.append(f"{p}: VR {ex.VR} vs {ey.VR}")
            elif ex.VR == "SQ":
                if len(ex.value) != len(ey.value):
                    self.diffs.append(f"{p}: {len(ex.value)} vs {len(ey.value)} items")
                    continue
                for i, (ix, iy) in enumerate(zip(ex.value, ey.value, strict=True)):
                    self.datasets(ix, iy, f"{p}[{i}]")
            elif ex.VR in ("DA", "TM", "DT"):
                continue
            elif ex.VR == "UI":
                self.uid(str(ex.value), str(ey.value), p)
            elif ex.value != ey.value:
                self.diffs.append(f"{p}: {str(ex.value)[:80]!r} vs {str(ey.value)[:80]!r}")

    def uid(self, old: str, new: str, path: str) -> None:
        if old == new:
            return
        if old in self.sources or new in self.sources or self.uid_map.setdefault(old, new) != new:
            self.diffs.append(f"{path}: {old} vs {new}")


def compare(old: Path, new: Path, sources: set[str]) -> list[str]:
    """Differences between the objects (and summary.json) of ``old`` and ``new``; empty when the same."""
    c = Comparison(sources)
    names = sorted(p.name for p in old.glob("*.dcm"))
    new_names = sorted(p.name for p in new.glob("*.dcm"))
    if names != new_names:
        c.diffs.append(f"files differ: {names} vs {new_names}")
    for name in sorted(set(names) & set(new_names)):
        x, y = pydicom.dcmread(old / name), pydicom.dcmread(new / name)
        c.datasets(x.file_meta, y.file_meta, f"{name}:meta")
        c.datasets(x, y, name)
        frames = f", {x.NumberOfFrames} frames" if "NumberOfFrames" in x else ""
        print(f"{name}: {len(x)} top-level elements{frames} compared")
    if (old / "summary.json").exists() and (new / "summary.json").exists():
        a: dict[str, Any] = json.loads((old / "summary.json").read_text())
        b: dict[str, Any] = json.loads((new / "summary.json").read_text())
        for d in (a, b):
            for key in _TIMINGS:
                d.pop(key, None)
        if a != b:
            c.diffs.append("summary.json differs: " + ", ".join(sorted(k for k in a.keys() | b.keys()
                                                                       if a.get(k) != b.get(k))))
        else:
            print("summary.json: same (timings aside)")
    return c.diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--source", type=Path, required=True, help="the CT series the objects were derived from")
    a = ap.parse_args(argv)
    diffs = compare(a.old, a.new, source_uids(a.source))
    print(f"differences: {len(diffs)}")
    for d in diffs[:50]:
        print(f"  {d}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
