"""``prognode cohort features``: a feature table from a folder of studies.

One subfolder per study holding its CT series and a SEG or RTSTRUCT of the tumour (any file
names, any nesting).  Each study becomes one CSV row: ``study`` (the subfolder name), UIDs, the
ROI used, the parameter file and its sha256, then ``intra_*``, ``ring3_*``, ``ring6_*``,
``ring9_*`` features.  The table is rewritten atomically after every study, so an interrupted
run loses nothing and a re-run skips the studies already in it.  A study that fails is recorded
in ``<out>.errors.csv`` (study, stage, reason) and the run goes on; it is retried next time.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from pipelines.base import NotEvaluable, StageError

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


def study_features(folder: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    from pipelines.common.volume import SeriesToVolume
    from pipelines.radiomics.pipeline import RadiomicsOptions, check_volume, extract, load_roi

    opts = RadiomicsOptions.from_mapping({k: v for k, v in options.items() if v is not None})
    ct, rois = classify(folder)
    volume = SeriesToVolume().run(ct)
    check_volume(volume)
    roi = load_roi(volume, rois, opts.label)
    result = extract(volume, roi, opts)
    return {
        "study": folder.name, "study_uid": volume.study_uid, "series_uid": volume.series_uid, "roi_label": roi.label,
        "roi_source": roi.source_kind, "params": result.params.name, "params_sha256": result.params.sha256,
        **result.features,
    }


def build(root: Path, out: Path, options: Mapping[str, Any], progress: bool = True) -> tuple[int, int, int]:
    """Features for every study folder under ``root`` not yet in ``out``: (done, skipped, failed)."""
    from tqdm import tqdm

    rows: list[dict[str, Any]] = list(read_table(out))
    done_ids = {r["study"] for r in rows}
    errors_path = out.with_name(out.stem + ".errors.csv")
    errors: list[dict[str, Any]] = []
    studies = sorted(p for p in root.iterdir() if p.is_dir())
    todo = [s for s in studies if s.name not in done_ids]
    skipped = len(studies) - len(todo)
    done = failed = 0
    for folder in tqdm(todo, desc="cohort features", unit="study", disable=not progress, file=sys.stderr):
        try:
            rows.append(study_features(folder, options))
            write_table_atomic(out, rows)
            done += 1
        except (StageError, NotEvaluable, ValueError, OSError) as e:
            failed += 1
            stage = getattr(e, "stage", "") or type(e).__name__
            reason = getattr(e, "reason", "") or str(e)
            log.warning("study %s failed: %s: %s", folder.name, stage, reason)
            errors.append({"study": folder.name, "stage": stage, "reason": reason})
    if errors:
        write_table_atomic(errors_path, errors, first=("study", "stage", "reason"))
    elif errors_path.exists():
        errors_path.unlink()
    return done, skipped, failed


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="one subfolder per study: CT series + SEG or RTSTRUCT")
    p.add_argument("--out", type=Path, required=True, help="feature table (CSV); existing rows are kept and skipped")
    p.add_argument("--label", default="", help="segment label / ROI name of the tumour (default: the first)")
    p.add_argument("--params", default=None, help="pyradiomics YAML (default: the shipped ct_v1.yaml)")
    p.add_argument("--rings-mode", choices=("cumulative", "annular"), default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        print(f"cohort features: {args.folder} is not a folder", file=sys.stderr)
        return 2
    options = {"label": args.label, "params": args.params, "rings_mode": args.rings_mode,
               "write_seg": False, "write_sr": False}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done, skipped, failed = build(args.folder, args.out, options, progress=not args.no_progress)
    print(f"cohort features: {done} extracted, {skipped} already in {args.out}, {failed} failed"
          + (f" (see {args.out.with_name(args.out.stem + '.errors.csv')})" if failed else ""))
    return 1 if failed and not done and not skipped else 0


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
    """Add ``cohort features`` to the ``prognode`` command line (node/cli.py EXTENSIONS)."""
    p = _cohort_group(subparsers).add_parser("features", help="radiomics feature table from a folder of studies (resumable)")
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prognode")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
