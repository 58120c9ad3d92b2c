"""Every rejection of an association reaches a real peer as an A-ASSOCIATE-RJ with its reason, never as
"Peer aborted": the node sends the RJ and waits for it to go out and the peer to close
(node.access.send_rejection), and the raw reject of an address outside ``allowed_hosts`` waits too.

The DUL thread's sending of the A-ASSOCIATE-RJ is slowed here, so a path that closes the connection
without waiting loses the race every time instead of now and then on a busy machine."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RJ

from tests.conftest import need
from tests.node_helpers import running_node, write_config
from tests.probes import associated

SLOW_RJ_SECONDS = 0.3


@pytest.fixture
def slow_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    send = DULServiceProvider._send

    def slow(self: DULServiceProvider, pdu: Any) -> None:
        if isinstance(pdu, A_ASSOCIATE_RJ):
            time.sleep(SLOW_RJ_SECONDS)
        send(self, pdu)

    monkeypatch.setattr(DULServiceProvider, "_send", slow)


def _dcmtk(tool: str, port: int, calling: str, extra: list[str]) -> str:
    r = subprocess.run([tool, "-aet", calling, "-aec", "PROGNODE", "127.0.0.1", str(port), *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    return r.stdout + r.stderr


@pytest.mark.usefixtures("slow_rejects")
def test_real_peers_see_the_rejection_and_its_reason(tmp_path: Path, shared_data: Path) -> None:
    need("storescu", "echoscu")
    ct = str(shared_data / "pydicom_testfiles" / "CT_small.dcm")
    cases: tuple[tuple[dict[str, Any], str, str], ...] = (  # [node] settings, calling AE, what dcmtk prints
        ({"allowed_calling_aets": ["SCANNER1"]}, "INTRUDER", "Reason: Calling AE Title Not Recognized"),
        ({"allowed_calling_aets": ["SCANNER1@10.0.0.0/8"]}, "SCANNER1", "Reason: Calling AE Title Not Recognized"),
        ({"max_associations_per_ae": 1}, "SCANNER1", "Reason: Local Limit Exceeded"),  # the connection gate
        ({"allowed_hosts": ["10.0.0.0/8"]}, "SCANNER1", "Reason: No Reason"),  # before the association
    )
    for n, (node, calling, reason) in enumerate(cases):
        with running_node(write_config(tmp_path / str(n), node=node)) as running:
            held = associated(running.port, calling="SCANNER1") if "max_associations_per_ae" in node else None
            for tool, extra in (("echoscu", []), ("storescu", [ct])):
                out = _dcmtk(tool, running.port, calling, extra)
                assert "Association Rejected" in out and reason in out, (node, tool, out)
                assert "aborted" not in out.lower(), (node, tool, out)
            assert running.index.instance_count() == 0
            if held is not None:
                held.close()
