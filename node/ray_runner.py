"""Jobs on an existing Ray cluster (``[runner] kind = "ray"``); imported only for that kind.

Each job runs as a Ray task, or (``mode = "actor"``) in one of a pipeline's long-lived actors,
which keeps the built pipeline (and what it loaded: a model in GPU memory) between series.  The
resources come from ``[runner.resources.<pipeline>]``, else the pipeline registry's declaration
(:class:`pipelines.registry.Resources`), read without importing the pipeline.

The node's database stays the source of truth: the node claims a job (``JobQueue.claim``) before
submitting it and renews its lease while it is in flight; Ray never retries a job by itself
(``max_retries=0``, ``max_task_retries=0``), so a worker or node that dies mid-job surfaces here
as the job's failure (``NodeDiedError``, ``WorkerCrashedError``, ``ActorDiedError``) and the
node's retry runs it again as the next attempt; only the attempt that holds the job finishes it
and creates its exports (``JobQueue.finish``), so the result is exported once.  If the node
itself dies, the lease expires (or the next start requeues ``running`` jobs).

Files travel through :mod:`node.job_io` (``[runner] io``): by default the input bundle is put in
Ray's object store by the node and the outputs come back the same way.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import ray

from node.config import Config, PipelineResources
from node.job_io import JobIO, Returned, Shipment, job_io, run_shipment
from node.jobs import JobOutcome, JobSpec, create_pipeline
from node.runners import route_pipelines
from pipelines.base import Pipeline

logger = logging.getLogger(__name__)

PIPELINES_KEPT = 4  # per actor: built pipelines kept (distinct options, e.g. a reader-confirmed level)


def resources_for(config: Config, pipeline: str) -> PipelineResources:
    """``[runner.resources.<pipeline>]``, else the registry's declaration, else one CPU."""
    if pipeline in config.runner.resources:
        return config.runner.resources[pipeline]
    from pipelines import registry

    if pipeline in registry.REGISTRY:
        r = registry.REGISTRY[pipeline].resources
        return PipelineResources(cpus=r.cpus, gpus=r.gpus, memory_mb=r.memory_mb)
    return PipelineResources()


def ray_options(res: PipelineResources) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus}
    if res.memory_mb:
        opts["memory"] = res.memory_mb * 1024 * 1024
    return opts


@ray.remote
def run_job_task(io_name: str, spec: JobSpec, files: Mapping[str, bytes]) -> Returned:
    """One job as a Ray task (``files``: the bundle, resolved from the object store by Ray)."""
    return run_shipment(job_io(io_name), Shipment(spec, files))


@ray.remote
class PipelineActor:
    """A long-lived worker for one pipeline: the built pipeline (and its model) stays loaded."""

    def __init__(self) -> None:
        self.pipelines: OrderedDict[str, Pipeline] = OrderedDict()
        self.jobs = 0

    def _pipeline(self, spec: JobSpec) -> Pipeline:
        key = json.dumps([spec.pipeline, spec.factory, dict(spec.options)], sort_keys=True, default=str)
        if key in self.pipelines:
            self.pipelines.move_to_end(key)
            return self.pipelines[key]
        made = create_pipeline(spec.pipeline, spec.options, spec.factory)
        self.pipelines[key] = made
        while len(self.pipelines) > PIPELINES_KEPT:
            self.pipelines.popitem(last=False)
        return made

    def run(self, io_name: str, spec: JobSpec, files: Mapping[str, bytes]) -> Returned:
        self.jobs += 1
        try:
            pipeline = self._pipeline(spec)
        except Exception:  # execute() reports it as the job's failure, with the stage and series
            pipeline = None
        return run_shipment(job_io(io_name), Shipment(spec, files), pipeline)

    def stats(self) -> dict[str, int]:
        import os

        return {"pid": os.getpid(), "jobs": self.jobs, "pipelines": len(self.pipelines)}


class RayRunner:
    """:class:`node.jobs.Runner` on a Ray cluster (``ray.init(address=[runner] address)``)."""

    def __init__(self, config: Config, factories: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.rc = config.runner
        self.io: JobIO = job_io(self.rc.io)
        self._lock = threading.Lock()
        self._actors: dict[str, list[Any]] = {}
        self._load: dict[str, list[int]] = {}
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            ray.init(address=self.rc.address, namespace=self.rc.namespace, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
        logger.info("ray runner: cluster %s, namespace %s, %s mode, io %s", self.rc.address, self.rc.namespace,
                    self.rc.mode, self.io.name)
        self._check_gpus(route_pipelines(config))

    def _check_gpus(self, names: list[str]) -> None:
        gpus = float(ray.cluster_resources().get("GPU", 0.0))  # type: ignore[no-untyped-call]
        for name in names:
            need = resources_for(self.config, name).gpus
            if need > 0 and gpus < need:
                logger.warning("pipeline %s asks for %g GPU per job but the Ray cluster has %g now: its jobs wait "
                               "for a GPU worker (or set [runner.resources.%s] gpus = 0)", name, need, gpus, name)

    def _actor(self, pipeline: str, res: PipelineResources) -> tuple[Any, str, int]:
        with self._lock:
            pool = self._actors.get(pipeline)
            if pool is None:
                opts = ray_options(res)
                lifetime = "detached" if self.rc.detached_actors else None
                pool = [PipelineActor.options(  # type: ignore[attr-defined]
                    name=f"prognode-{pipeline}-{i}", get_if_exists=True, lifetime=lifetime,
                    max_restarts=-1, max_task_retries=0, **opts).remote() for i in range(self.rc.actors_per_pipeline)]
                self._actors[pipeline] = pool
                self._load[pipeline] = [0] * len(pool)
            load = self._load[pipeline]
            i = min(range(len(pool)), key=lambda k: load[k])
            load[i] += 1
            return pool[i], pipeline, i

    def _release(self, pipeline: str, i: int) -> None:
        with self._lock:
            self._load[pipeline][i] -= 1

    def submit(self, spec: JobSpec) -> Future[JobOutcome]:
        res = resources_for(self.config, spec.pipeline)
        if res.gpus > 0 and self.config.jobs.device != "cpu":
            spec = replace(spec, device="cuda")  # Ray sets CUDA_VISIBLE_DEVICES for the job's GPU
        shipment = self.io.ship(spec)
        files: Any = ray.put(dict(shipment.files))
        slot: tuple[str, int] | None = None
        if self.rc.mode == "actor":
            actor, name, i = self._actor(spec.pipeline, res)
            slot = (name, i)
            ref = actor.run.remote(self.io.name, shipment.spec, files)
        else:
            ref = run_job_task.options(max_retries=0, **ray_options(res)).remote(  # type: ignore[attr-defined]
                self.io.name, shipment.spec, files)
        out: Future[JobOutcome] = Future()

        def done(f: Future[Returned]) -> None:
            if slot is not None:
                self._release(*slot)
            try:
                out.set_result(self.io.land(spec, f.result()))
            except BaseException as e:  # a dead node or worker: the node's retry runs the job again
                logger.warning("job %d attempt %d on ray failed: %s", spec.job_id, spec.attempt,
                               str(e).splitlines()[0] if str(e) else type(e).__name__)
                out.set_exception(e)

        ref.future().add_done_callback(done)
        return out

    def actor_stats(self) -> dict[str, list[dict[str, int]]]:
        return {name: ray.get([a.stats.remote() for a in pool]) for name, pool in self._actors.items()}

    def shutdown(self, wait: bool) -> None:
        """Disconnect; jobs still running are not waited for (they are pending again at the next start)."""
        if not self.rc.detached_actors:
            for pool in self._actors.values():
                for a in pool:
                    ray.kill(a)
        self._actors.clear()
        if self._own_ray:
            ray.shutdown()


def ray_runner(config: Config, factories: Mapping[str, str]) -> RayRunner:
    return RayRunner(config, factories)
