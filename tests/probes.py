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


# A larger, generated table: every Type 1 image pixel attribute and Pixel Data mutated in each way, in each
# transfer syntax the node reads itself (bench/hostile.py --matrix; tests/test_node_hostile.py) -------------

_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_US_ATTRIBUTES = {"SamplesPerPixel": 0x00280002, "Rows": 0x00280010, "Columns": 0x00280011,
                  "BitsAllocated": 0x00280100, "BitsStored": 0x00280101, "HighBit": 0x00280102,
                  "PixelRepresentation": 0x00280103}


def _spans(payload: bytes, implicit: bool) -> list[tuple[int, int, int]]:
    """(tag, start, end) of each top-level element of a data set without undefined lengths."""
    out, pos = [], 0
    while pos < len(payload):
        group, elem = struct.unpack_from("<HH", payload, pos)
        if implicit:
            end = pos + 8 + struct.unpack_from("<I", payload, pos + 4)[0]
        elif payload[pos + 4:pos + 6] in _LONG:
            end = pos + 12 + struct.unpack_from("<I", payload, pos + 8)[0]
        else:
            end = pos + 8 + struct.unpack_from("<H", payload, pos + 6)[0]
        out.append((group << 16 | elem, pos, end))
        pos = end
    return out


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    return explicit_element(tag >> 16, tag & 0xFFFF, vr, value)


def _replace(payload: bytes, implicit: bool, tag: int, new: bytes | None) -> bytes:
    """``payload`` with top-level element ``tag`` replaced by the encoded ``new`` (None: removed; inserted in
    tag order when absent)."""
    spans = _spans(payload, implicit)
    for t, start, end in spans:
        if t == tag:
            return payload[:start] + (new or b"") + payload[end:]
    if new is None:
        return payload
    at = next((start for t, start, _ in spans if t > tag), len(payload))
    return payload[:at] + new + payload[at:]


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def malformed_matrix() -> list[Case]:
    """About 200 data sets the node must refuse: each Type 1 image pixel attribute missing, empty, of odd or
    double length, of a wrong or bogus VR, or with an impossible value; Pixel Data missing, empty, short by
    one or two bytes, half, one frame of two; encapsulated without fragments; File Meta elements, stray
    delimiters and repeated elements at the top level; SOP Class or Instance differing from the request;
    for CT, Enhanced CT and Segmentation, in explicit VR, implicit VR and deflated explicit VR."""
    cases: list[Case] = []
    for sop_class, label in ((CTImageStorage, "ct"), (EnhancedCTImageStorage, "ect"),
                             ("1.2.840.10008.5.1.4.1.1.66.4", "seg")):
        base = ct_dataset(16, 16, sop_class)
        if label == "ect":
            base.NumberOfFrames = 1
        if label == "seg":
            base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 1, 1, 0, 0
            base.NumberOfFrames = 8
            base.PixelData = b"\x55" * (16 * 16 * 8 // 8)
            base["PixelData"].VR = "OB"
        sop, cls = str(base.SOPInstanceUID), str(base.SOPClassUID)
        for kind in ("explicit", "implicit", "deflated"):
            implicit = kind == "implicit"
            syntax = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
                      "deflated": DeflatedExplicitVRLittleEndian}[kind]
            plain = encoded(base, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)

            def add(name: str, payload: bytes, refuse: tuple[int, ...] = REFUSED, comment: str = "",
                    rq_class: str = cls, rq_sop: str = sop, kind: str = kind, syntax: str = syntax,
                    label: str = label) -> None:
                data = _deflate(payload) if kind == "deflated" else payload
                cases.append(Case(f"{label}-{kind}-{name}", rq_class, rq_sop, syntax, data, refuse, comment))

            for keyword, tag in _US_ATTRIBUTES.items():
                add(f"{keyword}-missing", _replace(plain, implicit, tag, None), comment=keyword)
                add(f"{keyword}-empty", _replace(plain, implicit, tag, _element(tag, "US", b"", implicit)),
                    comment=keyword)
                add(f"{keyword}-odd-length", _replace(plain, implicit, tag, _element(tag, "US", b"\x01\x00\x00",
                                                                                     implicit)), comment=keyword)
                add(f"{keyword}-two-values", _replace(plain, implicit, tag, _element(tag, "US", b"\x01\x00" * 2,
                                                                                     implicit)), comment=keyword)
                if not implicit:
                    add(f"{keyword}-vr-QQ", _replace(plain, False, tag, _element(tag, "QQ", _us(16), False)),
                        comment=keyword)
                    add(f"{keyword}-vr-LO", _replace(plain, False, tag, _element(tag, "LO", b"16", False)),
                        comment=keyword)
            for name, tag, value in (("Rows-zero", 0x00280010, 0), ("Columns-zero", 0x00280011, 0),
                                     ("BitsAllocated-12", 0x00280100, 12), ("BitsStored-zero", 0x00280101, 0),
                                     ("BitsStored-over", 0x00280101, 33), ("HighBit-over", 0x00280102, 40),
                                     ("PixelRepresentation-2", 0x00280103, 2),
                                     ("SamplesPerPixel-zero", 0x00280002, 0)):
                add(name, _replace(plain, implicit, tag, _element(tag, "US", _us(value), implicit)))
            photometric = 0x00280004
            add("Photometric-missing", _replace(plain, implicit, photometric, None), comment="Photometric")
            add("Photometric-empty", _replace(plain, implicit, photometric, _element(photometric, "CS", b"", implicit)),
                comment="Photometric")
            add("Photometric-lowercase", _replace(plain, implicit, photometric,
                                                  _element(photometric, "CS", b"mono", implicit)),
                comment="Photometric")
            frames_tag = 0x00280008
            add("NumberOfFrames-zero", _replace(plain, implicit, frames_tag, _element(frames_tag, "IS", b"0 ", implicit)))
            add("NumberOfFrames-text", _replace(plain, implicit, frames_tag, _element(frames_tag, "IS", b"ab", implicit)))
            pixel = 0x7FE00010
            pixels = bytes(base.PixelData)
            vr = base["PixelData"].VR
            add("PixelData-missing", _replace(plain, implicit, pixel, None), comment="Pixel Data")
            for name, cut in (("empty", len(pixels)), ("short-1", 1), ("short-2", 2), ("half", len(pixels) // 2)):
                add(f"PixelData-{name}", _replace(plain, implicit, pixel,
                                                  _element(pixel, vr, pixels[:len(pixels) - cut], implicit)),
                    comment="Pixel Data")
            two = str(2 * int(base.get("NumberOfFrames", 1))).encode().ljust(2)
            add("PixelData-one-frame-of-two", _replace(_replace(plain, implicit, frames_tag,
                                                                _element(frames_tag, "IS", two, implicit)),
                                                       implicit, pixel, _element(pixel, vr, pixels, implicit)),
                comment="Pixel Data")
            add("group-0002-first", _element(0x00020010, "UI", b"1.2.840.10008.1.2\x00", implicit) + plain,
                comment="0002")
            add("item-delimiter-last", plain + struct.pack("<HHI", 0xFFFE, 0xE00D, 0), comment="delimit")
            add("sequence-delimiter-last", plain + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), comment="delimit")
            add("item-at-top-level", plain + struct.pack("<HHI", 0xFFFE, 0xE000, 0), comment="delimit")
            add("SOPInstanceUID-twice", plain + _element(0x00080018, "UI", _ui(sop), implicit), comment="twice")
            other_class = EnhancedCTImageStorage if sop_class == CTImageStorage else CTImageStorage
            add("request-SOP-Class-differs", plain, (0xA900,), "SOP Class", rq_class=other_class)
            add("request-SOP-Instance-differs", plain, (0xA900,), "SOP Instance", rq_sop=str(generate_uid()))
            if kind == "explicit":
                add("encapsulated-no-fragment", encapsulated(plain, []), comment="Pixel Data", syntax=RLELossless)
                add("encapsulated-empty-fragments", encapsulated(plain, [b"", b""]), comment="Pixel Data",
                    syntax=RLELossless)
    return cases


def valid_matrix() -> list[Case]:
    """Unusual but valid variants the node must store: private elements, trailing pixel padding, several
    frames, a 32-bit CT, a 16-bit segmentation, an encapsulated one, in each syntax."""
    cases: list[Case] = []
    for kind in ("explicit", "implicit", "deflated"):
        syntax = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
                  "deflated": DeflatedExplicitVRLittleEndian}[kind]
        variants: list[tuple[str, Dataset]] = []
        ds = ct_dataset(16, 16)
        ds.private_block(0x0009, "PROBE PRIVATE", create=True).add_new(0x01, "LO", "private")
        variants.append(("private", ds))
        ds = ct_dataset(16, 16)
        ds.PixelData = bytes(ds.PixelData) + b"\x00\x00"
        variants.append(("padded-pixels", ds))
        ds = ct_dataset(16, 16, EnhancedCTImageStorage)
        ds.NumberOfFrames = 3
        ds.PixelData = bytes(ds.PixelData) * 3
        variants.append(("enhanced-3-frames", ds))
        ds = ct_dataset(16, 16)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.PixelData = b"\x00" * (16 * 16 * 4)
        variants.append(("32-bit", ds))
        ds = ct_dataset(16, 16, "1.2.840.10008.5.1.4.1.1.66.4")
        ds.NumberOfFrames = 2
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
        ds.PixelData = b"\xff" * (16 * 16 * 2 // 8)
        ds["PixelData"].VR = "OB"
        variants.append(("seg-binary", ds))
        for name, ds in variants:
            payload = encoded(ds, syntax)
            cases.append(Case(f"{kind}-{name}", str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, payload))
    ds = ct_dataset(16, 16)
    cases.append(Case("rle-two-fragments", str(ds.SOPClassUID), str(ds.SOPInstanceUID), RLELossless,
                      encapsulated(encoded(ds), [b"\x00" * 64, b"\x00" * 10])))
    return cases
