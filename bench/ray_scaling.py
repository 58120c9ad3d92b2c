"""Series per hour against the number of Ray workers, and the Ray runner's overhead for one series.

A local multi-node Ray cluster (tests/ray_cluster.py: a head without CPUs and ``--nodes`` worker
nodes of one CPU each, all on this machine, usage statistics off, no dashboard) runs jobs through
:class:`node.ray_runner.RayRunner` exactly as the node submits them (a :class:`node.jobs.JobSpec`
per series, inputs through Ray's object store, outputs written back into a result folder), with
at most ``n`` jobs in flight, for n in 1, 2, 4 (``[jobs] workers``: the Ray workers in use).
Measured at the runner (submit -> outcome landed): DICOM receive, completion and export are the
same for both runners and not included.

Pipelines: ``wait`` (the test SR pipeline sleeping ``--sleep`` s, then writing one SR: scheduling
and overhead) and ``cpu`` (``tissue-hu`` on the same series: body mask, tissue masks, SEG + SR;
bounded by the machine's CPU cores, which other work may share).

Overhead for one series: the same job (the wait pipeline with no sleep) submitted alone, one
after another, through the local process pool and through the Ray runner (task and actor
mode); median and max of the latency after one warm-up job.

The node's own database work per job (claim, renew, finish with one result and one export on
SQLite, one thread) is measured last: it bounds how many jobs one node can hand out, whatever the
cluster.

    .venv/bin/python bench/ray_scaling.py [--series 12] [--sleep 2] [--png docs/ray-scaling.png]
    .venv/bin/python bench/ray_scaling.py --queue-only [--queue-jobs 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, wait
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pydicom  # noqa: E402

from node.config import Config, RunnerConfig  # noqa: E402
from node.jobs import JobOutcome, JobSpec, LocalProcessRunner, Runner  # noqa: E402
from pipelines.base import Identity, SeriesInput  # noqa: E402
from tests.peers import DATA, with_uids  # noqa: E402
from tests.ray_cluster import RayCluster  # noqa: E402

IDENTITY = Identity(manufacturer="prognode", software_version="bench", device_serial_number="bench",
                    institution_name="", seg_series_number=9101, sr_series_number=9102, map_series_number=9103)
WORKERS = (1, 2, 4)


def make_spec(files: list[Path], out: Path, job_id: int, kind: str, sleep: float) -> JobSpec:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    series = (SeriesInput(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), tuple(files)),)
    if kind == "wait":
        return JobSpec(job_id=job_id, attempt=1, pipeline="test-sr", options={"sleep": sleep}, series=series,
                       work_dir=out / f"job{job_id}", identity=IDENTITY, factory="tests.node_pipelines:create")
    return JobSpec(job_id=job_id, attempt=1, pipeline="tissue-hu", options={}, series=series,
                   work_dir=out / f"job{job_id}", identity=IDENTITY)


def throughput(runner: Runner, specs: list[JobSpec], inflight: int) -> float:
    """Series per hour with at most ``inflight`` jobs submitted at a time (like the node's JobManager)."""
    pending = list(specs)
    running: set[Future[JobOutcome]] = set()
    t0 = time.monotonic()
    while pending or running:
        while pending and len(running) < inflight:
            running.add(runner.submit(pending.pop(0)))
        done, running = wait(running, return_when="FIRST_COMPLETED")
        for f in done:
            outcome = f.result()
            if not outcome.ok:
                raise RuntimeError(f"bench job failed: {outcome.error}")
    return len(specs) / (time.monotonic() - t0) * 3600.0


def latencies(runner: Runner, specs: list[JobSpec]) -> list[float]:
    out = []
    for spec in specs:
        t0 = time.monotonic()
        outcome = runner.submit(spec).result()
        assert outcome.ok, outcome.error
        out.append(time.monotonic() - t0)
    return out[1:]  # the first one warms the worker up


def queue_rate(folder: Path, n: int) -> float:
    """Jobs per second through the node's queue on SQLite: claim, renew, finish with one result and one
    export (the node-side database work per job, whatever the runner)."""
    from node.audit import AuditLog
    from node.db import Database, Job
    from node.jobs import JobQueue, ResultFile

    db = Database(f"sqlite:///{folder / 'queue.db'}")
    queue = JobQueue(db, AuditLog(folder / "audit.jsonl"))
    with db.session() as s:
        for i in range(n):
            s.add(Job(series_uid=f"1.2.3.{i}", study_uid="1.2.3", route="ct", pipeline="p",
                      inputs={"series": [{"uid": f"1.2.3.{i}"}]}, input_key=f"k{i}"))
    t0 = time.monotonic()
    done = 0
    while (job := queue.claim("bench")) is not None:
        queue.renew([job.id])
        f = ResultFile(str(folder / f"{job.id}.dcm"), f"2.25.{job.id}", "1.2.840.10008.5.1.4.1.1.88.34",
                       f"2.25.9{job.id}", "1.2.3", "SR")
        assert queue.finish(job, job.attempts, JobOutcome(True, (f,)), str(folder), (), ["pacs"])
        done += 1
    return done / (time.monotonic() - t0)


def ray_config(address: str, mode: str, workers: int) -> Config:
    return Config(runner=RunnerConfig(kind="ray", address=address, mode=mode, actors_per_pipeline=workers,
                                      namespace=f"bench-{mode}-{workers}"))


def plot(png: Path, rows: dict[str, list[float]], sleep: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, values in rows.items():
        ax.plot(WORKERS, values, marker="o", label=label)
    ideal = [n * 3600.0 / sleep for n in WORKERS]
    ax.plot(WORKERS, ideal, ls=":", color="grey", label=f"ideal for the wait pipeline (n x 3600/{sleep:g})")
    ax.set_xlabel("Ray workers in use (one-CPU worker nodes)")
    ax.set_ylabel("series per hour")
    ax.set_xticks(WORKERS)
    ax.set_title(f"Ray runner on a local 4-node cluster ({os.cpu_count()} CPU cores)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=12, help="series per measurement")
    ap.add_argument("--sleep", type=float, default=2.0, help="seconds the wait pipeline waits")
    ap.add_argument("--overhead-runs", type=int, default=8)
    ap.add_argument("--queue-jobs", type=int, default=500, help="jobs for the queue (SQLite) measurement")
    ap.add_argument("--queue-only", action="store_true", help="only the queue measurement (no Ray cluster)")
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "ray-scaling.png")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pn-bench-ray-"))
    if args.queue_only:
        rate = queue_rate(work, args.queue_jobs)
        print(f"node queue on SQLite (claim + renew + finish with 1 result and 1 export, one thread): "
              f"{rate:.0f} jobs/s = {rate * 3600:.0f} jobs/h")
        return 0
    files = with_uids(DATA / "totalseg_example_ct_dicom" / "dicom", work / "ct", seed="bench-ray")
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"series: {len(files)} CT slices, {size_mb:.1f} MB; {os.cpu_count()} CPU cores; "
          f"{args.series} series per point", flush=True)

    def specs(kind: str, tag: str, n: int, sleep: float = args.sleep) -> list[JobSpec]:
        return [make_spec(files, work / "out" / tag, i, kind, sleep) for i in range(n)]

    t_start = time.monotonic()
    with RayCluster(workers=max(WORKERS), cpus_per_worker=1, object_store_bytes=80 * 1024 * 1024) as cluster:
        print(f"cluster up: head + {max(WORKERS)} worker nodes in {time.monotonic() - t_start:.0f} s", flush=True)
        from node.ray_runner import RayRunner

        rows: dict[str, list[float]] = {}
        for mode in ("task", "actor"):
            label = f"wait {args.sleep:g} s ({mode})"
            rows[label] = []
            for n in WORKERS:
                runner = RayRunner(ray_config(cluster.address, mode, n))
                throughput(runner, specs("wait", f"warm-{mode}-{n}", n, 0.0), n)  # start the n workers
                rows[label].append(throughput(runner, specs("wait", f"{mode}-{n}", args.series), n))
                runner.shutdown(wait=False)
                print(f"  {label}, {n} workers: {rows[label][-1]:.0f} series/h", flush=True)
        label = "cpu tissue-hu (task)"
        rows[label] = []
        for n in WORKERS:
            runner = RayRunner(ray_config(cluster.address, "task", n))
            throughput(runner, specs("cpu", f"cpu-warm-{n}", n), n)
            rows[label].append(throughput(runner, specs("cpu", f"cpu-{n}", args.series), n))
            runner.shutdown(wait=False)
            print(f"  {label}, {n} workers: {rows[label][-1]:.0f} series/h", flush=True)

        lat: dict[str, list[float]] = {}
        for mode in ("task", "actor"):
            runner = RayRunner(ray_config(cluster.address, mode, 1))
            lat[f"ray ({mode}, object store)"] = latencies(runner, specs("wait", f"lat-{mode}", args.overhead_runs + 1,
                                                                       0.0))
            runner.shutdown(wait=False)
        shared = Config(runner=RunnerConfig(kind="ray", address=cluster.address, io="shared-path",
                                            namespace="bench-shared"))
        runner = RayRunner(shared)
        lat["ray (task, shared path)"] = latencies(runner, specs("wait", "lat-shared", args.overhead_runs + 1, 0.0))
        runner.shutdown(wait=False)
        try:  # the node as a Ray Client (address ray://head:port), as in deploy/
            runner = RayRunner(Config(runner=RunnerConfig(kind="ray", address=cluster.client_address,
                                                          namespace="bench-client")))
            lat["ray client (task, object store)"] = latencies(runner, specs("wait", "lat-client",
                                                                             args.overhead_runs + 1, 0.0))
            runner.shutdown(wait=False)
        except Exception as e:
            print(f"Ray Client: failed: {type(e).__name__}: {e}", flush=True)
    local = LocalProcessRunner(1, preload=("tests.node_pipelines",))
    lat["local process pool"] = latencies(local, specs("wait", "lat-local", args.overhead_runs + 1, 0.0))
    local.shutdown(wait=True)

    print()
    print("Series per hour (runner level: submit -> result files back in the node's folder)")
    print(f"{'pipeline':28s} " + " ".join(f"{n:>2d} worker{'s' if n > 1 else ' '}" for n in WORKERS)
          + "   speed-up 1->4")
    for label, values in rows.items():
        print(f"{label:28s} " + " ".join(f"{v:10.0f}" for v in values) + f"   {values[-1] / values[0]:.2f}x")
    print()
    print(f"One series, time to result at the runner (wait pipeline, no sleep; {args.overhead_runs} runs after a "
          "warm-up)")
    print(f"{'runner':28s} {'median s':>9s} {'max s':>7s}")
    for label, values in lat.items():
        print(f"{label:28s} {statistics.median(values):9.3f} {max(values):7.3f}")
    base = statistics.median(lat["local process pool"])
    for label, values in lat.items():
        if label != "local process pool":
            print(f"overhead {label} vs local: {statistics.median(values) - base:+.3f} s")
    rate = queue_rate(work, args.queue_jobs)
    print(f"\nnode queue on SQLite (claim + renew + finish with 1 result and 1 export, one thread): "
          f"{rate:.0f} jobs/s = {rate * 3600:.0f} jobs/h")
    plot(args.png, rows, args.sleep)
    print(f"\nplot: {args.png}; total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
