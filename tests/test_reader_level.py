"""Issue 10 item 6: a reader-confirmed level, from the viewer (an OHIF SR by C-STORE), the command line
and the REST API; the re-run's SR supersedes the earlier one and names the reader.

The CT is the small body-composition phantom (59 slices of 128 x 128, under a second per run).
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from highdicom.sr import CodedConcept

from dicom_templates.codes import concept
from node import cli as node_cli
from node import config as config_mod
from node.audit import AuditLog
from node.db import Database, Instance, Job, Series
from node.metrics import Metrics
from node.reader import level_of_label, markers_of
from node.web import create_app
from pipelines.base import StageError
from pipelines.body_composition.phantom import PhantomSpec, Truth, write_phantom
from pipelines.body_composition.pipeline import run_folder
from tests.conftest import need
from tests.node_helpers import pacs_destination, running_node, write_config
from tests.ohif_sr import marker_sr
from tests.peers import Orthanc, dciodvfy, storescu, wait_until

SPEC = PhantomSpec(size=128, pixel_mm=3.0, slice_mm=5.0)
TOKEN = "reader-token"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Truth:
    return write_phantom(SPEC, tmp_path_factory.mktemp("reader") / "ct")


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _walk(items: Any) -> Iterator[Any]:
    for it in items or ():
        yield it
        if "ContentSequence" in it:
            yield from _walk(it.ContentSequence)


def _person_observer(sr: pydicom.Dataset) -> str:
    names = [str(it.PersonName) for it in sr.ContentSequence if it.ValueType == "PNAME"
             and it.ConceptNameCodeSequence[0].CodeValue == "121008"]
    return names[0] if names else ""


def _level_source_text(sr: pydicom.Dataset) -> str:
    code = concept("level-provenance")
    texts = [str(it.TextValue) for it in _walk(sr.ContentSequence) if it.ValueType == "TEXT"
             and it.ConceptNameCodeSequence[0].CodeValue == code.value]
    return texts[0] if texts else ""


# The marker SR as OHIF 3.13 writes it ---------------------------------------------------------


def test_labels_that_name_a_level() -> None:
    assert [level_of_label(x) for x in ("L3", " l3 ", "L3 vertebra", "c3 level", "L3 vertebral body")] == \
        ["L3", "L3", "L3", "C3", "L3"]
    assert [level_of_label(x) for x in ("L4", "L3?", "not L3", "L33", "")] == [None] * 5


@pytest.mark.filterwarnings("ignore:The value length")  # dcmjs's 19-character Code Value, as OHIF writes it
def test_markers_in_ohif_style_srs(phantom: Truth, tmp_path: Path) -> None:
    image, other = (pydicom.dcmread(phantom.files[k]) for k in (27, 28))
    sop = str(image.SOPInstanceUID)

    def markers(**kw: Any) -> tuple[list[Any], list[str]]:
        path = tmp_path / "m.dcm"
        marker_sr(image, **kw).save_as(path)
        return markers_of(pydicom.dcmread(path), own_devices=[("prognode", "serial-1")])

    found, _ = markers()  # a Length labelled "L3", as OHIF 3.13 writes it: a TEXT Comment in the group
    assert [(m.level, m.image_sop_instance_uid, m.reader, m.label) for m in found] == [("L3", sop, "", "L3")]
    found, _ = markers(label="l3 vertebra", reader="Reader^Rita")
    assert [(m.level, m.reader) for m in found] == [("L3", "Reader^Rita")]
    found, _ = markers(label="L3", label_as="code")  # older adapters: a free-text code as Finding Site
    assert [m.level for m in found] == ["L3"]
    found, _ = markers(label="C3", label_as="code", tool="ArrowAnnotate")  # ... and an arrow's as its Finding
    assert [m.level for m in found] == ["C3"]
    l3 = concept("l3-vertebra")
    coded = CodedConcept(l3.value, l3.scheme_designator, l3.meaning)
    found, _ = markers(label=None, finding_site=coded)  # no label: the vertebra as finding site
    assert [m.level for m in found] == ["L3"]
    # a free-text label decides over a coded site (OHIF re-saving prognode's "Skeletal muscle" outline)
    assert markers(label="Skeletal muscle", finding_site=coded)[0] == []
    assert markers(label="Skeletal muscle", label_as="code", finding_site=coded)[0] == []
    muscle = CodedConcept("127954009", "SCT", "Skeletal muscle")  # prognode's group as OHIF re-saves it
    assert markers(label=None, finding=muscle, finding_site=coded)[0] == []
    assert markers(label="L4")[0] == []
    assert markers(algorithm=True)[0] == []  # a machine's measurement is not a reader's marker
    assert markers(manufacturer="prognode")[0] != []  # the manufacturer alone does not make it ours
    found, skipped = markers(extra_images=(other,))
    assert found == [] and "2 images" in skipped[0]


@pytest.mark.slow
@pytest.mark.browser
def test_an_sr_that_ohif_saved_is_a_marker(phantom: Truth, tmp_path: Path) -> None:
    """OHIF 3.13.2 in headless Chromium: a Length drawn on one image, labelled "L3", saved as OHIF saves."""
    from tests.ohif_sr import ohif_saved_marker
    from tests.peers import SHARED

    need("Orthanc", "node", "chromium")
    cache = Path.home() / ".cache" / "ohif-check"
    if not (cache / "ohif-app-3.13.2" / "dist").is_dir() or not (SHARED / "tools" / "ohif-check").is_dir():
        pytest.skip("ohif-check is not set up (../shared/tools/ohif-check/setup.sh)")
    k = phantom.level_slices["L3"]
    sop = _sop(phantom.files[k])
    saved = pydicom.dcmread(ohif_saved_marker(phantom.files, sop, "L3", tmp_path / "ohif"))
    found, skipped = markers_of(saved)
    assert [(m.level, m.image_sop_instance_uid, m.reader) for m in found] == [("L3", sop, "")] and not skipped
    # what tests build stands for it: same SOP class, template, tracking identifier and label item
    built = marker_sr(pydicom.dcmread(phantom.files[k]), "L3")

    def shape(ds: pydicom.Dataset) -> tuple[Any, ...]:
        group = next(it for it in _walk(ds.ContentSequence) if it.ValueType == "CONTAINER"
                     and it.ConceptNameCodeSequence[0].CodeValue == "125007")
        items = [(it.ValueType, it.ConceptNameCodeSequence[0].CodeValue) for it in group.ContentSequence]
        tracking = next(str(it.TextValue) for it in group.ContentSequence
                        if it.ConceptNameCodeSequence[0].CodeValue == "112039")
        return ds.SOPClassUID, ds.ContentTemplateSequence[0].TemplateIdentifier, tracking, sorted(items)

    assert shape(saved) == shape(built)

    # a reader opens prognode's SR, draws "L3" on another slice and saves: OHIF writes prognode's 8 groups
    # again (no algorithm; Finding "Skeletal muscle" etc. at Finding Site "L3 vertebra") beside the new one
    auto = run_folder(phantom.files[0].parent, tmp_path / "auto", {"volumes_3d": False})
    other = _sop(phantom.files[k + 1])
    resaved = pydicom.dcmread(ohif_saved_marker(phantom.files, other, "L3", tmp_path / "ohif2",
                                                hydrate=next(f for f in auto.files if f.name == "sr.dcm")))
    groups = [it for it in _walk(resaved.ContentSequence) if it.ValueType == "CONTAINER"
              and it.ConceptNameCodeSequence[0].CodeValue == "125007"]
    assert len(groups) == 9
    found, skipped = markers_of(resaved)
    assert [(m.level, m.image_sop_instance_uid) for m in found] == [("L3", other)] and not skipped


# Pipeline ---------------------------------------------------------------------------------------


def test_pipeline_measures_on_the_readers_slice(phantom: Truth, tmp_path: Path) -> None:
    need("dciodvfy")
    k = phantom.level_slices["L3"] + 1  # one slice off the automatic choice, still in L3
    override = {"level": "L3", "sop_instance_uid": _sop(phantom.files[k]), "reader": "Reader^Rita",
                "source": "api", "time": "2026-12-05T10:00:00Z"}
    out = run_folder(phantom.files[0].parent, tmp_path / "out", {"volumes_3d": False, "level_override": override})
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["slice_index"] == k and summary["level"] == "L3" and summary["level_method"] == "reader"
    assert summary["level_source"] == {"method": "reader", **override, "marker_sop_instance_uid": ""}
    assert any("automatic finder chose L3" in n for n in summary["level_notes"])
    assert summary["areas_cm2"]["skeletal_muscle"]["value"] == pytest.approx(phantom.muscle_area_cm2(k), rel=0.02)
    sr_path = next(f for f in out.files if f.name == "sr.dcm")
    ok, report = dciodvfy(sr_path)
    assert ok, report
    sr = pydicom.dcmread(sr_path)
    assert _person_observer(sr) == "Reader^Rita"
    assert "Reader-confirmed level L3" in _level_source_text(sr) and "2026-12-05T10:00:00Z" in _level_source_text(sr)
    assert "reader-confirmed" in sr.SeriesDescription
    assert sr.ContentSequence  # and it round-trips through highdicom
    hd.sr.Comprehensive3DSR.from_dataset(sr)
    ref = {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for it in _walk(sr.ContentSequence)
           if it.ValueType == "IMAGE"}
    assert ref == {override["sop_instance_uid"]}
    # automatic runs say so
    auto = run_folder(phantom.files[0].parent, tmp_path / "auto", {"volumes_3d": False})
    assert auto.summary["level_source"] == {"method": "automatic"}


def test_pipeline_refuses_an_image_of_another_series(phantom: Truth, tmp_path: Path) -> None:
    override = {"level": "L3", "sop_instance_uid": "1.2.3.4.5", "source": "cli"}
    with pytest.raises(StageError, match="not an image of this series"):
        run_folder(phantom.files[0].parent, tmp_path / "out", {"volumes_3d": False, "level_override": override})
    with pytest.raises(ValueError, match="level_override.level"):
        run_folder(phantom.files[0].parent, tmp_path / "out", {"level_override": {"level": "L4",
                                                                                "sop_instance_uid": "1.2"}})


# Command line -----------------------------------------------------------------------------------


def test_cli_level(phantom: Truth, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct = phantom.files[0].parent
    k = phantom.level_slices["L3"]
    number = k + 1  # the phantom's Instance Number
    out = tmp_path / "out"
    assert node_cli.main(["run", "body-composition", str(ct), "--out", str(out), "--level", f"L3={number}",
                          "--reader", "Reader^Rita", "--set", "pipelines.body-composition.volumes_3d=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slice_index"] == k and summary["level_source"]["source"] == "cli"
    assert summary["level_source"]["reader"] == "Reader^Rita"
    assert _person_observer(pydicom.dcmread(out / "sr.dcm")) == "Reader^Rita"
    capsys.readouterr()

    def refused(*args: str) -> str:
        assert node_cli.main(["run", *args, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    assert "for body-composition only" in refused("tissue-hu", str(ct), "--level", "L3=5")
    assert "LEVEL=SLICE" in refused("body-composition", str(ct), "--level", "L4=5")
    assert "LEVEL=SLICE" in refused("body-composition", str(ct), "--level", "L3")
    assert "Instance Number (digits)" in refused("body-composition", str(ct), "--level", "L3=abc")
    assert "no image of the series has Instance Number 999" in refused("body-composition", str(ct), "--level", "L3=999")
    assert "SOP Instance UID 1.2.3" in refused("body-composition", str(ct), "--level", "L3=1.2.3")
    assert "give --level too" in refused("body-composition", str(ct), "--reader", "Reader^Rita")
    # a repeated instance number is refused (the UID is then the way to say which image)
    dup = tmp_path / "dup"
    shutil.copytree(ct, dup)
    f = sorted(dup.glob("*.dcm"))[k + 1]
    ds = pydicom.dcmread(f)
    ds.InstanceNumber = number
    ds.save_as(f)
    assert "2 images of the series have Instance Number" in refused("body-composition", str(dup), "--level",
                                                                   f"L3={number}")


def test_config_file_cannot_set_a_level(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[pipelines."body-composition"]\nlevel_override = { level = "L3", sop_instance_uid = "1.2" }\n')
    assert node_cli.main(["config", "check", str(cfg)]) == 2


# REST -------------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, Database, AuditLog]]:
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(f'[node]\nstorage = "var"\n[web]\nport = 0\ntoken = "{TOKEN}"\n'
                        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
                        '[[routes]]\nname = "bc"\nwhen = { Modality = "CT" }\npipelines = ["body-composition"]\n'
                        'send_to = ["pacs"]\n')
    cfg = config_mod.load(cfg_path, environ={})
    cfg.storage_dir.mkdir(parents=True, exist_ok=True)
    db = Database(cfg.database_url)
    with db.session() as s:
        s.add(Series(series_uid="1.2.3.1", study_uid="1.2.3", modality="CT", state="complete", generation=0,
                     instances=3, attributes={"Modality": "CT"}))
        s.add(Series(series_uid="1.2.3.2", study_uid="1.2.3", modality="CT", state="receiving", instances=1))
        for i, n in enumerate((1, 2, 2)):
            s.add(Instance(sop_instance_uid=f"1.2.3.1.{i}", series_uid="1.2.3.1", study_uid="1.2.3",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                           path=f"x/{i}.dcm", size=1, sha256="0", instance_number=n))
        s.add(Instance(sop_instance_uid="1.2.3.2.0", series_uid="1.2.3.2", study_uid="1.2.3",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                       path="y/0.dcm", size=1, sha256="0", instance_number=1))
        s.add(Job(id=1, series_uid="1.2.3.1", study_uid="1.2.3", route="bc", pipeline="body-composition",
                  inputs={"series": [{"uid": "1.2.3.1", "generation": 0, "role": ""}], "send_to": ["pacs"],
                          "level": "series"}, input_key="k1", state="done", attempts=1))
    audit = AuditLog(tmp_path / "audit.jsonl")
    yield TestClient(create_app(cfg, db, Metrics(db), audit)), db, audit
    db.dispose()


def test_rest_level(api: tuple[TestClient, Database, AuditLog]) -> None:
    client, db, audit = api
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = "/api/series/1.2.3.1/level"
    assert "/api/series/{series_uid}/level" in client.get("/openapi.json").json()["paths"]
    assert client.post(url, json={"level": "L3", "instance_number": 1}).status_code == 401
    assert client.post("/api/series/9.9/level", json={"level": "L3", "instance_number": 1}, headers=auth).status_code == 404
    for body, why in (({"level": "L4", "instance_number": 1}, "L3 or C3"),
                      ({"level": "L3", "instance_number": 7}, "no image with instance number 7"),
                      ({"level": "L3", "instance_number": 2}, "2 images with instance number 2"),
                      ({"level": "L3", "sop_instance_uid": "1.2.3.2.0"}, "not in series"),
                      ({"level": "L3"}, "exactly one"),
                      ({"level": "L3", "instance_number": 1, "reader": "a\\b"}, "person name")):
        r = client.post(url, json=body, headers=auth)
        assert r.status_code == 422 and why in r.json()["detail"], (body, r.text)
    r = client.post(url, json={"level": "L3", "instance_number": 1, "reader": "Reader^Rita"}, headers=auth)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.json()["sop_instance_uid"] == "1.2.3.1.0"
    shown = client.get(f"/api/jobs/{job_id}", headers=auth).json()["level_override"]
    assert shown["level"] == "L3" and shown["reader"] == "Reader^Rita" and shown["source"] == "api"
    assert client.get("/api/jobs/1", headers=auth).json()["level_override"] is None
    with db.read() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == "pending" and job.route == "bc" and job.inputs["send_to"] == ["pacs"]
        assert job.input_key != "k1"
        assert job.inputs["level_override"]["reader"] == "Reader^Rita"
        assert job.inputs["level_override"]["source"] == "api"
    r = client.post("/api/series/1.2.3.2/level", json={"level": "L3", "instance_number": 1}, headers=auth)
    assert r.status_code == 409 and "still receiving" in r.json()["detail"]
    # while that job is queued (or running), a second request is refused
    r = client.post(url, json={"level": "L3", "sop_instance_uid": "1.2.3.1.0"}, headers=auth)
    assert r.status_code == 409 and f"job {job_id}" in r.json()["detail"]
    with db.session() as s:
        s.get(Job, job_id).state = "done"  # type: ignore[union-attr]
    # done: the same reader may confirm again (a new job: the request time is part of its input key)
    time.sleep(1.1)
    again = client.post(url, json={"level": "C3", "sop_instance_uid": "1.2.3.1.0"}, headers=auth)
    assert again.status_code == 202 and again.json()["job_id"] != job_id
    assert [e["event"] for e in audit.read() if e["event"] == "level_confirmed"] == ["level_confirmed"] * 2


# End to end: the viewer's SR by C-STORE -> a superseding result in the PACS --------------------


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The value length")
def test_marker_sr_by_cstore_supersedes_the_result_in_pacs(phantom: Truth, tmp_path: Path, pacs: Orthanc) -> None:
    need("storescu", "dciodvfy")
    route = {"name": "bc", "when": {"Modality": "CT"}, "pipelines": ["body-composition"], "send_to": ["pacs"]}
    cfg = write_config(tmp_path / "node", destinations=[pacs_destination(pacs.dicom_port)], routes=[route],
                       pipelines={"body-composition": {"volumes_3d": False}})
    k = phantom.level_slices["L3"] + 1
    image = pydicom.dcmread(phantom.files[k])
    with running_node(cfg) as node:
        storescu(node.port, phantom.files)

        def done_jobs() -> list[Job]:
            with node.db.read() as s:
                return list(s.query(Job).filter(Job.state == "done").order_by(Job.id).all())

        first = wait_until(lambda: done_jobs() or None, 120, interval=0.2, what="the automatic job")[0]
        marker = tmp_path / "marker.dcm"
        marker_sr(image, "L3", reader="Reader^Rita").save_as(marker)
        # OHIF saved it to the PACS, which forwards it to prognode (-R: propose the SR's own SOP class,
        # which is not in storescu's default list)
        storescu(node.port, [marker], extra=["-R"])
        jobs = wait_until(lambda: (j := done_jobs()) and len(j) >= 2 and j, 120, interval=0.2,
                          what="the reader-confirmed job")
        second = jobs[1]
        assert second.inputs["level_override"]["source"] == "ohif-sr"
        assert second.inputs["level_override"]["marker_sop_instance_uid"] == _sop(marker)
        assert second.route == first.route and second.summary["slice_index"] == k
        # the same marker sent again queues nothing new, nor does a new SR with a marker on the same image
        # (a reader who saves again in OHIF writes the earlier measurements again)
        again = tmp_path / "again.dcm"
        marker_sr(image, "L3", reader="Reader^Rita").save_as(again)
        storescu(node.port, [marker, again], extra=["-R"])
        time.sleep(1.5)
        with node.db.read() as s:
            assert s.query(Job).count() == 2
        audit = [json.loads(x) for x in Path(node.config.path(node.config.logging.audit_file)).read_text().splitlines()]
        assert any(e["event"] == "level_confirmed" and e["source"] == "ohif-sr" for e in audit)

        def in_pacs() -> list[pydicom.Dataset]:
            found: list[pydicom.Dataset] = []
            for inst in pacs.instances_of_study(phantom.study_uid):
                tags = pacs.get(f"/instances/{inst['ID']}/simplified-tags")
                if tags.get("Modality") in ("SEG", "SR") and tags.get("SeriesDescription") != "Research Derived Series":
                    with urllib.request.urlopen(f"{pacs.url}/instances/{inst['ID']}/file", timeout=30) as r:
                        path = tmp_path / f"{inst['ID']}.dcm"
                        path.write_bytes(r.read())
                    found.append(pydicom.dcmread(path))
            return found if len(found) >= 4 else []

        objects = wait_until(in_pacs, 120, interval=0.5, what="both results in Orthanc")
    srs = [o for o in objects if o.Modality == "SR"]
    old = next(o for o in srs if "PredecessorDocumentsSequence" not in o)
    new = next(o for o in srs if "PredecessorDocumentsSequence" in o)
    ref = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert _person_observer(new) == "Reader^Rita" and _person_observer(old) == ""
    assert "from a measurement labelled L3 saved in the viewer" in _level_source_text(new)
    segs = [o for o in objects if o.Modality == "SEG"]
    assert len(segs) == 2 and sum("reader-confirmed" in str(o.SeriesDescription) for o in segs) == 1
    new_path = tmp_path / "new-sr.dcm"
    new.save_as(new_path)
    ok, report = dciodvfy(new_path)
    assert ok, report
    # the ledger links each new result to the one it replaces (SEG to SEG, SR to SR)
    from node.db import Result

    db = Database(node.config.database_url)
    try:
        with db.read() as s:
            rows = s.query(Result).filter(Result.job_id == second.id).all()
            old_rows = {r.sop_instance_uid for r in s.query(Result).filter(Result.job_id == first.id).all()}
            assert rows and all(r.supersedes in old_rows for r in rows)
    finally:
        db.dispose()


def test_a_later_job_on_the_series_waits_for_the_running_one(tmp_path: Path) -> None:
    """So a reader-confirmed job that arrives while the automatic one runs gets its results as predecessors."""
    from node.jobs import JobQueue

    db = Database(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        with db.session() as s:
            for i, series in ((1, "1.2.1"), (2, "1.2.1"), (3, "1.2.2")):
                s.add(Job(id=i, series_uid=series, study_uid="1.2", route="bc", pipeline="body-composition",
                          inputs={}, input_key=f"k{i}", state="pending", attempts=0))
        queue = JobQueue(db, AuditLog(None))
        first = queue.claim("w")
        assert first is not None and first.id == 1
        nxt = queue.claim("w")
        assert nxt is not None and nxt.id == 3  # another series goes ahead; job 2 waits for job 1
        assert queue.claim("w") is None
        with db.session() as s:
            s.get(Job, 1).state = "done"  # type: ignore[union-attr]
        last = queue.claim("w")
        assert last is not None and last.id == 2
    finally:
        db.dispose()
