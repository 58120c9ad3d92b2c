"""``prognode sweep --config FILE --from DATE --to DATE [--dry-run] [--source NAME] [--json]``.

The instances it retrieves (C-GET, WADO-RS) go through the process's shared :class:`~node.storage.Storage`
with the disk watermark's relief attached as in ``prognode serve`` (:func:`relieved_storage`): below
``[node] min_free_bytes`` what ``[retention]`` allows is purged (when enabled) before an instance is refused."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from node import config as config_mod
from node.audit import AuditLog, AuditSink
from node.config import Config
from node.db import Database
from node.dicom_facts import SweepState
from node.retention import Retention
from node.storage import Storage
from node.sweep.plan import SweepError, parse_date
from node.sweep.sweeper import open_database, run_sweep
from node.watermark import attach, detach, for_node


@contextmanager
def relieved_storage(config: Config, db: Database, audit: AuditSink | None) -> Iterator[Storage]:
    """The shared Storage that :func:`run_sweep` writes through, its watermark relief attached (node.watermark,
    the same wiring as node.service) while the sweep runs."""
    storage = Storage.shared(config.storage_dir, config.node.fsync, config.node.min_free_bytes)
    watermark = for_node(config, audit, Retention(config, db, audit))
    attach(storage, watermark)
    try:
        yield storage
    finally:
        detach(storage, watermark)
        storage.close()


def _cmd_sweep(args: argparse.Namespace) -> int:
    config = config_mod.load(args.config, overrides=list(args.set or ()))
    db = open_database(config)
    try:
        audit = AuditLog(config.path(config.logging.audit_file))
        with relieved_storage(config, db, audit):
            out = run_sweep(config, db, parse_date(args.date_from), parse_date(args.date_to), args.dry_run,
                            args.source, audit=audit, progress=lambda line: print(line, flush=True))
    except (SweepError, config_mod.ConfigError, ValueError) as e:
        print(f"prognode sweep: {e}", flush=True)
        return 2
    finally:
        db.dispose()
    if args.json:
        print(json.dumps({k: v for k, v in asdict(out).items() if k != "items"}, indent=1))
    return 0 if out.state == SweepState.DONE and not out.failed else 1


def register(subparsers: Any) -> None:
    """Add ``prognode sweep`` to the node CLI (loaded through ``node.cli.EXTENSIONS``)."""
    p = subparsers.add_parser("sweep", help="query a PACS for a date range and retrieve what is missing")
    p.add_argument("--config", required=True, type=Path, help="config.toml")
    p.add_argument("--from", dest="date_from", required=True, help="first study date, YYYY-MM-DD")
    p.add_argument("--to", dest="date_to", required=True, help="last study date, YYYY-MM-DD")
    p.add_argument("--dry-run", action="store_true", help="query and check the ledger, retrieve nothing")
    p.add_argument("--source", default=None, help="[[sources]] name (default: [sweep].source, else the first)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--json", action="store_true", help="print the report summary as JSON at the end")
    p.set_defaults(func=_cmd_sweep)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m node.sweep sweep ...`` (the same as ``prognode sweep``)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="prognode")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))
