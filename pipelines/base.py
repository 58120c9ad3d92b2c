"""Contracts shared by every pipeline.

A *stage* takes its configuration in ``__init__`` and has a pure ``run`` whose input and
output are dataclasses; it works without the node.  A *pipeline* composes stages and is
what the node's jobs (and ``prognode run``) call: ``pipeline.run(ctx) -> PipelineOutput``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from dicom_templates.identity import Identity, Predecessor  # re-exported: defined in the lowest layer

__all__ = [
    "Identity", "NotEvaluable", "Pipeline", "PipelineContext", "PipelineOutput", "Predecessor", "SeriesInput",
    "Stage", "StageError",
]

In = TypeVar("In", contravariant=True)
Out = TypeVar("Out", covariant=True)


class StageError(RuntimeError):
    """A stage failed; the message names the stage and the series."""

    def __init__(self, stage: str, series_uid: str, reason: str) -> None:
        super().__init__(f"{stage} failed for series {series_uid or '?'}: {reason}")
        self.stage = stage
        self.series_uid = series_uid
        self.reason = reason


class NotEvaluable(Exception):
    """The input cannot give a trustworthy result; the pipeline reports 'not evaluable' and why."""

    def __init__(self, reason: str, stage: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


class Stage(Protocol[In, Out]):
    name: str

    def run(self, data: In) -> Out: ...


@dataclass(frozen=True)
class SeriesInput:
    """One stored series: its files on disk, in no particular order."""

    series_uid: str
    study_uid: str
    files: tuple[Path, ...]
    role: str = ""  # for study-level routes: the name of the matched requirement (e.g. "arterial")


@dataclass(frozen=True)
class PipelineContext:
    series: tuple[SeriesInput, ...]  # one for series-level routes; several for study-level
    work_dir: Path  # empty folder the pipeline writes into
    identity: Identity
    options: Mapping[str, Any] = field(default_factory=dict)  # config [pipelines.<name>]
    models: Mapping[str, Path] = field(default_factory=dict)  # config [models], resolved paths
    predecessors: tuple[Predecessor, ...] = ()
    device: str = "cpu"  # "cpu" or "cuda"
    extra_files: tuple[Path, ...] = ()  # other objects of the study (SEG/RTSTRUCT ROIs, ...)


@dataclass(frozen=True)
class PipelineOutput:
    files: tuple[Path, ...]  # DICOM objects to export, written under work_dir
    summary: Mapping[str, Any]  # JSON-serialisable measurements and provenance
    evaluable: bool = True
    reason: str = ""  # why not evaluable


@runtime_checkable
class Pipeline(Protocol):
    name: str
    version: str

    def run(self, ctx: PipelineContext) -> PipelineOutput: ...
