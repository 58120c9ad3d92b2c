"""Completion, routing, durable jobs and export against a real Orthanc."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from node.completion import SliceInfo, decide, geometry_reason
from node.db import Export, ExportState, Job, Result
from node.dicom_facts import Completion
from tests.conftest import need
from tests.node_helpers import ROUTE, cli, pacs_destination, running_node, write_config
from tests.peers import Orthanc, dciodvfy, free_port, storescu, wait_until, with_uids

pytestmark = pytest.mark.peers


# Completion rules (pure) ------------------------------------------------------------------


def stack(positions: list[float]) -> list[SliceInfo]:
    return [SliceInfo(p, 1) for p in positions]


def test_geometry_rules() -> None:
    assert geometry_reason(stack([0, 2, 4, 6]), None) == "geometry"
    assert geometry_reason(stack([6, 0, 4, 2]), None) == "geometry"  # arrival order does not matter
    assert geometry_reason(stack([0, 2, 6, 8]), None) is None  # a gap: a slice is missing
    assert geometry_reason(stack([0, 2, 2, 4]), None) is None  # duplicate position
    assert geometry_reason(stack([0, 1.08, 3.0, 9.99]), None) is None  # uneven (tilted head CT)
    assert geometry_reason(stack([0, 2, 4]), 4) is None  # headers announce 4
    assert geometry_reason(stack([0, 2, 4, 6]), 4) == "count"
    assert geometry_reason([SliceInfo(None, 40)], None) == "multiframe"
    assert geometry_reason([SliceInfo(None, 1)], None) is None  # an image without geometry: quiet time
    assert geometry_reason([SliceInfo(None, 1, Completion.OBJECT)], None) == "object"  # SEG, RTSTRUCT, SR
    assert geometry_reason([SliceInfo(0, 1), SliceInfo(None, 1)], None) is None


def test_decide_settle_then_quiet() -> None:
    even, gap = stack([0, 2, 4]), stack([0, 2, 6])
    assert decide(even, None, idle=0.1, settle=0.5, quiet=5) is None
    assert decide(even, None, idle=0.6, settle=0.5, quiet=5) == "geometry"
    assert decide(gap, None, idle=0.6, settle=0.5, quiet=5) is None
    assert decide(gap, None, idle=5.1, settle=0.5, quiet=5) == "quiet"
    assert decide([SliceInfo(None, 1)], None, idle=1, settle=0.5, quiet=5) is None


# End to end with Orthanc ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return with_uids(shared_data / "totalseg_example_ct_dicom" / "dicom", tmp_path_factory.mktemp("ct"), seed="jobs")


def study_of(files: list[Path]) -> tuple[str, str]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def sr_in_pacs(pacs: Orthanc, study: str) -> list[dict[str, object]]:
    return [i for i in pacs.instances_of_study(study) if i["MainDicomTags"].get("SOPInstanceUID")
            and "1.2.840.10008.5.1.4.1.1.88" in json.dumps(i)]


def test_series_to_sr_in_pacs_and_late_instance_supersedes(tmp_path: Path, pacs: Orthanc, ct: list[Path],
                                                           database_url: str) -> None:
    """Index, completion, jobs, exports and the results ledger, on SQLite and on PostgreSQL."""
    need("storescu")
    cfg = write_config(tmp_path, destinations=[pacs_destination(pacs.dicom_port)], routes=[ROUTE],
                       node={"database": database_url})
    study, series = study_of(ct)
    with running_node(cfg) as node:
        storescu(node.port, ct[:-1], extra=["-xv"])  # 19 slices: an even stack already
        wait_until(lambda: "SR" in pacs.modalities_in_study(study), 60, what="first SR in PACS")
        storescu(node.port, ct[-1:], extra=["-xv"])  # a late instance reopens the series
        wait_until(lambda: pacs.modalities_in_study(study).count("SR") >= 2, 60, what="second SR in PACS")
        view = node.index.series(series)
        assert view is not None and view.generation == 1 and view.instances == 20

        def in_pacs() -> bool:
            with node.db.session() as s:
                rows = s.scalars(select(Result)).all()
                return len(rows) == 2 and all(r.in_pacs_at is not None for r in rows)

        wait_until(in_pacs, 20, what="results marked in PACS")
        with node.db.session() as s:
            jobs = s.scalars(select(Job).order_by(Job.id)).all()
            results = s.scalars(select(Result).order_by(Result.created_at)).all()
            assert [j.state for j in jobs] == ["done", "done"]
            assert all(j.last_image_at and j.finished_at and j.finished_at > j.last_image_at for j in jobs)
            assert len(results) == 2 and results[1].supersedes == results[0].sop_instance_uid
            assert jobs[1].summary["predecessors"] == [results[0].sop_instance_uid]
            work = Path(jobs[1].result_dir)
    sr_file = work / "sr.dcm"
    ok, report = dciodvfy(sr_file)
    assert ok, report
    back = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(sr_file))
    assert back.StudyInstanceUID == study and back.Manufacturer == "prognode"
    events = [json.loads(line)["event"] for line in (tmp_path / "var" / "audit.jsonl").read_text().splitlines()]
    for e in ("series_complete", "job_pending", "job_running", "job_done", "export_sent"):
        assert e in events


def test_destination_down_then_up_gets_results(tmp_path: Path, ct: list[Path]) -> None:
    need("storescu", "Orthanc")
    port = free_port()  # nothing listens here yet
    cfg = write_config(tmp_path, destinations=[pacs_destination(port)], routes=[ROUTE])
    study, _ = study_of(ct)
    with running_node(cfg) as node:
        storescu(node.port, ct, extra=["-xv"])

        def failed_attempt() -> bool:
            with node.db.session() as s:
                return bool(s.scalars(select(Export).where(Export.attempts >= 1)).first())

        wait_until(failed_attempt, 60, what="a failed export attempt")
        pacs = Orthanc(tmp_path / "orthanc", dicom_port=port).start()
        try:
            wait_until(lambda: "SR" in pacs.modalities_in_study(study), 60, what="SR once the PACS is back")
        finally:
            pacs.stop()
        with node.db.session() as s:
            exp = s.scalars(select(Export)).one()
            assert exp.state == "sent" and exp.attempts >= 2 and exp.sent_at is not None


def test_dead_letter_then_resend(tmp_path: Path, ct: list[Path]) -> None:
    need("storescu", "Orthanc")
    port = free_port()
    cfg = write_config(tmp_path, destinations=[pacs_destination(port, max_attempts=2, retry_seconds=0.1)],
                       routes=[ROUTE])
    study, _ = study_of(ct)
    with running_node(cfg) as node:
        storescu(node.port, ct, extra=["-xv"])

        def dead() -> int | None:
            with node.db.session() as s:
                e = s.scalars(select(Export).where(Export.state == "dead")).first()
                return e.job_id if e else None

        job_id = wait_until(dead, 60, what="a dead letter")
        pacs = Orthanc(tmp_path / "orthanc", dicom_port=port).start()
        try:
            r = cli("resend", str(job_id), "--config", str(tmp_path / "config.toml"))
            assert r.returncode == 0, r.stderr
            assert "queued again" in r.stdout
            wait_until(lambda: "SR" in pacs.modalities_in_study(study), 60, what="SR after resend")
        finally:
            pacs.stop()


def test_dead_letter_goes_by_itself_once_the_pacs_answers_echo(tmp_path: Path, ct: list[Path]) -> None:
    need("storescu", "Orthanc")
    port = free_port()
    cfg = write_config(tmp_path, destinations=[pacs_destination(port, max_attempts=1, probe_seconds=0.5)],
                       routes=[ROUTE])
    study, _ = study_of(ct)
    with running_node(cfg) as node:
        storescu(node.port, ct, extra=["-xv"])

        def dead() -> bool:
            with node.db.read() as s:
                return s.scalars(select(Export).where(Export.state == ExportState.DEAD)).first() is not None

        wait_until(dead, 60, what="a dead letter")
        pacs = Orthanc(tmp_path / "orthanc", dicom_port=port).start()
        try:  # no resend: the C-ECHO probe finds the PACS back and the dead letter goes again
            wait_until(lambda: "SR" in pacs.modalities_in_study(study), 60, what="SR once the PACS answers")
        finally:
            pacs.stop()
        with node.db.read() as s:
            exp = s.scalars(select(Export)).one()
            assert exp.state == ExportState.SENT and exp.attempts == 1  # attempts reset by the requeue
        assert "export_destination_up" in [e["event"] for e in node.audit.read()]


def test_failing_pipeline_retries_then_dies(tmp_path: Path, ct: list[Path]) -> None:
    need("storescu")
    cfg = write_config(tmp_path, routes=[{**ROUTE, "send_to": []}], pipelines={"test-sr": {"fail": True}})
    with running_node(cfg) as node:
        storescu(node.port, ct[:3], extra=["-xv"])

        def dead_job() -> Job | None:
            with node.db.session() as s:
                return s.scalars(select(Job).where(Job.state == "dead")).first()

        job = wait_until(dead_job, 60, what="dead job")
        assert job.attempts == 2 and "test-sr failed for series" in job.error and "asked to fail" in job.error


def test_study_routes_wait_for_required_series_and_get_other_objects(tmp_path: Path, shared_data: Path) -> None:
    need("storescu")
    src = shared_data / "dcmqi_seg_sr_refs" / "segmentations"
    seg = src / "liver.dcm"
    both = {"name": "ct+roi", "level": "study", "pipelines": ["test-sr"], "send_to": [],
            "requires": [{"name": "ct", "when": {"Modality": "CT"}}, {"name": "roi", "when": {"Modality": "SEG"}}]}
    ct_only = {"name": "ct-study", "level": "study", "pipelines": ["test-sr"], "send_to": [],
               "requires": [{"name": "ct", "when": {"Modality": "CT"}}]}
    cfg = write_config(tmp_path, routes=[both, ct_only], completion={"quiet_seconds": 1.0},
                       pipelines={"test-sr": {"write": False}})
    seg_uid = str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)
    with running_node(cfg) as node:
        storescu(node.port, [seg], extra=["-R"])  # storescu proposes SEG only when required
        storescu(node.port, src / "ct-3slice")

        def done() -> list[Job]:
            with node.db.session() as s:
                rows = list(s.scalars(select(Job).where(Job.state == "done")).all())
                return rows if len(rows) == 2 else []

        jobs = {j.route: j for j in wait_until(done, 60, what="two study jobs done")}
    assert sorted(i["role"] for i in jobs["ct+roi"].inputs["series"]) == ["ct", "roi"]
    assert sorted(jobs["ct+roi"].summary["roles"]) == ["ct", "roi"]
    assert jobs["ct-study"].summary["roles"] == ["ct"]
    assert any(seg_uid in p for p in jobs["ct-study"].summary["extra_files"])  # the received SEG
