"""Registers ``prognode cohort features`` and holds the cohort table helpers.

The command itself (every feature family, one row per study, resumable) is
:mod:`pipelines.cohort_features.cli`; this module keeps the ``cohort`` group shared with the
survival tools, the atomic CSV writer and :func:`classify` (used by ``train-deep``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from pipelines.base import NotEvaluable

log = logging.getLogger(__name__)

ID_COLUMNS = ("study", "study_uid", "series_uid", "roi_label", "roi_source", "params", "params_sha256")


def read_table(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_table_atomic(path: Path, rows: Sequence[Mapping[str, Any]], first: Sequence[str] = ID_COLUMNS) -> None:
    """Write all rows (union of columns, identifiers first) to a temp file, fsync, rename."""
    columns = [c for c in first if any(c in r for r in rows)]
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        for r in rows:
            w.writerow(dict(r))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def classify(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files of the largest CT series, ROI objects) of one study folder."""
    from pipelines.common.volume import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
    from pipelines.roi.mask import ROI_SOP_CLASSES

    series: dict[str, list[Path]] = defaultdict(list)
    rois: list[Path] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "SeriesInstanceUID"])
        except Exception:
            continue
        cls = str(ds.get("SOPClassUID", ""))
        if cls in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
            series[str(ds.get("SeriesInstanceUID", ""))].append(f)
        elif cls in ROI_SOP_CLASSES:
            rois.append(f)
    if not series:
        raise NotEvaluable("no CT images in the folder", stage="classify")
    return max(series.values(), key=lambda fs: len(fs)), rois


def _cohort_group(subparsers: Any) -> Any:
    """The ``cohort`` sub-command group, reused when another extension (survival) made it first."""
    existing = subparsers.choices.get("cohort")
    if existing is None:
        parser = subparsers.add_parser("cohort", help="cohort tools")
        return parser.add_subparsers(dest="cohort_command", required=True)
    for action in existing._actions:  # argparse has no public accessor for a parser's subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action
    return existing.add_subparsers(dest="cohort_command", required=True)


def register(subparsers: Any) -> None:
    """Add ``cohort features`` and ``cohort join`` to the ``prognode`` command line (node/cli.py EXTENSIONS)."""
    from pipelines.cohort_features.cli import add_arguments, add_join_arguments, run, run_join

    group = _cohort_group(subparsers)
    p = group.add_parser(
        "features", help="feature table of a folder of studies: body composition, radiomics, deep, dual-phase "
                         "(resumable)")
    add_arguments(p)
    p.set_defaults(func=run)
    j = group.add_parser("join", help="join a feature table to an outcome table by study")
    add_join_arguments(j)
    j.set_defaults(func=run_join)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prognode")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
