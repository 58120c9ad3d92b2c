"""End to end: the node receives a CT and its RTSTRUCT, runs tumour-radiomics, files SEG + SR in Orthanc."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from node.db import Job
from tests.conftest import need
from tests.node_helpers import pacs_destination, running_node, write_config
from tests.peers import Orthanc, dciodvfy, storescu, wait_until

RT = "rtutils_phantom_rtstruct"


@pytest.mark.slow
def test_study_route_ct_plus_rtstruct_to_pacs(tmp_path: Path, shared_data: Path, pacs: Orthanc) -> None:
    need("storescu")
    route = {"name": "tumour", "level": "study", "pipelines": ["tumour-radiomics"], "send_to": ["pacs"],
             "requires": [{"name": "ct", "when": {"Modality": "CT"}}, {"name": "roi", "when": {"Modality": "RTSTRUCT"}}]}
    cfg = write_config(tmp_path, destinations=[pacs_destination(pacs.dicom_port)], routes=[route],
                       completion={"quiet_seconds": 1.0}, web={"enabled": False})
    study = "1.2.840.113619.2.405.3.84541899.902.1605198123.910"
    with running_node(cfg) as node:
        storescu(node.port, [shared_data / RT / "rt.dcm"], extra=["-R"])  # the ROI first: the job must wait for the CT
        storescu(node.port, [shared_data / RT / "ct_1.dcm", shared_data / RT / "ct_2.dcm"])

        def filed() -> bool:
            mods = pacs.modalities_in_study(study)
            return "SEG" in mods and "SR" in mods

        wait_until(filed, 180, what="tumour SEG and SR in the PACS")
        with node.db.session() as s:
            (job,) = s.scalars(select(Job).where(Job.pipeline == "tumour-radiomics")).all()
            summary, work = dict(job.summary), Path(job.result_dir)
    assert summary["roi_source"] == "RTSTRUCT" and summary["n_features"] > 300
    for name in ("tumour_rings_seg.dcm", "tumour_sr.dcm"):
        ok, report = dciodvfy(work / name)
        assert ok, report
