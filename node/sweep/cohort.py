"""``prognode cohort features --config C --source NAME --studies LIST.csv FOLDER --out T.csv [--keep]``.

Adds ``--source``, ``--studies``, ``--keep`` (and ``--config``/``--set`` where the command has none) to the
``cohort features`` command that :mod:`pipelines.radiomics.cohort` registers, and wraps its handler (the
pipelines never import the node): each line of LIST (a StudyInstanceUID or an AccessionNumber; a header line
and ``#`` comments are skipped) is looked up on the ``[[sources]]`` entry NAME (C-FIND or QIDO-RS), every
series of the study is retrieved with the sweep's machinery (C-MOVE to the running node, C-GET or WADO-RS;
through the node's own store path, skipping series the node already has) and the study's instance files
are linked into ``FOLDER/<line>/``.  Then the folder-based extraction runs on FOLDER as it would on any
folder of studies (its table, its resumability, its errors file), and the per-study folders made here are
removed unless ``--keep`` (the node's own copy stays in its storage, like any swept study).

Lines already in the ``--out`` table (its ``study`` column) are not retrieved again.  A study that cannot be
found or retrieved gets a row in ``<out>.errors.csv`` (study, stage ``retrieve``, reason) and the cohort goes
on.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from node import config as config_mod
from node.audit import AuditLog
from node.config import Config
from node.db import Database, Instance
from node.storage import Storage
from node.sweep.plan import SweepError, remote_studies
from node.sweep.retrieve import Source, check_move_destination, default_store_handler
from node.sweep.sweeper import Sweeper, open_database

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")
HEADERS = {"studyinstanceuid", "accessionnumber", "study_uid", "accession", "study"}
ERROR_COLUMNS = ("study", "stage", "reason")


def read_study_list(path: Path) -> list[str]:
    """The entries of LIST: the first cell of each line; blank lines, ``#`` comments and a header skipped."""
    entries: list[str] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.reader(f):
            cell = row[0].strip() if row else ""
            if not cell or cell.startswith("#") or (not entries and cell.lower() in HEADERS):
                continue
            if cell not in entries:
                entries.append(cell)
    return entries


def folder_name(entry: str) -> str:
    """The study folder (and table ``study``) name of an entry: the entry, made safe as a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", entry).strip("._")
    return name or "study"


def _done_studies(out: Path) -> set[str]:
    if not out.is_file():
        return set()
    with out.open(newline="", encoding="utf-8") as f:
        return {r.get("study", "") for r in csv.DictReader(f)} - {""}


def study_uids(sweeper: Sweeper, src: Source, entry: str) -> list[str]:
    """The StudyInstanceUIDs an entry names: itself when it is a UID the source has, else the studies with that
    AccessionNumber."""
    key = "StudyInstanceUID" if UID_RE.match(entry) else "AccessionNumber"
    found = [s.study_uid for s in remote_studies(sweeper.query(src).studies({key: entry}))]
    if not found:
        raise SweepError(f"no study with {key} {entry} on {src.name}")
    return found


def retrieve_study(sweeper: Sweeper, src: Source, study_uid: str) -> int:
    """Every series of the study through the sweep's retrieval (series the node has in full are not fetched
    again); the instances retrieved now."""
    series = sweeper.find_series(src, study_uid, modalities=set())
    if not series:
        raise SweepError(f"study {study_uid}: no series on {src.name}")
    got = 0
    for s in series:
        if sweeper.ledger_status(s.series_uid, s.instances) is not None:
            continue
        got += sweeper.retrieve(src, study_uid, s.series_uid)
    return got


def link_study(config: Config, db: Database, study_uid: str, folder: Path) -> int:
    """Hard links (copies across file systems) of the study's indexed instance files in ``folder``; how many."""
    with db.read() as s:
        rows = s.execute(select(Instance.series_uid, Instance.sop_instance_uid, Instance.path)
                         .where(Instance.study_uid == study_uid)).all()
    if not rows:
        raise SweepError(f"study {study_uid}: nothing in the node's index after retrieval")
    for series_uid, sop_uid, rel in rows:
        src = config.storage_dir / rel
        dst = folder / series_uid / f"{sop_uid}.dcm"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    return len(rows)


def _write_errors(path: Path, rows: list[dict[str, str]]) -> None:
    """Add (or replace, by study) the retrieval errors in the extraction's errors file."""
    existing: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            existing = list(csv.DictReader(f))
    ours = {r["study"] for r in rows}
    merged = [r for r in existing if r.get("study") not in ours] + rows
    columns = list(ERROR_COLUMNS) + [c for r in merged for c in r if c not in ERROR_COLUMNS]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(columns)), restval="")
        w.writeheader()
        w.writerows(merged)
    os.replace(tmp, path)


def features_from_source(extract: Handler, args: argparse.Namespace) -> int:
    """``cohort features`` with ``--source``: retrieve each listed study into FOLDER, then ``extract(args)``."""
    if not getattr(args, "source", None):
        if getattr(args, "studies", None):
            print("cohort features: --studies needs --source", file=sys.stderr)
            return 2
        return extract(args)
    if args.studies is None or args.config is None:
        print("cohort features: --source needs --studies LIST.csv and --config FILE", file=sys.stderr)
        return 2
    try:
        config = config_mod.load(args.config, overrides=list(getattr(args, "overrides", None) or ()))
        entries = read_study_list(args.studies)
    except (config_mod.ConfigError, OSError) as e:
        print(f"cohort features: {e}", file=sys.stderr)
        return 2
    root: Path = args.folder
    root.mkdir(parents=True, exist_ok=True)
    done = _done_studies(args.out)
    db = open_database(config)
    storage = Storage.shared(config.storage_dir, fsync=config.node.fsync, min_free_bytes=config.node.min_free_bytes)
    audit = AuditLog(config.path(config.logging.audit_file))
    made: list[Path] = []
    errors: list[dict[str, str]] = []
    try:
        sweeper = Sweeper(config, db, default_store_handler(config, db, audit=audit, storage=storage), audit=audit)
        try:
            src = sweeper.source_config(args.source)
            check_move_destination(config, src)
        except SweepError as e:
            print(f"cohort features: {e}", file=sys.stderr)
            return 2
        todo = [e for e in entries if folder_name(e) not in done]
        print(f"cohort features: {len(entries)} studies listed, {len(entries) - len(todo)} already in {args.out}, "
              f"retrieving {len(todo)} from {src.name}", flush=True)
        for i, entry in enumerate(todo, 1):
            name = folder_name(entry)
            folder = root / name
            try:
                got = 0
                for uid in study_uids(sweeper, src, entry):
                    got += retrieve_study(sweeper, src, uid)
                    fresh = not folder.exists()
                    n = link_study(config, db, uid, folder)
                    if fresh:
                        made.append(folder)
                print(f"[{i}/{len(todo)}] {entry}: {n} instances in {folder} ({got} retrieved now)", flush=True)
            except Exception as e:  # noqa: BLE001 - one study never stops the cohort
                log.warning("cohort study %s: retrieval from %s failed: %s", entry, src.name, e)
                print(f"[{i}/{len(todo)}] {entry}: FAILED {e}", flush=True)
                errors.append({"study": name, "stage": "retrieve", "reason": str(e)[:500]})
                if folder.exists() and folder not in made:
                    made.append(folder)
    finally:
        storage.close()
        db.dispose()
    rc = extract(args)
    if errors:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        _write_errors(args.out.with_name(args.out.stem + ".errors.csv"), errors)
        print(f"cohort features: {len(errors)} studies not retrieved (see "
              f"{args.out.with_name(args.out.stem + '.errors.csv')})")
    if not args.keep:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
    return rc if not errors or len(errors) < len(entries) else 1


def _features_parser(subparsers: Any) -> argparse.ArgumentParser | None:
    cohort = subparsers.choices.get("cohort")
    if cohort is None:
        return None
    for action in cohort._actions:  # argparse has no public accessor for a parser's subparsers
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get("features")
            return found if isinstance(found, argparse.ArgumentParser) else None
    return None


def register(subparsers: Any) -> None:
    """Extend ``cohort features`` (registered by pipelines.radiomics.cohort; node/cli.py EXTENSIONS, after it)."""
    p = _features_parser(subparsers)
    if p is None:
        log.debug("no `cohort features` command to extend")
        return
    options = p._option_string_actions
    p.add_argument("--source", default=None, help="[[sources]] name: retrieve the --studies from it into FOLDER first")
    p.add_argument("--studies", type=Path, default=None,
                   help="with --source: CSV/text, a StudyInstanceUID or AccessionNumber per line")
    p.add_argument("--keep", action="store_true", help="with --source: keep the retrieved study folders")
    if "--config" not in options:
        p.add_argument("--config", type=Path, default=None, help="with --source: the node's config.toml")
    if "--set" not in options:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="with --source: override a config key (repeatable)")
    extract = p.get_default("func")
    p.set_defaults(func=functools.partial(features_from_source, extract))
