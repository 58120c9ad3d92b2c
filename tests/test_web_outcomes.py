"""Issue 14 item 9: the dashboard's results read as results (verdict, key values, model, viewer link)
and a time-to-result histogram per pipeline beside the counts; the same through /api/outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node.db import Database, Job, Result
from node.metrics import Metrics
from node.web import create_app, serve_web
from node.web.outcomes import BIN_EDGES
from tests.conftest import need
from tests.test_web import READ, T0, make_config, populate

VIEWER = 'viewer_url = "http://ohif.example:3000/viewer?StudyInstanceUIDs={study_uid}"\n'

BC_SUMMARY = {
    "pipeline": "body-composition", "pipeline_version": "1.4.0", "evaluable": True, "reason": "",
    "level": "L3", "level_method": "canal-profile-anchors", "level_confidence": "high", "backend": "monai",
    "model_version": "bc-unet-2026.11",
    "areas_cm2": {"skeletal_muscle": {"value": 148.86, "unit": "cm2"}, "sat": {"value": 173.2, "unit": "cm2"},
                  "vat": {"value": None, "unit": "cm2", "not_evaluable": "VAT cut by the field of view"}},
    "mean_hu": {"skeletal_muscle": {"value": 45.0, "unit": "HU"}},
    "derived": {"smi": {"value": 48.61, "unit": "cm2/m2"}},
    "sarcopenia": {"martin-2013": {"sarcopenic": True, "threshold": 53.0, "unit": "cm2/m2", "via": None}},
}


def _more_jobs(db: Database, tmp: Path) -> None:
    """A body-composition job whose worker left a summary.json, and a not-evaluable one whose
    summary.json is gone (retention): the row's summary stands in."""
    work = tmp / "work" / "5"
    work.mkdir(parents=True)
    (work / "summary.json").write_text(json.dumps(BC_SUMMARY), encoding="utf-8")
    with db.session() as s:
        s.add(Job(id=5, series_uid="1.2.3.5", study_uid="1.2.3.9", route="bc", pipeline="body-composition",
                  input_key="k5", state="done", attempts=1, created_at=T0 + 40, updated_at=T0 + 50,
                  started_at=T0 + 41, finished_at=T0 + 50, last_image_at=T0 + 30, result_dir=str(work)))
        s.add(Job(id=6, series_uid="1.2.3.6", study_uid="1.2.3.9", route="bc", pipeline="body-composition",
                  input_key="k6", state="done", attempts=1, created_at=T0 + 60, updated_at=T0 + 70,
                  started_at=T0 + 61, finished_at=T0 + 70, last_image_at=T0 + 55, result_dir=str(tmp / "gone"),
                  summary={"evaluable": False, "reason": "L3 not in the field of view"}))
        s.flush()
        s.add(Result(sop_instance_uid="9.5", job_id=5, series_uid="9.50", source_series_uid="1.2.3.5",
                     study_uid="1.2.3.9", modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                     pipeline="body-composition", created_at=T0 + 50, in_pacs_at=T0 + 30 + 95.0))
        s.add(Result(sop_instance_uid="9.6", job_id=6, series_uid="9.60", source_series_uid="1.2.3.6",
                     study_uid="1.2.3.9", modality="SR", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                     pipeline="body-composition", created_at=T0 + 70, in_pacs_at=T0 + 55 + 20.0))


@pytest.fixture
def outcome_db(tmp_path: Path) -> tuple[object, Database]:
    cfg = make_config(tmp_path, extra=VIEWER)
    db = Database(cfg.database_url)
    populate(db)
    _more_jobs(db, tmp_path)
    return cfg, db


def test_results_show_verdict_values_model_and_viewer_link(outcome_db: tuple[object, Database]) -> None:
    cfg, db = outcome_db
    client = TestClient(create_app(cfg, db, Metrics(db)), headers=READ)  # type: ignore[arg-type]
    rows = {r["job_id"]: r for r in client.get("/api/outcomes").json()}
    assert set(rows) == {1, 3, 5, 6}  # the done jobs
    bc = rows[5]
    assert bc["verdict"] == "evaluable" and bc["model"] == "body-composition 1.4.0; backend monai, model bc-unet-2026.11"
    values = dict(bc["values"])
    assert values["Level"] == "L3 (canal-profile-anchors, high)" and values["SMI"] == "48.6 cm²/m²"
    assert values["Sarcopenia (martin-2013)"] == "present (cut-off: SMI < 53.0 cm2/m2)"
    assert values["VAT"] == "not evaluable: VAT cut by the field of view"
    assert bc["viewer_link"] == "http://ohif.example:3000/viewer?StudyInstanceUIDs=1.2.3.9"
    assert bc["seconds_to_result"] == pytest.approx(95.0)
    assert rows[6]["verdict"] == "not evaluable: L3 not in the field of view" and rows[6]["values"] == []
    assert rows[1]["seconds_to_result"] == pytest.approx(7.9)

    hists = {h["pipeline"]: h for h in client.get("/api/time-to-result").json()}
    assert set(hists) == {"tissue-hu", "body-composition"}  # radiomics never reached a PACS
    bcounts = hists["body-composition"]["counts"]
    assert len(bcounts) == len(BIN_EDGES) + 1 and sum(bcounts) == 2
    assert bcounts[0] == 1 and bcounts[2] == 1  # 20 s (< 30 s) and 95 s (60-120 s)

    page = client.get("/").text
    for text in ('id="outcomes"', 'id="outcome-5"', "SMI: 48.6 cm²/m²", "Sarcopenia (martin-2013): present",
                 "not evaluable: L3 not in the field of view", "body-composition 1.4.0",
                 'href="http://ohif.example:3000/viewer?StudyInstanceUIDs=1.2.3.9"', 'id="ttr-body-composition"',
                 'id="ttr-tissue-hu"', "Time to result: body-composition (median 95.0 s)"):
        assert text in page, text
    assert page.index('id="ttr-body-composition"') < page.index('id="dead-letters"')  # beside the counts


def test_viewer_url_needs_the_study_placeholder(tmp_path: Path) -> None:
    from node.config import ConfigError

    with pytest.raises(ConfigError, match="web.viewer_url"):
        make_config(tmp_path, extra='viewer_url = "http://ohif.example/viewer"\n')


def test_results_in_chromium(outcome_db: tuple[object, Database], tmp_path: Path) -> None:
    from tests.cdp import Browser

    need("chromium")
    cfg, db = outcome_db
    server = serve_web(cfg, db, Metrics(db), port=0)  # type: ignore[arg-type]
    try:
        with Browser() as browser:
            page = browser.new_page()
            page.goto(server.url + "/signin")
            page.act_and_wait_load(f"document.getElementById('token').value = {READ['Authorization'][7:]!r};"
                                   "document.getElementById('signin-submit').click()")
            assert page.evaluate("document.querySelector('#view-5').href").endswith("StudyInstanceUIDs=1.2.3.9")
            assert page.evaluate("document.querySelectorAll('#ttr-body-composition .bar').length") == len(BIN_EDGES) + 1
            shot = tmp_path / "results.png"
            page.screenshot(shot)
            assert shot.stat().st_size > 10_000
    finally:
        server.stop()
