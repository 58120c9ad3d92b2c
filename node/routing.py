"""Route matching: a complete series (or a study whose required series are all complete)
becomes one durable job per pipeline of each matching ``[[routes]]`` entry.

Jobs are created inside the caller's transaction, so completing a series and queuing its
jobs happen together or not at all.  The unique ``(pipeline, input_key)`` makes a second
attempt to queue the same input a no-op.

A job's input key includes the pipeline's version (:func:`input_key`, read from
``pipelines/registry.py`` without importing the pipeline), so after an upgrade the same inputs,
routed again (a study route re-evaluated, a sweep), make a new job; the job queue hands it the
earlier job's results as predecessors to supersede.  Jobs queued before the version was in the
key keep their keys (:func:`legacy_input_key`); such a job stands for the installed version
unless it recorded another one.  The key format is in docs/node.md ("Job input keys").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import RouteConfig, SeriesMatch, match_attributes
from node.db import Job, JobState, Series, SeriesState, SweepItem, SweepItemState, now
from node.lanes import Priority
from pipelines import registry

logger = logging.getLogger(__name__)


def input_key(route: str, series: Sequence[dict[str, Any]], version: str,
              level: Mapping[str, Any] | None = None, forced: str = "") -> str:
    """Stable key of a job's input: the first 40 hex digits of the SHA-256 of the canonical JSON
    (sorted keys) of the route, each series UID with its generation, the pipeline version, a
    reader-confirmed level carried over by a re-run (else null) and the request time of a forced
    re-run (else ""); routed jobs and ``prognode rerun`` (node.retract) share it."""
    canon = json.dumps({"route": route, "series": sorted((s["uid"], s["generation"]) for s in series),
                        "pipeline_version": version, "level": dict(level) if level else None, "forced": forced},
                       sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:40]


def legacy_input_key(route: str, series: Sequence[dict[str, Any]]) -> str:
    """The key of routed jobs queued before the version was in it: route and series only."""
    canon = json.dumps({"route": route, "series": sorted((s["uid"], s["generation"]) for s in series)},
                       sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:40]


def pipeline_version(name: str) -> str:
    """The installed version of pipeline ``name`` from the registry ("" for one it does not list)."""
    entry = registry.REGISTRY.get(name)
    return entry.version if entry is not None else ""


def recorded_version(job: Job) -> str:
    """The version a job was queued at (its inputs) or that made its results (its summary); "" if neither."""
    return str((job.inputs or {}).get("pipeline_version") or (job.summary or {}).get("pipeline_version") or "")


def series_attributes(row: Series) -> dict[str, str]:
    attrs = {str(k): str(v) for k, v in (row.attributes or {}).items()}
    attrs.setdefault("Modality", row.modality)
    return attrs


class Router:
    """Matches routes against series attributes and queues jobs."""

    def __init__(self, routes: Sequence[RouteConfig], sweep_priority: Priority | None = None,
                 versions: Mapping[str, str] | None = None) -> None:
        self.routes = tuple(routes)
        self.sweep_priority = sweep_priority  # lane of a swept series' jobs when its route names none
        self.versions = dict(versions or {})  # pipeline -> version replacing the registry's (tests)

    def version(self, pipeline: str) -> str:
        return self.versions.get(pipeline) or pipeline_version(pipeline)

    def priority(self, s: Session, route: RouteConfig, inputs: Sequence[dict[str, Any]]) -> Priority:
        """The lane of a job (node.lanes): the route's ``priority``; unset, ``[sweep].priority`` when a sweep
        retrieved one of its series (a sweep item neither skipped nor only planned), else normal."""
        if route.priority is not None:
            return route.priority
        if self.sweep_priority is not None and s.scalar(
                select(SweepItem.id).where(SweepItem.series_uid.in_([str(i["uid"]) for i in inputs]),
                                           SweepItem.state.not_in((SweepItemState.SKIPPED, SweepItemState.PLANNED)))
                .limit(1)) is not None:
            return self.sweep_priority
        return Priority.NORMAL

    def matching_series_routes(self, attributes: dict[str, str]) -> list[RouteConfig]:
        return [r for r in self.routes if r.level == "series" and r.matches(attributes)]

    def on_series_complete(self, s: Session, series: Series) -> list[Job]:
        """Queue jobs for a series that has just completed (same transaction)."""
        created: list[Job] = []
        attrs = series_attributes(series)
        for route in self.matching_series_routes(attrs):
            inputs = [{"uid": series.series_uid, "generation": series.generation, "role": ""}]
            created += self._queue(s, route, series.series_uid, series.study_uid, inputs, series.last_received)
        for route in self.routes:
            if route.level == "study":
                created += self._study_route(s, route, series.study_uid)
        return created

    def _study_route(self, s: Session, route: RouteConfig, study_uid: str) -> list[Job]:
        requirements = route.requires or (SeriesMatch(name="series", when=dict(route.when)),)
        complete = s.scalars(select(Series).where(Series.study_uid == study_uid, Series.state == SeriesState.COMPLETE)
                             .order_by(Series.last_received.desc())).all()
        chosen: list[Series] = []
        for req in requirements:
            match = next((c for c in complete if match_attributes(req.when, series_attributes(c))
                          and c not in chosen), None)
            if match is None:
                return []
            chosen.append(match)
        inputs = [{"uid": c.series_uid, "generation": c.generation, "role": req.name}
                  for c, req in zip(chosen, requirements, strict=True)]
        last = max(c.last_received for c in chosen)
        return self._queue(s, route, chosen[0].series_uid, study_uid, inputs, last)

    def _queue(self, s: Session, route: RouteConfig, series_uid: str, study_uid: str,
               inputs: list[dict[str, Any]], last_image_at: float) -> list[Job]:
        legacy = legacy_input_key(route.name, inputs)
        priority = self.priority(s, route, inputs)
        out: list[Job] = []
        for pipeline in route.pipelines:
            version = self.version(pipeline)
            key = input_key(route.name, inputs, version)
            exists = s.scalar(select(Job.id).where(Job.pipeline == pipeline, Job.input_key == key))
            if exists is not None:
                continue
            old = s.scalar(select(Job).where(Job.pipeline == pipeline, Job.input_key == legacy))
            if old is not None and recorded_version(old) in ("", version):
                continue  # queued before versions were in the key, and at this version (or unknown)
            job = Job(series_uid=series_uid, study_uid=study_uid, route=route.name, pipeline=pipeline,
                      inputs={"series": inputs, "send_to": list(route.send_to), "level": route.level,
                              "pipeline_version": version},
                      input_key=key, state=JobState.PENDING.value, attempts=0, created_at=now(), updated_at=now(),
                      not_before=0.0, last_image_at=last_image_at, priority=priority.value)
            s.add(job)
            s.flush()
            logger.info("job %d queued: pipeline %s %s on series %s (route %s, %s lane)", job.id, pipeline,
                        version or "(unversioned)", series_uid, route.name, priority)
            out.append(job)
        return out
