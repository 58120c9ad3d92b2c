"""Hostile and malformed peers for the SCP, shared by the tests and bench/hostile.py.

Raw-socket probes (half an A-ASSOCIATE-RQ then silence, PDU headers claiming 4 GiB), a deflate bomb
built cheaply (zeros compressed inside a valid CT data set), and a table of malformed C-STORE data sets
with what the node must answer, next to unusual but valid ones it must keep accepting.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(text: str) -> bytes:
    return text.encode("ascii")


def associate_rq(called: str = "PROGNODE", calling: str = "PROBE", max_pdu: int = 16384,
                 contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, (ImplicitVRLittleEndian,)),)) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2); contexts get IDs 1, 3, 5..."""
    items = _item(0x10, _uid(APPLICATION_CONTEXT))
    for i, (abstract, syntaxes) in enumerate(contexts):
        body = struct.pack(">BBBB", 2 * i + 1, 0, 0, 0) + _item(0x30, _uid(abstract))
        body += b"".join(_item(0x40, _uid(ts)) for ts in syntaxes)
        items += _item(0x20, body)
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, _uid("1.2.826.0.1.3680043.10.1342.9")))
    head = struct.pack(">HH16s16s32s", 1, 0, called.ljust(16).encode(), calling.ljust(16).encode(), b"\x00" * 32)
    body = head + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def stalled_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that each send half an A-ASSOCIATE-RQ, then nothing."""
    rq = associate_rq()
    out = []
    for _ in range(count):
        s = connect(port)
        s.sendall(rq[: len(rq) // 2])
        out.append(s)
    return out


def closed_within(sockets: Sequence[socket.socket], timeout: float) -> tuple[int, float]:
    """(how many of ``sockets`` the peer closed within ``timeout`` seconds, seconds until the last did)."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    pending = list(sockets)
    last = 0.0
    while pending and time.monotonic() < deadline:
        for s in list(pending):
            s.settimeout(0.02)
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset
                data = b""
            if not data:  # closed (an A-ABORT or -RJ before the close is read and dropped)
                pending.remove(s)
                last = time.monotonic() - t0
    return len(sockets) - len(pending), last


def read_pdu(s: socket.socket, timeout: float = 5.0) -> tuple[int, bytes] | None:
    """One PDU (type, body) from ``s``, None when the peer closed first."""
    s.settimeout(timeout)
    head = b""
    while len(head) < 6:
        try:
            chunk = s.recv(6 - len(head))
        except OSError:
            return None
        if not chunk:
            return None
        head += chunk
    pdu_type, _, length = struct.unpack(">BBI", head)
    body = b""
    while len(body) < length:
        chunk = s.recv(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return pdu_type, body


def associated(port: int, contexts: Sequence[tuple[str, Sequence[str]]] = ((CTImageStorage, (ExplicitVRLittleEndian,)),),
               calling: str = "PROBE") -> socket.socket:
    """A raw socket with an established association (the first context accepted, ID 1)."""
    s = connect(port)
    s.sendall(associate_rq(calling=calling, contexts=contexts))
    pdu = read_pdu(s)
    if pdu is None or pdu[0] != 0x02:
        s.close()
        raise ConnectionError(f"association not accepted: {pdu and pdu[0]}")
    return s


def big_pdu_probe(port: int, established: bool, claimed: int = 0xFFFFFFFF, wait: float = 10.0) -> tuple[str, float]:
    """Send a PDU header claiming ``claimed`` bytes (an A-ASSOCIATE-RQ before association, a P-DATA-TF
    after it) and 64 KiB of its body; returns (what the node did: 'abort', 'closed', or 'open', seconds)."""
    s = associated(port) if established else connect(port)
    pdu_type = 0x04 if established else 0x01
    t0 = time.monotonic()
    try:
        s.sendall(struct.pack(">BBI", pdu_type, 0, claimed))
        try:
            s.sendall(b"\x00" * 65536)
        except OSError:
            pass
        reply = read_pdu(s, timeout=wait)
        if reply is None:
            took = time.monotonic() - t0
            return ("closed" if took < wait else "open"), took
        if reply[0] == 0x07:
            return "abort", time.monotonic() - t0
        return f"PDU 0x{reply[0]:02X}", time.monotonic() - t0
    finally:
        s.close()


# Data sets ---------------------------------------------------------------------------------------


def ct_dataset(rows: int = 128, columns: int = 128, sop_class: str = CTImageStorage) -> Dataset:
    """A small valid CT image (MONOCHROME2, 16 bits signed), new UIDs."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Probe^Malformed"
    ds.PatientID = "PROBE1"
    ds.StudyDate, ds.StudyTime = "20260101", "080000"
    ds.Modality = "CT"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 2.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.PixelData = b"\x00\x01" * (rows * columns)
    ds["PixelData"].VR = "OW"
    return ds


def encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    from pydicom.uid import UID
    from pynetdicom.dsutils import encode

    ts = UID(syntax)
    out = encode(ds, bool(ts.is_implicit_VR), bool(ts.is_little_endian), bool(ts.is_deflated))
    assert out is not None
    return bytes(out)


def explicit_element(group: int, element: int, vr: str, value: bytes) -> bytes:
    if vr in ("OB", "OW", "SQ", "UN", "UT", "UC", "UR", "OD", "OF", "OL", "OV", "SV", "UV"):
        return struct.pack("<HH2s2xI", group, element, vr.encode(), len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def with_element(payload: bytes, tag: int, element_bytes: bytes) -> bytes:
    """``element_bytes`` inserted at its place by tag among the top-level elements of an explicit VR LE
    data set whose elements before ``tag`` have short headers or long ones (walks headers only)."""
    pos = 0
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
    while pos < len(payload):
        group, elem = struct.unpack_from("<HH", payload, pos)
        if (group << 16 | elem) > tag:
            break
        vr = payload[pos + 4:pos + 6]
        if vr in long_vrs:
            length = struct.unpack_from("<I", payload, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", payload, pos + 6)[0]
            pos += 8 + length
    return payload[:pos] + element_bytes + payload[pos:]


def without_element(payload: bytes, tag: int) -> bytes:
    """The explicit VR LE ``payload`` without its top-level element ``tag`` (byte surgery, no pydicom)."""
    pos = 0
    long_vrs = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
    while pos < len(payload):
        group, elem = struct.unpack_from("<HH", payload, pos)
        vr = payload[pos + 4:pos + 6]
        start = pos
        if vr in long_vrs:
            pos += 12 + struct.unpack_from("<I", payload, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", payload, pos + 6)[0]
        if (group << 16 | elem) == tag:
            return payload[:start] + payload[pos:]
    raise KeyError(hex(tag))


@dataclass(frozen=True)
class Case:
    """One C-STORE: the request's SOP Class/Instance, transfer syntax and encoded data set, and
    whether the node must store it (``refuse``: the acceptable statuses and a word of the comment)."""

    name: str
    sop_class: str
    sop_instance: str
    syntax: str
    payload: bytes
    refuse: tuple[int, ...] = ()
    comment: str = ""


REFUSED = (0xA900, 0xC210, 0xC211, 0xC212, 0xC213)


def _case(name: str, mutate: Callable[[Dataset], None] | None = None, refuse: tuple[int, ...] = (),
          comment: str = "", raw: Callable[[bytes], bytes] | None = None, syntax: str = ExplicitVRLittleEndian,
          rq_class: str | None = None) -> Case:
    ds = ct_dataset(16, 16)
    if mutate is not None:
        mutate(ds)
    payload = encoded(ds, syntax)
    if raw is not None:
        payload = raw(payload)
    return Case(name, rq_class or str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, payload, refuse, comment)


def _del(*keywords: str) -> Callable[[Dataset], None]:
    def go(ds: Dataset) -> None:
        for kw in keywords:
            delattr(ds, kw)
    return go


def _short_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:-2]


def encapsulated(payload: bytes, fragments: Sequence[bytes]) -> bytes:
    """The explicit VR LE ``payload`` with its Pixel Data replaced by encapsulated Pixel Data (PS3.5 A.4):
    undefined length, an empty Basic Offset Table, one item per fragment, the sequence delimiter."""
    items = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f for f in fragments)
    return (without_element(payload, 0x7FE00010) + struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF)
            + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def _second_uids_after_delimiter(payload: bytes) -> bytes:
    other = ct_dataset(16, 16)
    uids = Dataset()
    for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(uids, k, other[k].value)
    tail = encoded(uids)
    return payload + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + tail


def malformed_cases() -> list[Case]:
    """Malformed data sets the node must refuse (and store nothing of)."""
    return [
        _case("sop-class-differs", refuse=(0xA900,), comment="SOP Class", rq_class=EnhancedCTImageStorage),
        _case("no-pixel-data", _del("PixelData"), REFUSED, "Pixel Data"),
        _case("short-pixel-data", _short_pixels, REFUSED, "Pixel Data"),
        _case("half-pixel-data", lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]),
              REFUSED, "Pixel Data"),
        _case("encapsulated-no-fragment", refuse=REFUSED, comment="Pixel Data", raw=lambda p: encapsulated(p, []),
              syntax=RLELossless),
        _case("encapsulated-empty-fragment", refuse=REFUSED, comment="Pixel Data",
              raw=lambda p: encapsulated(p, [b""]), syntax=RLELossless),
        _case("rows-missing", _del("Rows"), REFUSED, "Rows"),
        _case("columns-missing", _del("Columns"), REFUSED, "Columns"),
        _case("bits-allocated-missing", _del("BitsAllocated"), REFUSED, "BitsAllocated"),
        _case("bits-stored-missing", _del("BitsStored"), REFUSED, "BitsStored"),
        _case("high-bit-missing", _del("HighBit"), REFUSED, "HighBit"),
        _case("pixel-representation-missing", _del("PixelRepresentation"), REFUSED, "PixelRepresentation"),
        _case("samples-per-pixel-missing", _del("SamplesPerPixel"), REFUSED, "SamplesPerPixel"),
        _case("photometric-missing", _del("PhotometricInterpretation"), REFUSED, "PhotometricInterpretation"),
        _case("rows-odd-length", refuse=REFUSED, comment="Rows",
              raw=lambda p: with_element(without_element(p, 0x00280010), 0x00280010,
                                         explicit_element(0x0028, 0x0010, "US", b"\x10\x00\x00"))),
        _case("rows-bogus-vr", refuse=REFUSED, comment="Rows",
              raw=lambda p: with_element(without_element(p, 0x00280010), 0x00280010,
                                         explicit_element(0x0028, 0x0010, "QQ", struct.pack("<H", 16)))),
        _case("bits-allocated-zero", refuse=REFUSED, comment="BitsAllocated",
              raw=lambda p: with_element(without_element(p, 0x00280100), 0x00280100,
                                         explicit_element(0x0028, 0x0100, "US", struct.pack("<H", 0)))),
        _case("group-0002-in-data-set", refuse=REFUSED, comment="0002",
              raw=lambda p: explicit_element(0x0002, 0x0010, "UI", b"1.2.840.10008.1.2\x00") + p),
        _case("stray-delimiter-then-second-uids", refuse=REFUSED, comment="delimit",
              raw=_second_uids_after_delimiter),
    ]


def valid_unusual_cases() -> list[Case]:
    """Unusual but valid data sets the node must keep storing."""
    def private(ds: Dataset) -> None:
        block = ds.private_block(0x0009, "PROBE PRIVATE", create=True)
        block.add_new(0x01, "LO", "private text")
        block.add_new(0x02, "OB", b"\x01\x02\x03\x04")

    def longer_pixels(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData + b"\x00\x00"  # trailing padding: more than needed is fine

    def frames(ds: Dataset) -> None:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2

    return [
        _case("private-tags", private),
        _case("implicit-vr", syntax=ImplicitVRLittleEndian),
        _case("pixel-data-longer-than-needed", longer_pixels),
        _case("two-frames", frames),
        _case("rle-one-fragment", raw=lambda p: encapsulated(p, [b"\x00" * 64]), syntax=RLELossless),
        _case("deflated", syntax=DeflatedExplicitVRLittleEndian),
    ]


# The deflate bomb --------------------------------------------------------------------------------


def deflate_bomb(path: Path, inflated_bytes: int) -> tuple[str, str]:
    """Write a Deflated Explicit VR Little Endian CT data set to ``path`` whose Pixel Data inflates to
    about ``inflated_bytes`` of zeros (Rows x Columns x Frames match it); returns (SOP Class, SOP Instance).
    About 1 MB per GiB on the wire; built by streaming zeros through zlib, never held in memory."""
    ds = ct_dataset(512, 512)
    frame = 512 * 512 * 2
    frames = max(1, inflated_bytes // frame)
    ds.NumberOfFrames = frames
    del ds.PixelData
    head = encoded(ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\x00" * (16 * 1024 * 1024)
    size = frames * frame
    with path.open("wb") as f:
        f.write(comp.compress(head))
        f.write(comp.compress(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", size)))
        left = size
        while left:
            n = min(left, len(zeros))
            f.write(comp.compress(zeros[:n]))
            left -= n
        f.write(comp.flush())
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def vm_hwm(pid: int) -> int:
    """Peak resident set size of process ``pid`` in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# A raw C-STORE SCU (no pynetdicom on the sending side: sends exactly the bytes it is given) -------------


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _ui(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), implicit VR little endian, with a data set following."""
    body = (_implicit(0x0002, _ui(sop_class)) + _implicit(0x0100, struct.pack("<H", 0x0001))
            + _implicit(0x0110, struct.pack("<H", message_id)) + _implicit(0x0700, struct.pack("<H", 0))
            + _implicit(0x0800, struct.pack("<H", 0x0000)) + _implicit(0x1000, _ui(sop_instance)))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def raw_c_store(port: int, sop_class: str, sop_instance: str, syntax: str, payload: bytes,
                fragment: int = 16000, timeout: float = 60.0) -> tuple[int, str]:
    """C-STORE ``payload`` (an encoded data set) as it is on a raw association proposing only
    ``sop_class`` in ``syntax``; returns (Status, ErrorComment), or (-1, what happened) when no response came."""
    try:
        s = associated(port, contexts=((sop_class, (syntax,)),), calling="RAWSCU")
    except (ConnectionError, OSError) as e:
        return -1, f"association: {e}"
    try:
        s.settimeout(timeout)
        s.sendall(p_data(1, 0x03, c_store_command(sop_class, sop_instance)))
        for i in range(0, max(len(payload), 1), fragment):
            last = i + fragment >= len(payload)
            s.sendall(p_data(1, 0x02 if last else 0x00, payload[i:i + fragment]))
        command = b""
        while True:
            pdu = read_pdu(s, timeout)
            if pdu is None:
                return -1, "connection closed"
            if pdu[0] == 0x07:
                return -1, "aborted"
            if pdu[0] != 0x04:
                continue
            body = pdu[1]
            pos = 0
            done = False
            while pos < len(body):
                length = struct.unpack_from(">I", body, pos)[0]
                control = body[pos + 5]
                command += body[pos + 6:pos + 4 + length]
                done = done or bool(control & 0x03 == 0x03)
                pos += 4 + length
            if done:
                break
        status, comment, pos = -1, "", 0
        while pos + 8 <= len(command):
            _, element, length = struct.unpack_from("<HHI", command, pos)
            value = command[pos + 8:pos + 8 + length]
            if element == 0x0900:
                status = struct.unpack("<H", value)[0]
            elif element == 0x0902:
                comment = value.decode("ascii", "replace").strip()
            pos += 8 + length
        s.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4)  # A-RELEASE-RQ
        read_pdu(s, 5)
        return status, comment
    except OSError as e:
        return -1, f"{type(e).__name__}: {e}"
    finally:
        s.close()
