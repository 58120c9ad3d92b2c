"""Prometheus metrics with an explicit :class:`prometheus_client.CollectorRegistry` (never the global one).

Two kinds of figures:

* **Events of this process** (the SCP, the STOW-RS receiver and the sweep receiver): instances and bytes
  received and associations, recorded through :meth:`Metrics.record_instance` /
  :meth:`Metrics.record_association`, and STOW-RS requests by outcome (:meth:`Metrics.record_stow_request`).
  Pass the :class:`Metrics` object explicitly to whoever records.
* **State in the database**, computed at scrape time by :class:`DatabaseCollector`: series completed,
  jobs by state, queue depth, export attempts and failures, dead letters, sweep items, and the
  histograms of completion latency, pipeline time and time to result in PACS.  Worker processes thus
  record by writing the database they already write; no shared memory between processes.

``Metrics.exposition()`` returns the text format served at ``/metrics``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pynetdicom import evt
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node import counters
from node.db import Database, ExportState, Job, JobState, Result, Series, SeriesState
from node.lanes import LANE_ORDER

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

JOB_STATES = tuple(JobState)
SERIES_STATES = tuple(SeriesState)
COMPLETION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
PIPELINE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
RESULT_BUCKETS = (2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


def histogram_family(name: str, doc: str, values: Iterable[float], buckets: Sequence[float]) -> HistogramMetricFamily:
    """A histogram family from raw observations (cumulative buckets, sum, count)."""
    vals = [v for v in values if v is not None and v >= 0]
    counts = [(format(b, "g"), float(sum(1 for v in vals if v <= b))) for b in buckets]
    counts.append(("+Inf", float(len(vals))))
    return HistogramMetricFamily(name, doc, buckets=counts, sum_value=float(sum(vals)))


def _by_state(name: str, doc: str, counts: Mapping[str, int], states: Iterable[str] = ()) -> GaugeMetricFamily:
    """A gauge labelled ``state``: every state in ``states`` (0 when absent) and in ``counts``."""
    g = GaugeMetricFamily(name, doc, labels=["state"])
    for st in sorted(set(states) | set(counts)):
        g.add_metric([st], float(counts.get(st, 0)))
    return g


def queue_by_lane(s: Session, t: float) -> dict[str, int]:
    """Jobs ready to run (pending, or failed and due at ``t``) in each lane (node.lanes), every lane listed."""
    rows = dict(s.execute(select(Job.priority, func.count()).where(
        Job.state.in_((JobState.PENDING, JobState.FAILED)), Job.not_before <= t).group_by(Job.priority)).all())
    return {lane.value: int(rows.get(lane.value, 0)) for lane in LANE_ORDER}


def _delta(later: float | None, earlier: float | None) -> float:
    return float(later or 0.0) - float(earlier or 0.0)


class DatabaseCollector(Collector):
    """Figures derived from the node's database at each scrape."""

    def __init__(self, db: Database, window_seconds: float = 7 * 86400.0) -> None:
        self.db = db
        self.window_seconds = window_seconds  # histograms look at this much recent history

    def collect(self) -> Iterator[Metric]:
        """One read-only transaction: the counters the database keeps as rows change
        (:mod:`node.counters`) plus the histograms' recent window (indexed time columns)."""
        since = time.time() - self.window_seconds
        with self.db.read() as s:
            figures = counters.read_counters(s.connection())
            now = time.time()
            lanes = queue_by_lane(s, now)
            queue = sum(lanes.values())
            completion = [_delta(c, lr) for c, lr in s.execute(
                select(Series.completed_at, Series.last_received)
                .where(Series.completed_at.is_not(None), Series.completed_at >= since)).all()]
            pipeline = [_delta(f, st) for f, st in s.execute(
                select(Job.finished_at, Job.started_at)
                .where(Job.state == JobState.DONE, Job.finished_at.is_not(None), Job.started_at.is_not(None),
                       Job.finished_at >= since)).all()]
            # time from the last image of the input to the first result of the job filed in PACS
            ttr_rows = s.execute(
                select(Job.id, Job.last_image_at, func.min(Result.in_pacs_at))
                .join(Result, Result.job_id == Job.id)
                .where(Result.in_pacs_at.is_not(None), Job.last_image_at.is_not(None), Result.in_pacs_at >= since)
                .group_by(Job.id, Job.last_image_at)).all()
        ttr = [_delta(pacs, last) for _id, last, pacs in ttr_rows]
        series_by_state = counters.by_state(figures, "series")
        completed = figures.get("series:completed", 0)
        jobs_by_state = counters.by_state(figures, "jobs")
        exp_attempts = figures.get("exports:attempts", 0)
        exp_by_state = counters.by_state(figures, "exports")
        exp_sent = exp_by_state.get(ExportState.SENT, 0)
        stored = (figures.get("instances:count", 0), figures.get("instances:bytes", 0))
        sweep_items = counters.by_state(figures, "sweep_items")

        yield _by_state("prognode_series", "Series in the index by state", series_by_state, SERIES_STATES)
        yield CounterMetricFamily("prognode_series_completed", "Series detected complete",
                                  value=float(completed or 0))
        yield _by_state("prognode_jobs", "Jobs by state", jobs_by_state, JOB_STATES)
        yield GaugeMetricFamily("prognode_queue_depth", "Jobs ready to run (pending or failed and due)",
                                value=float(queue or 0))
        lane_gauge = GaugeMetricFamily("prognode_lane_queue_depth",
                                       "Jobs ready to run (pending or failed and due) by lane", labels=["lane"])
        for lane, depth in lanes.items():
            lane_gauge.add_metric([lane], float(depth))
        yield lane_gauge
        yield CounterMetricFamily("prognode_export_attempts", "C-STORE export attempts",
                                  value=float(exp_attempts or 0))
        yield CounterMetricFamily("prognode_export_failures", "C-STORE export attempts that failed",
                                  value=float(max(0, int(exp_attempts or 0) - int(exp_sent or 0))))
        yield _by_state("prognode_exports", "Export rows by state (dead = dead letters)", exp_by_state,
                        tuple(ExportState))
        yield GaugeMetricFamily("prognode_instances_stored", "Instances in the index", value=float(stored[0]))
        yield GaugeMetricFamily("prognode_bytes_stored", "Bytes of instances in the index", value=float(stored[1]))
        yield _by_state("prognode_sweep_items", "Sweep items by state", sweep_items)
        yield histogram_family("prognode_completion_latency_seconds",
                               "From the last instance of a series to its completion", completion, COMPLETION_BUCKETS)
        yield histogram_family("prognode_pipeline_seconds", "Pipeline run time of done jobs", pipeline,
                               PIPELINE_BUCKETS)
        yield histogram_family("prognode_time_to_result_seconds",
                               "From the last image of a series to its first result stored in PACS", ttr,
                               RESULT_BUCKETS)


def _on_association(_event: Any, metrics: Metrics, outcome: str) -> None:
    metrics.record_association("in", outcome)


def _on_dimse(event: Any, metrics: Metrics) -> None:
    message = event.message
    if type(message).__name__ == "C_STORE_RQ" and message.data_set is not None:
        metrics.record_instance(message.data_set.getbuffer().nbytes)


class Metrics:
    """The node's metrics; one per process, passed explicitly to whoever records."""

    def __init__(self, db: Database | None = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # every transport in one counter (C-STORE, STOW-RS parts, sweep retrievals), refused ones included
        self.instances_received = Counter("prognode_instances_received",
                                          "Instances received (C-STORE, STOW-RS, sweeps)", registry=self.registry)
        self.bytes_received = Counter("prognode_bytes_received", "Bytes of instances received",
                                      registry=self.registry)
        self.associations = Counter("prognode_associations", "Associations by direction and outcome",
                                    ["direction", "outcome"], registry=self.registry)
        self.sweep_retrieved = Counter("prognode_sweep_series_retrieved", "Series retrieved by sweeps",
                                       ["method"], registry=self.registry)
        self.stow_requests = Counter("prognode_stow_requests", "STOW-RS requests by outcome (node.stow.OUTCOMES)",
                                     ["outcome"], registry=self.registry)
        if db is not None:
            self.registry.register(DatabaseCollector(db))

    def record_instance(self, size: int) -> None:
        self.instances_received.inc()
        self.bytes_received.inc(size)

    def record_association(self, direction: str = "in", outcome: str = "accepted") -> None:
        self.associations.labels(direction=direction, outcome=outcome).inc()

    def record_stow_request(self, outcome: str) -> None:
        self.stow_requests.labels(outcome=outcome).inc()

    def instances_received_total(self) -> int:
        """Instances received by this process so far (the dashboard's count)."""
        return int(self.registry.get_sample_value("prognode_instances_received_total") or 0)

    def record_sweep_retrieval(self, method: str) -> None:
        self.sweep_retrieved.labels(method=method).inc()

    def scp_handlers(self) -> list[tuple[Any, Callable[..., None], list[Any]]]:
        """Notification handlers for an SCP's ``evt_handlers``: associations and C-STORE requests received."""
        return [(evt.EVT_ACCEPTED, _on_association, [self, "accepted"]),
                (evt.EVT_REJECTED, _on_association, [self, "rejected"]),
                (evt.EVT_DIMSE_RECV, _on_dimse, [self])]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
