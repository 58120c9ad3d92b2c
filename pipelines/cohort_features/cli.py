"""``prognode cohort features``: every feature family of a cohort of study folders, one row per study.

The entry point other code calls (a PACS retrieval wraps it: it fetches studies into folders,
then calls this) is :func:`extract_cohort`::

    from pipelines.cohort_features.cli import CohortOptions, extract_cohort
    run = extract_cohort([Path("studies/p001"), Path("studies/p002")], Path("features.csv"),
                         CohortOptions(families=("body-composition", "radiomics")),
                         models={"deep2d": Path("w2d.safetensors"), "deep3d": Path("w3d.safetensors")})
    run.done, run.skipped, run.failed

Each folder is one study (any file names, any nesting: CT series, tumour SEG/RTSTRUCT); the row's
``study`` is the folder's name.  The table is rewritten atomically after every study, so an
interrupted run loses nothing.  A study whose row is already in the table with the same
``param_hash`` and no ``error`` is skipped; a changed option (or weights file, or parameter file)
re-extracts it, and a row with an ``error`` is retried.  The columns are described in
:mod:`pipelines.cohort_features.families`.

Beside the table, ``<table>.params.json`` (:func:`params_path`) records the options, the
``param_hash`` they give and what they hash (``Plan.describe``), and the ``[models]`` keys used:
``model fit --cohort-features`` copies it into the model, so the node can compute a new study's
features with exactly the same extraction (``pipelines.survival.cohort_source``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.cohort_features.families import FAMILIES, CohortOptions, Plan, extract_study
from pipelines.cohort_features.study import scan

log = logging.getLogger(__name__)

__all__ = ["CohortOptions", "CohortRun", "add_arguments", "extract_cohort", "options_from_args", "params_path",
           "run", "study_folders"]

FIRST_COLUMNS = ("study", "study_uid", "param_hash", "families", "error")


@dataclass(frozen=True)
class CohortRun:
    done: int  # studies extracted (with or without not-evaluable families)
    skipped: int  # already in the table with the same parameter hash
    failed: int  # rows with an error (retried next time)
    out: Path


PARAMS_SCHEMA = "prognode.cohort-features-params"


def params_path(table: Path) -> Path:
    """The sidecar of a feature table: ``features.csv`` -> ``features.params.json``."""
    return table.with_suffix(".params.json")


def write_params(out: Path, plan: Plan) -> Path:
    """The options of ``plan`` as JSON beside the table (what deployment rebuilds the plan from)."""
    o = plan.options
    doc = {"schema": PARAMS_SCHEMA, "param_hash": plan.hash,
           "options": {"families": list(o.families), "label": o.label, "radiomics": dict(o.radiomics),
                       "body_composition": dict(o.body_composition), "deep": dict(o.deep),
                       "dual_phase": dict(o.dual_phase)},
           "models": {k: str(v) for k, v in plan.models.items()},  # the keys deployment passes on
           "describe": plan.describe()}
    path = params_path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def study_folders(root: Path) -> list[Path]:
    """The study folders of a cohort folder: its subfolders, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir())


def extract_cohort(studies: Sequence[Path], out: Path, options: CohortOptions | None = None,
                   models: Mapping[str, Path] | None = None, progress: bool = True) -> CohortRun:
    """Extract every study folder in ``studies`` into the CSV ``out`` (resumable; see the module doc).

    ``models`` is config ``[models]`` (resolved paths): ``deep2d``/``deep3d`` encoder weights,
    the body-composition model for ``backend = "monai"``.  Raises ValueError on bad options or
    two study folders with the same name, before any study is read.
    """
    from tqdm import tqdm

    from pipelines.radiomics.cohort import read_table, write_table_atomic

    names = [Path(s).name for s in studies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"cohort features: study folder names must be unique (the row key): {dupes}")
    plan = Plan(options or CohortOptions(), models)
    rows: list[dict[str, Any]] = list(read_table(out))
    index = {r["study"]: i for i, r in enumerate(rows)}

    def current(folder: Path) -> bool:
        i = index.get(folder.name)
        return i is not None and rows[i].get("param_hash") == plan.hash_for(folder.name) and not rows[i].get("error")

    todo = [Path(s) for s in studies if not current(Path(s))]
    skipped = len(studies) - len(todo)
    done = failed = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    write_params(out, plan)
    for folder in tqdm(todo, desc="cohort features", unit="study", disable=not progress, file=sys.stderr):
        row = extract_study(scan(folder), plan)
        if row["error"]:
            failed += 1
            log.warning("study %s: %s", folder.name, row["error"])
        else:
            done += 1
        if folder.name in index:
            rows[index[folder.name]] = row
        else:
            index[folder.name] = len(rows)
            rows.append(row)
        write_table_atomic(out, rows, first=FIRST_COLUMNS)
    return CohortRun(done, skipped, failed, out)


def add_arguments(p: argparse.ArgumentParser, folder_required: bool = True) -> None:
    """The options of ``cohort features`` (a wrapper that fetches the studies passes False)."""
    p.add_argument("folder", type=Path, nargs=None if folder_required else "?",
                   help="cohort folder: one subfolder per study (CT series, tumour SEG/RTSTRUCT; any nesting)")
    p.add_argument("--out", type=Path, required=True, help="feature table (CSV); current rows are kept and skipped")
    p.add_argument("--families", default="",
                   help=f"comma-separated, some of {','.join(FAMILIES)} (default: all that apply to each study)")
    p.add_argument("--label", default="", help="segment label / ROI name of the tumour (default: the first)")
    p.add_argument("--params", default=None, help="pyradiomics YAML (default: the shipped ct_v1.yaml)")
    p.add_argument("--rings-mode", choices=("cumulative", "annular"), default=None)
    p.add_argument("--levels", nargs="+", default=None, help="body-composition levels to look for (default L3 C3)")
    p.add_argument("--reader-levels", type=Path, default=None,
                   help="CSV: study, level (L3/C3), sop_instance_uid, reader: reader-confirmed levels")
    p.add_argument("--deep-arch", default=None, help="encoder (default resnet18; must match the weights)")
    p.add_argument("--deep-dims", type=int, nargs="+", choices=(2, 3), default=None, help="2, 3 or both (default)")
    p.add_argument("--deep-size", type=int, nargs=2, metavar=("SIDE_2D", "SIDE_3D"), default=None,
                   help="patch side in voxels, 2D and 3D (default 128 64; must match what the weights expect)")
    p.add_argument("--weights-2d", type=Path, default=None,
                   help="pretrained 2D encoder weights (.safetensors; config [models] deep2d)")
    p.add_argument("--weights-3d", type=Path, default=None,
                   help="pretrained 3D encoder weights (.safetensors; config [models] deep3d)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_reader_levels(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        if not r.get("study"):
            raise ValueError(f"{path}: a row without a study")
        out[r["study"]] = {"level": r.get("level", ""), "sop_instance_uid": r.get("sop_instance_uid", ""),
                           "reader": r.get("reader", ""), "source": "api"}
    return out


def options_from_args(args: argparse.Namespace) -> tuple[CohortOptions, dict[str, Path]]:
    """(options, models) from the parsed command line; ValueError on a bad value."""
    families = tuple(f.strip() for f in str(args.families or "").split(",") if f.strip())
    radiomics = {k: v for k, v in {"params": args.params, "rings_mode": args.rings_mode}.items() if v is not None}
    bc = {"levels": list(args.levels)} if args.levels else {}
    deep: dict[str, Any] = {}
    if args.deep_arch:
        deep["arch"] = args.deep_arch
    if args.deep_dims:
        deep["dims"] = list(args.deep_dims)
    if args.deep_size:
        deep["size_2d"], deep["size_3d"] = args.deep_size
    models = {k: Path(v) for k, v in (("deep2d", args.weights_2d), ("deep3d", args.weights_3d)) if v is not None}
    levels = read_reader_levels(args.reader_levels) if args.reader_levels else {}
    return CohortOptions(families=families, label=args.label, radiomics=radiomics, body_composition=bc, deep=deep,
                         reader_levels=levels, device=args.device), models


def run(args: argparse.Namespace) -> int:
    if args.folder is None or not args.folder.is_dir():
        print(f"cohort features: {args.folder} is not a folder", file=sys.stderr)
        return 2
    try:
        options, models = options_from_args(args)
        result = extract_cohort(study_folders(args.folder), args.out, options, models, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"cohort features: {e}", file=sys.stderr)
        return 2
    print(f"cohort features: {result.done} extracted, {result.skipped} already in {args.out}, {result.failed} failed"
          + (" (see the error column)" if result.failed else ""))
    return 1 if result.failed and not result.done and not result.skipped else 0


def join(features: Path, outcomes: Path, out: Path, on: str = "study", outcome_key: str | None = None,
         drop_provenance: bool = True) -> tuple[int, list[str], list[str]]:
    """Features joined to an outcome table, one row per study in both: (rows, features-only, outcomes-only keys).

    With ``drop_provenance`` the text provenance columns (pipeline names, versions, UIDs, hashes,
    not-evaluable reasons, the error column) are left out, so ``model fit`` without ``--features``
    sees the numbers only; rows with an ``error`` are dropped (their families are incomplete).
    """
    import pandas as pd

    f = pd.read_csv(features, dtype={on: str})
    o = pd.read_csv(outcomes, dtype={outcome_key or on: str})
    key = outcome_key or on
    for frame, col, name in ((f, on, features), (o, key, outcomes)):
        if col not in frame.columns:
            raise ValueError(f"{name}: no column {col!r}")
        dup = frame[col][frame[col].duplicated()].tolist()
        if dup:
            raise ValueError(f"{name}: {col!r} repeats {dup[:5]}")
    if "error" in f.columns:
        bad = f["error"].fillna("").astype(str) != ""
        if bad.any():
            log.warning("join: %d studies with an error left out: %s", int(bad.sum()), f.loc[bad, on].tolist())
        f = f.loc[~bad]
    if drop_provenance:
        keep = [c for c in f.columns if c == on or not (c in FIRST_COLUMNS or _provenance(c))]
        f = f[keep]
    if key != on:
        o = o.rename(columns={key: on})
    clash = sorted((set(f.columns) & set(o.columns)) - {on})
    if clash:
        raise ValueError(f"join: columns in both tables: {clash[:5]}")
    merged = f.merge(o, on=on, how="inner")
    out.parent.mkdir(parents=True, exist_ok=True)
    merged.to_csv(out, index=False)
    only_f = sorted(set(f[on]) - set(o[on]))
    only_o = sorted(set(o[on]) - set(f[on]))
    return len(merged), only_f, only_o


PROVENANCE_SUFFIXES = ("_pipeline", "_pipeline_version", "_series_uid", "_params", "_params_sha256", "_model",
                       "_model_version", "_level", "_level_source", "_level_confidence", "_level_sop_instance_uid",
                       "_reader", "_cutoff_table_version", "_not_evaluable", "_weights", "_rois", "_notes",
                       "_roi_label", "_roi_source", "_plausibility_failed", "_reference_phase")


def _provenance(column: str) -> bool:
    head, _, _ = column.partition("_")
    return head in ("bc", "rad", "deep", "dp") and column.endswith(PROVENANCE_SUFFIXES)


def run_join(args: argparse.Namespace) -> int:
    try:
        n, only_f, only_o = join(args.features, args.outcomes, args.out, args.on, args.outcome_key,
                                 not args.keep_provenance)
    except (ValueError, OSError) as e:
        print(f"cohort join: {e}", file=sys.stderr)
        return 2
    print(f"cohort join: {n} studies with features and outcomes -> {args.out}"
          + (f"; {len(only_f)} with features only: {only_f[:5]}" if only_f else "")
          + (f"; {len(only_o)} with outcomes only: {only_o[:5]}" if only_o else ""))
    return 0 if n else 1


def add_join_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="the table of `cohort features`")
    p.add_argument("--outcomes", type=Path, required=True, help="the site's outcome table (CSV)")
    p.add_argument("--on", default="study", help="key column of the feature table (default: study)")
    p.add_argument("--outcome-key", default=None, help="key column of the outcome table (default: as --on)")
    p.add_argument("--keep-provenance", action="store_true", help="keep the text provenance columns")
    p.add_argument("--out", type=Path, required=True)
