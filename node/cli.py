"""``prognode``: the node's command line.

Commands: ``serve``, ``config check``, ``echo``, ``status``, ``resend``, ``run``.  Every
command takes ``--set section.key=value`` (repeatable); precedence is command line >
environment (``PROGNODE_<SECTION>_<KEY>``) > file > defaults (see :func:`node.config.load`).

Other packages add sub-commands through :data:`EXTENSIONS`: each ``module:register`` is
called as ``register(subparsers)``; a sub-command sets ``func=handler`` with
``handler(args) -> int`` and may use :func:`add_common` and :func:`config_from_args`.
An extension whose module does not exist yet is skipped; any other import error is raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from node.config import Config, ConfigError, load

EXTENSIONS = (
    "node.sweep:register",
    "node.retention:register",
    "pipelines.radiomics.cohort:register",  # before survival: it creates `cohort`, survival adds to it
    "pipelines.survival.cli:register",
    "pipelines.body_composition.train:register",
    "pipelines.deep.train:register",
    "node.retract:register",  # retract, rerun
    "node.sweep.cohort:register",  # after pipelines.radiomics.cohort: `cohort features --source` (retrieve, then extract)
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

logger = logging.getLogger(__name__)


def add_common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    """``--config FILE`` and repeatable ``--set section.key=value``."""
    p.add_argument("--config", type=Path, required=config_required, help="config.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key (repeatable; wins over environment and file)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load(getattr(args, "config", None), list(getattr(args, "overrides", []) or []))


def _setup_logging(config: Config, file: bool = False) -> None:
    from node.logs import setup_logging

    setup_logging(config.logging, config.path(config.logging.file) if (file and config.logging.file) else None)


# Commands -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from node.service import Node

    config = config_from_args(args)
    _setup_logging(config, file=True)
    Node(config, factories=args.factories).serve()
    return EXIT_OK


def check_config(config: Config) -> list[str]:
    """Checks beyond the schema: pipelines named by routes exist."""
    from pipelines import registry

    problems = []
    for i, route in enumerate(config.routes):
        for j, name in enumerate(route.pipelines):
            if name not in registry.REGISTRY:
                problems.append(f"routes[{i}].pipelines[{j}]: unknown pipeline {name!r}; known: "
                                f"{', '.join(registry.names())}")
    for name in config.pipelines:
        if name not in registry.REGISTRY:
            problems.append(f"pipelines.{name}: unknown pipeline {name!r}")
        if "level_override" in config.pipelines[name]:
            problems.append(f"pipelines.{name}.level_override: set per job (a reader-confirmed level: "
                            "prognode run --level, POST /api/series/{uid}/level, a marker from the viewer), "
                            "never in a config file")
    return problems


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        config = load(args.file, list(args.overrides))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from node import transports
    from node.tls import tls_problems

    # TLS files that are missing or do not load; a DICOMweb peer's credential files too
    problems = check_config(config) + tls_problems(config) + transports.problems(config)
    if problems:
        for p in problems:
            print(f"config error: {p}", file=sys.stderr)
        return EXIT_USAGE
    print(f"ok: {args.file}: AE {config.node.ae_title} on {config.node.host}:{config.node.port}, "
          f"{len(config.destinations)} destinations, {len(config.routes)} routes, storage {config.storage_dir}")
    return EXIT_OK


def _echo_answer(name: str, label: str, ok: bool, why: str) -> int:
    if not ok:
        print(f"echo {name} ({label}): {why}", file=sys.stderr)
        return EXIT_FAIL
    print(f"echo {name} ({label}): ok ({why})")
    return EXIT_OK


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a DIMSE destination or source, or a QIDO-RS request to a DICOMweb destination or source,
    with the settings export and sweeps use (TLS, credentials)."""

    from pynetdicom import AE

    from node import transports
    from node.config import RemoteAE
    from node.dicom_facts import VERIFICATION
    from node.tls import associate

    config = config_from_args(args)
    names = [d.name for d in config.destinations] + [s.name for s in config.sources]
    if args.dest not in names:
        print(f"echo: unknown destination {args.dest!r}; known: {', '.join(names) or 'none'}", file=sys.stderr)
        return EXIT_USAGE
    dest = next((d for d in config.destinations if d.name == args.dest), None)
    if dest is not None:
        sender = transports.sender_for(dest.model_copy(update={"timeout_seconds": args.timeout}), config)
        return _echo_answer(args.dest, sender.describe(), *sender.echo())
    source = config.source(args.dest)
    if not isinstance(source, RemoteAE):  # a DICOMweb source: the echo of a DICOMweb destination (QIDO-RS)
        from node.transports.dicomweb import peer_echo, peer_where

        return _echo_answer(args.dest, source.url,
                            *peer_echo(source, config.base_dir, peer_where(source), args.timeout))
    peer: RemoteAE = source
    label = f"{peer.ae_title}@{peer.host}:{peer.port}{' over TLS' if peer.tls.enabled else ''}"
    ae = AE(ae_title=config.node.ae_title)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = args.timeout
    ae.connection_timeout = args.timeout
    ae.add_requested_context(VERIFICATION)
    opened = associate(ae, peer, config.base_dir)  # the peer's [tls] settings, as sweeps use them
    if not opened.ok or opened.assoc is None:
        print(f"echo {args.dest}: no association: {opened.error}", file=sys.stderr)
        return EXIT_FAIL
    assoc = opened.assoc
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status is not None and "Status" in status else -1
    ok = code == 0
    print(f"echo {args.dest} ({label}): {'ok' if ok else f'status {code:#06x}'}")
    return EXIT_OK if ok else EXIT_FAIL


def status_document(config: Config) -> dict[str, Any]:
    from node.audit import AuditLog
    from node.db import Database
    from node.index import Index
    from node.jobs import JobQueue

    db = Database(config.database_url)
    try:
        series = Index(db, config.storage_dir).all_series()
        jobs = JobQueue(db, AuditLog(None)).list()
    finally:
        db.dispose()
    return {
        "series": [{"series_uid": s.series_uid, "study_uid": s.study_uid, "modality": s.modality,
                    "instances": s.instances, "state": s.state, "generation": s.generation,
                    "completion_reason": s.completion_reason} for s in series],
        "jobs": [{"id": j.id, "series_uid": j.series_uid, "pipeline": j.pipeline, "state": j.state,
                  "attempts": j.attempts, "error": j.error, "route": j.route} for j in jobs],
    }


def cmd_status(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    doc = status_document(config)
    if args.json:
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    print(f"{len(doc['series'])} series")
    for s in doc["series"]:
        print(f"  {s['state']:<10} {s['instances']:>5}  {s['modality']:<6} {s['series_uid']}")
    print(f"{len(doc['jobs'])} jobs")
    for j in doc["jobs"]:
        err = f"  {j['error'][:80]}" if j["error"] else ""
        print(f"  #{j['id']:<5} {j['state']:<8} {j['pipeline']:<18} attempts {j['attempts']}  {j['series_uid']}{err}")
    return EXIT_OK


def cmd_resend(args: argparse.Namespace) -> int:
    from node.audit import AuditLog
    from node.db import Database
    from node.jobs import NothingToResend, resend_job

    config = config_from_args(args)
    db = Database(config.database_url)
    try:
        out = resend_job(db, args.job_id, AuditLog(config.path(config.logging.audit_file)), by="cli")
    except KeyError as e:
        print(f"resend: {e.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    except NothingToResend as e:
        print(f"resend: {e}", file=sys.stderr)
        return EXIT_FAIL
    finally:
        db.dispose()
    done = ["queued again"] if out.job_requeued else []
    if out.exports_requeued or not out.job_requeued:
        done.append(f"{out.exports_requeued} exports queued again")
    print(f"job {args.job_id}: {', '.join(done)}")
    return EXIT_OK


NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "KO", "PR", "RWV"}


def group_folder(folder: Path) -> tuple[dict[str, list[Path]], dict[str, str], list[Path]]:
    """DICOM files of a folder grouped by series: ({series: files}, {series: study}, non-image files)."""
    import pydicom

    groups: dict[str, list[Path]] = defaultdict(list)
    studies: dict[str, str] = {}
    extra: list[Path] = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:
            continue
        if str(ds.get("Modality", "")) in NON_IMAGE_MODALITIES:
            extra.append(f)
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups[uid].append(f)
        studies[uid] = str(ds.get("StudyInstanceUID", "") or "")
    return dict(groups), studies, extra


LEVEL_PIPELINE = "body-composition"  # the pipeline that takes a reader-confirmed level (--level)


class LevelArgError(ValueError):
    """``--level`` cannot be used as given; the message says why."""


def level_override(level_arg: str, reader: str, files: Sequence[Path]) -> dict[str, str]:
    """``--level L3=SLICE`` -> the pipeline's ``level_override``: SLICE with a dot is a SOP Instance
    UID, digits only an Instance Number; an absent or repeated instance number is refused."""
    import pydicom

    from node.reader import LEVELS, check_reader, now_iso

    level, sep, slice_ = level_arg.partition("=")
    level, slice_ = level.strip().upper(), slice_.strip()
    if not sep or level not in LEVELS or not slice_:
        raise LevelArgError(f"--level {level_arg!r}: expected LEVEL=SLICE with LEVEL one of {', '.join(LEVELS)} "
                            "(e.g. L3=42 or L3=1.2.840...)")
    if "." not in slice_ and not slice_.isdigit():
        raise LevelArgError(f"--level {level_arg!r}: SLICE is an Instance Number (digits) or a SOP Instance UID "
                            "(with dots)")
    try:
        reader = check_reader(reader)
    except ValueError as e:
        raise LevelArgError(f"--reader: {e}") from None
    headers = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "InstanceNumber"])
               for f in files]
    if "." in slice_:
        if not any(str(h.get("SOPInstanceUID", "")) == slice_ for h in headers):
            raise LevelArgError(f"--level: no image of the series has SOP Instance UID {slice_}")
        sop = slice_
    else:
        hits = [str(h.SOPInstanceUID) for h in headers if str(h.get("InstanceNumber", "")).strip() == str(int(slice_))]
        if not hits:
            raise LevelArgError(f"--level: no image of the series has Instance Number {int(slice_)}")
        if len(hits) > 1:
            raise LevelArgError(f"--level: {len(hits)} images of the series have Instance Number {int(slice_)}; "
                                "give the SOP Instance UID instead")
        sop = hits[0]
    return {"level": level, "sop_instance_uid": sop, "reader": reader, "source": "cli", "time": now_iso()}


def cmd_run(args: argparse.Namespace) -> int:
    from node.jobs import JobSpec, identity_from_config, run_pipeline
    from pipelines.base import SeriesInput

    config = config_from_args(args)
    _setup_logging(config)
    if args.level is not None and args.pipeline != LEVEL_PIPELINE:
        print(f"run: --level is for {LEVEL_PIPELINE} only, not {args.pipeline}", file=sys.stderr)
        return EXIT_USAGE
    if args.reader and args.level is None:
        print("run: --reader names who confirmed a --level; give --level too", file=sys.stderr)
        return EXIT_USAGE
    groups, studies, extra = group_folder(args.input_dir)
    if not groups:
        print(f"run: no DICOM image series in {args.input_dir}", file=sys.stderr)
        return EXIT_USAGE
    if len(groups) > 1:
        print(f"run: {args.input_dir} holds {len(groups)} image series ({', '.join(groups)}); "
              "give a folder with one series", file=sys.stderr)
        return EXIT_USAGE
    uid, files = next(iter(groups.items()))
    options = dict(config.pipelines.get(args.pipeline, {}))
    if args.level is not None:
        try:
            options["level_override"] = level_override(args.level, args.reader or "", files)
        except LevelArgError as e:
            print(f"run: {e}", file=sys.stderr)
            return EXIT_USAGE
    spec = JobSpec(job_id=0, attempt=1, pipeline=args.pipeline, options=options,
                   series=(SeriesInput(uid, studies[uid], tuple(files)),), work_dir=args.out.resolve(),
                   identity=identity_from_config(config), extra_files=tuple(extra),
                   models={k: config.path(v) for k, v in config.models.items()},
                   device="cpu" if config.jobs.device == "auto" else config.jobs.device,
                   factory=(args.factories or {}).get(args.pipeline, ""))
    try:
        out = run_pipeline(spec)
    except Exception as e:
        print(f"run: {args.pipeline} failed: {e}", file=sys.stderr)
        return EXIT_FAIL
    for f in out.files:
        print(f)
    print(spec.work_dir / "summary.json")
    if not out.evaluable:
        print(f"not evaluable: {out.reason}")
    return EXIT_OK


# Parser ---------------------------------------------------------------------------------


def load_extensions(subparsers: Any, extensions: Sequence[str] = EXTENSIONS) -> None:
    for ext in extensions:
        module_name, func_name = ext.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if missing and (module_name == missing or module_name.startswith(missing + ".")):
                continue
            raise
        getattr(module, func_name)(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prognode", description="A DICOM-native AI node for oncologic CT.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node in the foreground (SIGTERM/SIGINT stop it cleanly)")
    add_common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    c = csub.add_parser("check", help="validate a config file; errors name the key")
    c.add_argument("file", type=Path)
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("echo", help="C-ECHO (or QIDO-RS for a DICOMweb one) a configured destination or source")
    p.add_argument("dest")
    p.add_argument("--timeout", type=float, default=10.0)
    add_common(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("status", help="series and jobs")
    p.add_argument("--json", action="store_true")
    add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("resend", help="queue a job's exports (or a failed job) again")
    p.add_argument("job_id", type=int)
    add_common(p)
    p.set_defaults(func=cmd_resend)

    p = sub.add_parser("run", help="run a pipeline on a folder of DICOM files, without the node")
    p.add_argument("pipeline")
    p.add_argument("input_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--level", metavar="LEVEL=SLICE",
                   help="body-composition only: measure at a reader-confirmed level, L3 or C3, on SLICE (an "
                        "Instance Number, or a SOP Instance UID)")
    p.add_argument("--reader", default="", metavar="FAMILY^GIVEN",
                   help="who confirmed the --level (named in the SR as Person Observer)")
    add_common(p, config_required=False)
    p.set_defaults(func=cmd_run)

    load_extensions(sub)
    return parser


def main(argv: Sequence[str] | None = None, factories: Mapping[str, str] | None = None) -> int:
    """Entry point; ``factories`` (pipeline name -> "module:function") is for tests only."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.factories = dict(factories or {})
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
