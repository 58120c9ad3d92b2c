"""node.transport: the direct C-STORE-RSP encoder against pynetdicom's, and the event-driven loops
against a real storescu (release, abort, several instances on one association)."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import ThreadedAssociationServer

from node.transport import (
    READ_AHEAD,
    STANDARD_LOG_HANDLERS,
    NodeRequestHandler,
    Waker,
    WakingSocket,
    c_store_rsp_command,
    p_data_tf,
)
from tests.peers import storescu
from tests.synthetic_ct import write_study


def _rsp(status: int, sop: str, comment: str | None = None, sop_class: str | None = CTImageStorage,
         message_id: int = 7) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPInstanceUID = sop
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    rsp.Status = status
    if comment is not None:
        cast(Any, rsp).ErrorComment = comment  # typed None in pynetdicom's stubs
    return rsp


def _pynetdicom_bytes(rsp: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    return bytes(cast(bytes, encode(msg.command_set, True, True)))


@pytest.mark.parametrize("status,comment", [
    (0x0000, None), (0xA700, "out of disk space: No space left on device"), (0xA900, "odd"),
    (0xC210, "unreadable dataset: element (7FE0,0010) truncated (5 of 32 B)"), (0xB000, None),
])
@pytest.mark.parametrize("sop", ["1.2.3.4", "1.2.3.45", str(generate_uid())])
def test_c_store_rsp_bytes_as_pynetdicom(status: int, comment: str | None, sop: str) -> None:
    rsp = _rsp(status, sop, comment)
    assert c_store_rsp_command(rsp) == _pynetdicom_bytes(rsp)


@pytest.mark.parametrize("context_id", [1, 3, 255])
def test_p_data_tf_bytes_as_pynetdicom(context_id: int) -> None:
    value = b"\x03" + bytes(cast(bytes, c_store_rsp_command(_rsp(0, "1.2.3.4"))))
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, value))
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    assert p_data_tf(context_id, value) == pdu.encode()


def test_c_store_rsp_without_sop_class_and_large_message_id() -> None:
    rsp = _rsp(0, "1.2.3.4", sop_class=None, message_id=65535)
    assert c_store_rsp_command(rsp) == _pynetdicom_bytes(rsp)


def test_c_store_rsp_left_to_pynetdicom_when_unusual() -> None:
    rsp: Any = _rsp(0xA900, "1.2.3.4")
    rsp.OffendingElement = [0x00100010]
    assert c_store_rsp_command(rsp) is None
    assert c_store_rsp_command(_rsp(0xA900, "1.2.3.4", comment="Gr\u00fc\u00dfe")) is None  # not ASCII


def _serve(handler: Any, extra: list[Any] | None = None) -> tuple[ThreadedAssociationServer, threading.Thread]:
    ae = AE("PROGNODE")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = ae.make_server(("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, handler), *(extra or [])],
                            server_class=ThreadedAssociationServer, request_handler=NodeRequestHandler)
    for event, log_handler in STANDARD_LOG_HANDLERS:
        server.unbind(event, log_handler)
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def test_storescu_series_released_promptly(tmp_path: Path) -> None:
    """storescu sends a series on one association through the event-driven loops and the direct
    response encoder: every instance succeeds, the release is seen at once, no thread stays."""
    files = write_study(tmp_path / "ct", 0, dt.date(2026, 1, 1), slices=12).files
    got: list[str] = []
    released = threading.Event()

    def on_store(event: Any) -> int:
        got.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    server, thread = _serve(on_store, [(evt.EVT_RELEASED, lambda _e: released.set())])
    try:
        t0 = time.monotonic()
        storescu(server.server_address[1], tmp_path / "ct", timeout=60)
        assert released.wait(5)
        assert time.monotonic() - t0 < 30
        assert len(got) == len(files)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and [t for t in threading.enumerate() if t.name.startswith("Acceptor")]:
            time.sleep(0.05)
        assert not [t for t in threading.enumerate() if t.name.startswith("Acceptor")]
    finally:
        server.shutdown()
        thread.join(5)


def test_failure_status_reaches_storescu(tmp_path: Path) -> None:
    """A failure status with an ErrorComment, sent by the direct encoder, is what storescu reports."""
    files = write_study(tmp_path / "ct", 0, dt.date(2026, 1, 1), slices=1).files

    def on_store(_event: Any) -> Any:
        from pydicom.dataset import Dataset
        ds = Dataset()
        ds.Status = 0xA700
        ds.ErrorComment = "out of disk space"
        return ds

    server, thread = _serve(on_store)
    try:
        r = storescu(server.server_address[1], files, extra=["-d"], check=False, timeout=60)
        out = r.stdout + r.stderr
        assert "0xa700: Refused: Out of resources" in out, out
        assert "out of disk space" in out, out  # the Error Comment, as storescu decoded it
    finally:
        server.shutdown()
        thread.join(5)


def test_read_ahead_gives_exact_reads_across_buffer_and_large_pdus() -> None:
    """WakingSocket.recv returns exactly what was asked, in order, whether the bytes were read ahead
    with an earlier PDU, arrive in odd pieces, or belong to a PDU longer than the read-ahead buffer;
    a peer that closes mid-PDU gives a short read (pynetdicom then signals Evt17)."""
    ours, peer = socket.socketpair()
    waker = Waker()
    try:
        sock = WakingSocket(Association(AE(), MODE_ACCEPTOR), ours, waker)
        small = [bytes([i]) * n for i, n in enumerate((6, 130_000, 6, 1, 6, 65_536))]
        large = bytes(range(256)) * ((READ_AHEAD * 3) // 256 + 7)  # longer than the buffer
        tail = b"\x04\x00" + b"\x00\x00\x10\x00" + b"x" * 100  # a header, then a cut body
        stream = b"".join(small) + large + tail
        def send_in_pieces() -> None:
            for i in range(0, len(stream), 7777):
                peer.sendall(stream[i:i + 7777])
            peer.close()

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        for expected in small:
            assert sock.recv(len(expected)) == expected
        assert sock.recv(len(large)) == large
        assert sock.recv(6) == tail[:6]
        assert sock.recv(0x1000) == tail[6:]  # the peer closed: fewer bytes than asked
        sender.join(5)
    finally:
        ours.close()
        waker.close()
