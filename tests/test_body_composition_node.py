"""Issue 4, end to end: a CT series routed to `body-composition` gets its SEG and SR in the PACS.

Real peers: dcmtk's storescu as the scanner, the node (production pipeline registry, worker
process), Orthanc as the PACS; what Orthanc holds is fetched back and checked with dciodvfy
and highdicom.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_templates.codes import concept
from dicom_templates.sr import read_groups
from pipelines.body_composition.phantom import PhantomSpec, write_phantom
from tests.conftest import need
from tests.node_helpers import pacs_destination, running_node, write_config
from tests.peers import Orthanc, dciodvfy, storescu, wait_until

pytestmark = pytest.mark.slow


def test_routed_series_gets_body_composition_seg_and_sr_in_pacs(tmp_path: Path, pacs: Orthanc) -> None:
    need("storescu", "dciodvfy")
    truth = write_phantom(PhantomSpec(size=128, pixel_mm=3.0, slice_mm=5.0, noise_sd=5.0), tmp_path / "ct")
    route = {"name": "bc", "when": {"Modality": "CT"}, "pipelines": ["body-composition"], "send_to": ["pacs"]}
    cfg = write_config(tmp_path / "node", destinations=[pacs_destination(pacs.dicom_port)], routes=[route],
                       pipelines={"body-composition": {"volumes_3d": False}})
    with running_node(cfg) as node:
        storescu(node.port, truth.files)

        def results_in_pacs() -> list[dict[str, object]]:
            found = pacs.instances_of_study(truth.study_uid)
            objects = [i for i in found if i["MainDicomTags"].get("SOPInstanceUID") and
                       pacs.get(f"/instances/{i['ID']}/simplified-tags").get("Modality") in ("SEG", "SR")]
            return objects if len(objects) >= 2 else []

        objects = wait_until(results_in_pacs, 240, interval=0.5, what="body-composition SEG and SR in Orthanc")

    by_modality: dict[str, pydicom.Dataset] = {}
    for obj in objects:
        with urllib.request.urlopen(f"{pacs.url}/instances/{obj['ID']}/file", timeout=30) as r:
            path = tmp_path / f"{obj['ID']}.dcm"
            path.write_bytes(r.read())
        ok, report = dciodvfy(path)
        assert ok, report
        ds = pydicom.dcmread(path)
        by_modality[str(ds.Modality)] = ds
    seg = hd.seg.Segmentation.from_dataset(by_modality["SEG"])
    labels = {d.SegmentLabel for d in seg.SegmentSequence}
    assert {"Skeletal muscle", "Subcutaneous adipose tissue", "Visceral adipose tissue"} <= labels
    assert seg.StudyInstanceUID == truth.study_uid
    sr = hd.sr.Comprehensive3DSR.from_dataset(by_modality["SR"])
    assert sr.StudyInstanceUID == truth.study_uid
    groups = read_groups(by_modality["SR"])
    assert groups and all(g.scoords for g in groups)  # OHIF needs a SCOORD in every group
    l3 = concept("l3-vertebra")
    assert {g.finding_site for g in groups} == {(l3.scheme_designator, l3.value)}
    muscle = [g for g in groups if g.measurements and any("rea" in k for k in g.measurements)]
    assert muscle and all(g.algorithm is not None for g in groups)
