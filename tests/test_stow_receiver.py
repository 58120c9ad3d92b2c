"""The STOW-RS receiver (issue 14, item 2): ``POST /dicom-web/studies`` on the node's web server, write token
required, through the same door, Storage, index and completion as the SCP, answered per PS3.18 10.5.3.

A running node (in-process, test pipelines) with its web server on a free loopback port; studies are posted
with dicomweb-client (the client of the node's own STOW-RS sender) or, for malformed requests, by hand."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from node.db import Job
from node.handlers import CANNOT_UNDERSTAND, OUT_OF_RESOURCES
from node.service import Node
from node.stow import boundary_of, split_parts
from tests.node_helpers import ROUTE, running_node, write_config
from tests.peers import free_port, storescu, wait_until
from tests.synthetic_ct import write_study

pytestmark = pytest.mark.peers

TOKEN = "stow-write-token-0123456789"
READ_TOKEN = "stow-read-token-0123456789"
BOUNDARY = "prognode-test-boundary"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node with its web server (write and read tokens), a route to the test pipeline, small caps:
    node.max_dataset_bytes 4 KiB (a 16x16 slice fits, a 64x64 one does not), requests up to 1 MiB."""
    cfg = write_config(tmp_path, routes=[{**ROUTE, "send_to": []}],
                       node={"max_dataset_bytes": 4096},
                       web={"enabled": True, "port": free_port(), "token": TOKEN, "read_token": READ_TOKEN,
                            "stow_max_request_bytes": 1 << 20})
    with running_node(cfg) as n:
        yield n


def url(node: Node) -> str:
    assert node.ops.web is not None
    return f"{node.ops.web.url}/dicom-web"


def multipart(parts: list[bytes], part_type: str = "application/dicom") -> tuple[bytes, str]:
    body = b"".join(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: " + part_type.encode() + b"\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + BOUNDARY.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def post(node: Node, body: bytes, content_type: str, token: str | None = TOKEN) -> requests.Response:
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(f"{url(node)}/studies", data=body, headers=headers, timeout=30)


def test_a_study_posted_by_stow_is_stored_indexed_completed_and_run(tmp_path: Path, node: Node) -> None:
    study = write_study(tmp_path / "ct", 7, dt.date(2025, 7, 1), slices=4)
    client = DICOMwebClient(url(node), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    answer = client.store_instances([pydicom.dcmread(f) for f in study.files])
    sops = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in study.files)
    assert sorted(str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence) == sops
    assert "FailedSOPSequence" not in answer
    series = study.series_uids[0]
    view = node.index.series(series)
    assert view is not None and view.instances == 4  # indexed as it arrived

    def done() -> Job | None:
        with node.db.read() as s:
            return s.scalars(select(Job).where(Job.series_uid == series, Job.state == "done")).first()

    job = wait_until(done, 30, what="the test pipeline's job on the series posted by STOW-RS")
    assert job.route == "ct"
    stored = [e for e in node.audit.read() if e["event"] == "instance_stored"]
    assert len(stored) == 4 and {e["via"] for e in stored} == {"STOW-RS"}
    assert {e["series_uid"] for e in stored} == {series}
    back = pydicom.dcmread(node.config.storage_dir / node.storage.instance_path(study.study_uid, series, sops[0]))
    assert str(back.SOPInstanceUID) == sops[0] and back.file_meta.TransferSyntaxUID == \
        pydicom.dcmread(study.files[0]).file_meta.TransferSyntaxUID


def test_refusals_with_reasons(tmp_path: Path, node: Node) -> None:
    """No token: 401; the read token: 403; a part over node.max_dataset_bytes and a part that is not DICOM
    are refused with their FailureReason and a Warning saying why while the good part is stored (202); only
    bad parts: 409; over [web] stow_max_request_bytes: 413; another media type: 415; no boundary: 400."""
    small = write_study(tmp_path / "small", 8, dt.date(2025, 7, 2), slices=1).files[0]
    big = write_study(tmp_path / "big", 9, dt.date(2025, 7, 3), slices=1, size=64).files[0]
    body, ctype = multipart([small.read_bytes()])
    assert post(node, body, ctype, token=None).status_code == 401
    assert post(node, body, ctype, token=READ_TOKEN).status_code == 403
    assert post(node, body, ctype, token="wrong").status_code == 401
    assert not any(e["event"] == "instance_stored" for e in node.audit.read())  # nothing got in

    body, ctype = multipart([small.read_bytes(), big.read_bytes(), b"\x00" * 200 + b"not dicom"])
    r = post(node, body, ctype)
    assert r.status_code == 202 and r.headers["Content-Type"].startswith("application/dicom+json")
    answer = pydicom.Dataset.from_json(r.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [
        str(pydicom.dcmread(small).SOPInstanceUID)]
    failed = list(answer.FailedSOPSequence)
    assert [int(i.FailureReason) for i in failed] == [OUT_OF_RESOURCES, CANNOT_UNDERSTAND]
    warnings = r.headers["Warning"]
    assert "over node.max_dataset_bytes (4096)" in warnings and "not a DICOM Part 10 file" in warnings

    body, ctype = multipart([big.read_bytes()])
    r = post(node, body, ctype)
    assert r.status_code == 409 and int(pydicom.Dataset.from_json(r.json()).FailedSOPSequence[0].FailureReason) \
        == OUT_OF_RESOURCES
    body, ctype = multipart([small.read_bytes()] * 2000)  # about 2 MB
    r = post(node, body, ctype)
    assert r.status_code == 413 and "stow_max_request_bytes" in r.headers["Warning"]
    chunked = requests.post(f"{url(node)}/studies", data=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                            headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert post(node, small.read_bytes(), "application/dicom").status_code == 415
    assert post(node, body[:100], "multipart/related; type=\"application/json\"; boundary=x").status_code == 415
    r = post(node, b"--x\r\n", "multipart/related; type=\"application/dicom\"")
    assert r.status_code == 400 and "boundary" in r.headers["Warning"]
    refused = [e for e in node.audit.read() if e["event"] == "instance_refused"]
    assert {e["via"] for e in refused} == {"STOW-RS"} and len(refused) == 3


def _scrape(node: Node) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{url(node).removesuffix('/dicom-web')}/metrics", timeout=30).text
    return {s.name + "".join(f"/{v}" for v in s.labels.values()): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_stow_instances_are_counted_as_c_store_ones(tmp_path: Path, node: Node) -> None:
    """STOW-RS parts count in the same prognode_instances_received_total and bytes as C-STORE requests, refused
    ones included; each request in prognode_stow_requests_total{outcome}; the dashboard shows the count."""
    study = write_study(tmp_path / "ct", 10, dt.date(2025, 7, 4), slices=3)
    storescu(node.port, study.files[:1])
    before = _scrape(node)
    assert before["prognode_instances_received_total"] == 1.0  # the C-STORE one
    parts = [study.files[1].read_bytes(), study.files[2].read_bytes(), b"\x00" * 200 + b"not dicom"]
    body, ctype = multipart(parts)
    assert post(node, body, ctype).status_code == 202
    assert post(node, parts[2], "application/dicom").status_code == 415
    assert post(node, b"x" * (2 << 20), ctype).status_code == 413
    after = _scrape(node)
    assert after["prognode_instances_received_total"] == 4.0
    assert after["prognode_bytes_received_total"] - before["prognode_bytes_received_total"] == sum(map(len, parts))
    assert {k: v for k, v in after.items() if k.startswith("prognode_stow_requests_total")} == {
        "prognode_stow_requests_total/partial": 1.0, "prognode_stow_requests_total/unsupported_media_type": 1.0,
        "prognode_stow_requests_total/too_large": 1.0}
    assert after["prognode_instances_stored"] == 3.0  # the index: the C-STORE one and the two STOW-RS ones
    page = requests.get(url(node).removesuffix("/dicom-web") + "/", timeout=30,
                        headers={"Authorization": f"Bearer {READ_TOKEN}"}).text
    assert "Instances received<b>4</b>" in page


def test_multipart_parsing() -> None:
    assert boundary_of('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"
    assert boundary_of("Multipart/Related; boundary=xyz; type=application/dicom") == b"xyz"
    body, _ = multipart([b"one", b"", b"th\r\nree"])
    parts = [(h, bytes(body[s:e])) for h, s, e in split_parts(body, BOUNDARY.encode())]
    assert [p for _, p in parts] == [b"one", b"", b"th\r\nree"]
    assert parts[0][0] == {"content-type": "application/dicom"}
    bare = b"preamble\r\n--b\r\n\r\nraw\r\n--b--"
    assert [bytes(bare[s:e]) for _, s, e in split_parts(bare, b"b")] == [b"raw"]
