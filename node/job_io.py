"""How a job's input files reach a worker and its outputs come back: one small interface.

:class:`JobIO` has two sides.  On the node, :meth:`JobIO.ship` turns a :class:`node.jobs.JobSpec`
(local absolute paths) into a :class:`Shipment`, and :meth:`JobIO.land` turns what the worker
returned into a :class:`node.jobs.JobOutcome` whose files lie in the node's result folder.  On the
worker, :meth:`JobIO.open` gives the spec the worker runs (its own paths) and :meth:`JobIO.pack`
what goes back.  :func:`run_shipment` is the worker's whole job.

- :class:`SharedPathIO` (``[runner] io = "shared-path"``): every worker mounts the node's storage at
  the same path; nothing is copied, the spec travels as it is.
- :class:`ObjectStoreIO` (``io = "object-store"``): the node reads the input files into a
  ``{relative name: bytes}`` bundle that the runner puts in its engine's object store (Ray's);
  the worker writes them into a temporary folder, runs, and returns every file of its work
  folder the same way; the node writes them into the job's result folder.

An S3-compatible store would be a third implementation: ``ship`` uploads and puts keys in the
bundle, ``open`` downloads (not written: no S3 server can be installed here to test it against).
Nothing here imports an engine: the runner moves the bundles.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from node.jobs import JobOutcome, JobSpec, execute
from pipelines.base import Pipeline, SeriesInput

logger = logging.getLogger(__name__)

WORK = "work"  # the worker's work folder inside its scratch folder


@dataclass(frozen=True)
class Shipment:
    """What crosses to a worker: the spec (paths the worker understands) and the file bundle."""

    spec: JobSpec
    files: Mapping[str, bytes] = field(default_factory=dict)  # relative path -> content


@dataclass(frozen=True)
class Returned:
    """What comes back: the outcome (paths relative to the work folder where files travel) and the files."""

    outcome: JobOutcome
    files: Mapping[str, bytes] = field(default_factory=dict)


class JobIO(Protocol):
    name: str

    def ship(self, spec: JobSpec) -> Shipment: ...  # node

    def open(self, shipment: Shipment, scratch: Path) -> JobSpec: ...  # worker

    def pack(self, spec: JobSpec, outcome: JobOutcome) -> Returned: ...  # worker

    def land(self, spec: JobSpec, returned: Returned) -> JobOutcome: ...  # node


class SharedPathIO:
    """The worker sees the node's storage at the same path: nothing is copied."""

    name = "shared-path"

    def ship(self, spec: JobSpec) -> Shipment:
        return Shipment(spec)

    def open(self, shipment: Shipment, scratch: Path) -> JobSpec:
        return shipment.spec

    def pack(self, spec: JobSpec, outcome: JobOutcome) -> Returned:
        return Returned(outcome)

    def land(self, spec: JobSpec, returned: Returned) -> JobOutcome:
        return returned.outcome


def _inside(path: Path, root: Path) -> str | None:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


def _safe_relative(name: str) -> str:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"file name {name!r} leaves its folder")
    return p.as_posix()


class ObjectStoreIO:
    """Input and output files travel as bytes (the runner puts the bundle in its object store)."""

    name = "object-store"

    def ship(self, spec: JobSpec) -> Shipment:
        files: dict[str, bytes] = {}
        series = []
        for k, s in enumerate(spec.series):
            names = []
            for i, f in enumerate(s.files):
                rel = f"in/{k}/{i:05d}-{f.name}"
                files[rel] = f.read_bytes()
                names.append(Path(rel))
            series.append(replace(s, files=tuple(names)))
        extra = []
        for i, f in enumerate(spec.extra_files):
            rel = f"extra/{i:05d}-{f.name}"
            files[rel] = f.read_bytes()
            extra.append(Path(rel))
        # models stay paths: weights are installed on the workers (nothing is downloaded at run time)
        return Shipment(replace(spec, series=tuple(series), extra_files=tuple(extra), work_dir=Path(WORK)), files)

    def open(self, shipment: Shipment, scratch: Path) -> JobSpec:
        for rel, data in shipment.files.items():
            target = scratch / _safe_relative(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        spec = shipment.spec
        series = tuple(SeriesInput(s.series_uid, s.study_uid, tuple(scratch / p for p in s.files), s.role)
                       for s in spec.series)
        return replace(spec, series=series, extra_files=tuple(scratch / p for p in spec.extra_files),
                       work_dir=scratch / spec.work_dir)

    def pack(self, spec: JobSpec, outcome: JobOutcome) -> Returned:
        files: dict[str, bytes] = {}
        if spec.work_dir.is_dir():
            for p in sorted(spec.work_dir.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    files[p.relative_to(spec.work_dir).as_posix()] = p.read_bytes()
        results = []
        for r in outcome.files:
            rel = _inside(Path(r.path), spec.work_dir)
            if rel is None:  # a result written outside the work folder still comes back
                rel = f"outside/{Path(r.path).name}"
                files[rel] = Path(r.path).read_bytes()
            results.append(replace(r, path=rel))
        return Returned(replace(outcome, files=tuple(results)), files)

    def land(self, spec: JobSpec, returned: Returned) -> JobOutcome:
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        for rel, data in returned.files.items():
            target = spec.work_dir / _safe_relative(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        files = tuple(replace(r, path=str(spec.work_dir / _safe_relative(r.path))) for r in returned.outcome.files)
        return replace(returned.outcome, files=files)


IOS: dict[str, type[SharedPathIO] | type[ObjectStoreIO]] = {"shared-path": SharedPathIO,
                                                            "object-store": ObjectStoreIO}


def job_io(name: str) -> JobIO:
    try:
        return IOS[name]()
    except KeyError:
        raise ValueError(f"runner.io: unknown {name!r}; known: {', '.join(IOS)}") from None


def run_shipment(io: JobIO, shipment: Shipment, pipeline: Pipeline | None = None) -> Returned:
    """The worker's job: materialise the inputs in a temporary folder, run, pack the outputs.

    Never raises for a pipeline's failure (:func:`node.jobs.execute`); the scratch folder is
    removed afterwards (for ``shared-path`` it holds nothing)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"prognode-job{shipment.spec.job_id}-"))
    try:
        spec = io.open(shipment, scratch)
        outcome = execute(spec, pipeline)
        return io.pack(spec, outcome)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

