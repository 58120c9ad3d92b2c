"""The runner chosen by config: the local default, and jobs on a local multi-node Ray cluster.

The cluster (a head without CPUs and two one-CPU worker nodes, all on 127.0.0.1, usage statistics
off, no dashboard) is started once for the module and stopped by process group at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.db import Export, ExportState, Job, Result
from node.job_io import ObjectStoreIO, SharedPathIO, run_shipment
from node.jobs import JobSpec
from pipelines.base import Identity, SeriesInput
from tests.conftest import need
from tests.node_helpers import ROUTE, pacs_destination, running_node, write_config
from tests.peers import REPO, Orthanc, storescu, wait_until, with_uids
from tests.ray_cluster import RayCluster

IDENTITY = Identity(manufacturer="prognode", software_version="0", device_serial_number="test",
                    institution_name="", seg_series_number=9101, sr_series_number=9102, map_series_number=9103)


# Without a cluster -------------------------------------------------------------------------


def test_local_default_never_imports_ray() -> None:
    code = ("import sys; from node.config import Config; from node.runners import build_runner; "
            "from node.jobs import LocalProcessRunner; r = build_runner(Config(), {}); "
            "ok = isinstance(r, LocalProcessRunner) and 'ray' not in sys.modules; r.shutdown(wait=False); "
            "print(ok)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr


def test_object_store_io_round_trip(tmp_path: Path, shared_data: Path) -> None:
    """Inputs shipped as bytes run the pipeline in a scratch folder; outputs land in the node's folder."""
    ct = with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", tmp_path / "ct", seed="ray-io")[:3]
    ds = pydicom.dcmread(ct[0], stop_before_pixels=True)
    spec = JobSpec(job_id=7, attempt=1, pipeline="test-sr", options={},
                   series=(SeriesInput(str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), tuple(ct)),),
                   work_dir=tmp_path / "result" / "attempt-1", identity=IDENTITY, factory="tests.node_pipelines:create")
    io = ObjectStoreIO()
    shipment = io.ship(spec)
    assert all(not Path(p).is_absolute() for s in shipment.spec.series for p in s.files)
    assert sorted(shipment.files) == [f"in/0/0000{i}-{f.name}" for i, f in enumerate(ct)]
    returned = run_shipment(io, shipment)
    assert returned.outcome.ok, returned.outcome.error
    assert sorted(returned.files) == ["sr.dcm", "summary.json"] and returned.outcome.files[0].path == "sr.dcm"
    landed = io.land(spec, returned)
    assert landed.files[0].path == str(spec.work_dir / "sr.dcm")
    assert pydicom.dcmread(landed.files[0].path).Modality == "SR"
    assert (spec.work_dir / "summary.json").is_file()
    shared = run_shipment(SharedPathIO(), SharedPathIO().ship(replace_work(spec, tmp_path / "shared")))
    assert shared.files == {} and Path(shared.outcome.files[0].path).parent == tmp_path / "shared"


def replace_work(spec: JobSpec, work: Path) -> JobSpec:
    from dataclasses import replace

    return replace(spec, work_dir=work)


# On a local multi-node Ray cluster -----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> object:
    need("storescu", "Orthanc")
    with RayCluster(workers=2, cpus_per_worker=1, gpu_workers=1) as c:
        yield c


def ct_series(shared_data: Path, folder: Path, seed: str) -> tuple[list[Path], str]:
    files = with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", folder, seed=seed)
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def sr_count(pacs: Orthanc, study: str) -> int:
    """SR series in the study (the test pipeline writes each SR in a new series)."""
    return pacs.modalities_in_study(study).count("SR")


def jobs_and_exports(node: object) -> tuple[list[Job], list[Export], list[Result]]:
    with node.db.session() as s:  # type: ignore[attr-defined]
        return (list(s.scalars(select(Job).order_by(Job.id))), list(s.scalars(select(Export))),
                list(s.scalars(select(Result))))


@pytest.mark.peers
def test_series_through_ray_gives_its_result(tmp_path: Path, pacs: Orthanc, shared_data: Path,
                                             cluster: RayCluster) -> None:
    ct, study = ct_series(shared_data, tmp_path / "ct", "ray-one")
    cfg = write_config(tmp_path, destinations=[pacs_destination(pacs.dicom_port)], routes=[ROUTE],
                       runner={"kind": "ray", "address": cluster.address, "io": "object-store"})
    with running_node(cfg) as node:
        assert type(node.runner).__name__ == "RayRunner"
        storescu(node.port, ct, extra=["-xv"])
        wait_until(lambda: sr_count(pacs, study) == 1, 90, what="SR in PACS")
        wait_until(lambda: all(e.state == ExportState.SENT for e in jobs_and_exports(node)[1]), 30,
                   what="exports sent")  # the PACS has it a moment before the node records the answer
        jobs, exports, results = jobs_and_exports(node)
    assert [(j.state, j.attempts) for j in jobs] == [("done", 1)]
    assert len(results) == 1 and [e.state for e in exports] == [ExportState.SENT]
    # the worker's output came back through the object store into the node's result folder
    assert Path(jobs[0].result_dir, "sr.dcm").is_file() and str(tmp_path) in jobs[0].result_dir


@pytest.mark.peers
def test_gpu_actor_keeps_its_pipeline_between_series_shared_path(tmp_path: Path, shared_data: Path,
                                                             cluster: RayCluster) -> None:
    cfg = write_config(tmp_path, routes=[{**ROUTE, "send_to": []}],
                       runner={"kind": "ray", "address": cluster.address, "io": "shared-path", "mode": "actor",
                               "namespace": "pn-actor-test", "resources": {"test-sr": {"cpus": 1, "gpus": 1}}})
    with running_node(cfg) as node:
        for k in range(2):
            ct, _ = ct_series(shared_data, tmp_path / f"ct{k}", f"ray-actor-{k}")
            storescu(node.port, ct, extra=["-xv"])
            wait_until(lambda k=k: sum(j.state == "done" for j in jobs_and_exports(node)[0]) == k + 1, 90,
                       what=f"job {k + 1} done")
        stats = node.runner.actor_stats()  # type: ignore[union-attr]
        jobs, _, results = jobs_and_exports(node)
    assert stats["test-sr"][0]["jobs"] == 2 and stats["test-sr"][0]["pipelines"] == 1  # built once, used twice
    assert len(results) == 2 and all(Path(j.result_dir, "sr.dcm").is_file() for j in jobs)
    # the pipeline declared a GPU: the actor holds the worker node's (declared) GPU and runs on "cuda"
    assert all(j.summary["device"] == "cuda" and j.summary["cuda_visible_devices"] == "0" for j in jobs)


@pytest.mark.peers
def test_worker_node_killed_mid_job_reruns_and_exports_once(tmp_path: Path, pacs: Orthanc, shared_data: Path,
                                                           cluster: RayCluster) -> None:
    ct, study = ct_series(shared_data, tmp_path / "ct", "ray-kill")
    marker = tmp_path / "runs.txt"
    cfg = write_config(tmp_path, destinations=[pacs_destination(pacs.dicom_port)], routes=[ROUTE],
                       pipelines={"test-sr": {"sleep": 6.0, "marker": str(marker)}},
                       runner={"kind": "ray", "address": cluster.address})
    with running_node(cfg) as node:
        storescu(node.port, ct, extra=["-xv"])
        wait_until(lambda: marker.is_file() and "start" in marker.read_text(), 90, what="job started on a worker")
        pid = int(marker.read_text().split()[1])
        victim = cluster.node_of(pid)  # the worker node that runs the job
        assert victim is not None
        cluster.kill_worker(victim)
        wait_until(lambda: sr_count(pacs, study) >= 1, 120, what="SR in PACS after the rerun")
        wait_until(lambda: all(e.state == ExportState.SENT for e in jobs_and_exports(node)[1]), 30,
                   what="exports sent")
        jobs, exports, results = jobs_and_exports(node)
    lines = marker.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["start", "start", "done"]  # the first attempt never finished
    assert int(lines[1].split()[1]) != pid
    assert [(j.state, j.attempts) for j in jobs] == [("done", 2)]
    assert len(results) == 1 and len(exports) == 1 and sr_count(pacs, study) == 1
    events = (tmp_path / "var" / "audit.jsonl").read_text()
    assert "NodeDiedError" in events or "WorkerCrashedError" in events


def test_resources_from_the_registry_or_the_config() -> None:
    from node.config import Config, PipelineResources, RunnerConfig
    from node.ray_runner import ray_options, resources_for

    cfg = Config(runner=RunnerConfig(resources={"tissue-hu": PipelineResources(cpus=2, memory_mb=512)}))
    assert ray_options(resources_for(cfg, "deep-features")) == {"num_cpus": 1.0, "num_gpus": 1.0}  # registry
    assert ray_options(resources_for(cfg, "tissue-hu")) == {"num_cpus": 2.0, "num_gpus": 0.0,
                                                            "memory": 512 * 1024 * 1024}
    assert ray_options(resources_for(cfg, "test-sr")) == {"num_cpus": 1.0, "num_gpus": 0.0}  # not registered
