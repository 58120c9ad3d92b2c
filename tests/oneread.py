"""One reading (issue 11, item 3): mutate real data sets at random and check that each mutant is either refused
by the C-STORE path's header reader or indexed exactly as pydicom reads the stored file back.

Shared by tests/test_node_oneread.py (a few thousand mutants, bounded time) and bench/oneread_fuzz.py (more).

The node's reading is :func:`node.handlers.read_received` on the bytes as received, then
:meth:`node.index.InstanceMeta.from_text`, the request checks and :func:`node.header.check_image`, as in
``handle_store``.  pydicom's reading is ``pydicom.dcmread(..., force=False)`` of the file as the node stores it
(preamble, :func:`node.header.file_meta_bytes`, the bytes as received), then
:meth:`InstanceMeta.from_dataset`, and the image attributes the door checks rest on.
"""

from __future__ import annotations

import itertools
import random
import struct
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.handlers import PREAMBLE, TooLarge, read_received
from node.header import IMAGE_US_TAGS, HeaderError, ImageError, check_image, file_meta_bytes, readable_here
from node.index import META_KEYWORDS, ROUTING_KEYWORDS, InstanceMeta, InvalidInstance
from tests.peers import DATA
from tests.probes import ct_dataset

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"
IMPLEMENTATION_VERSION = "PROGNODE"
CAP = 64 * 1024 * 1024
KEYWORDS = (*META_KEYWORDS, *ROUTING_KEYWORDS)

_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR",
        b"US", b"UT", b"UV"]
ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
ITEM_DELIM = struct.pack("<HH", 0xFFFE, 0xE00D)
SEQ_DELIM = struct.pack("<HH", 0xFFFE, 0xE0DD)


@dataclass(frozen=True)
class Seed:
    """One data set as a C-STORE carries it: its name, SOP Class and Instance (the request's), transfer
    syntax, and encoded bytes (before deflation for the deflated syntax)."""

    name: str
    sop_class: str
    sop_instance: str
    syntax: str
    data: bytes

    @property
    def implicit(self) -> bool:
        return bool(UID(self.syntax).is_implicit_VR)


@dataclass(frozen=True)
class Verdict:
    """'refused' (with the reason), 'agreed', or 'disagreed' (with what differs)."""

    outcome: str
    detail: str = ""
    meta: InstanceMeta | None = None


@dataclass
class Tally:
    tried: int = 0
    refused: int = 0
    agreed: int = 0
    disagreed: list[tuple[str, str, Seed, bytes]] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)  # mutation kinds tried
    refusals: Counter[str] = field(default_factory=Counter)  # refusal reasons, first words
    seconds: float = 0.0


# Seeds ---------------------------------------------------------------------------------------------


def _encode(ds: Dataset, implicit: bool) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _shared_files() -> list[Path]:
    if not DATA.is_dir():
        return []
    skip = {".json", ".csv", ".gz", ".md", ".txt", ".nrrd", ".nii"}
    out = []
    for p in sorted(DATA.rglob("*")):
        if not p.is_file() or p.suffix in skip or p.name.startswith("LICENSE"):
            continue
        with p.open("rb") as f:
            head = f.read(132)
        if head[128:132] == b"DICM" or p.suffix in (".dcm", ".seg"):
            out.append(p)
    return out


def seeds(max_bytes: int = 600_000) -> list[Seed]:
    """Every readable DICOM file of the shared data (its data set in its own syntax when the node reads it,
    and re-encoded in implicit VR and for the deflated syntax) and generated CTs."""
    found: list[Seed] = []
    for p in _shared_files():
        try:
            raw = p.read_bytes()
            if len(raw) > max_bytes:
                continue
            fp = BytesIO(raw)
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
            syntax = meta.get("TransferSyntaxUID")
            ds: Dataset = pydicom.dcmread(BytesIO(raw))
        except Exception:
            continue
        if syntax is None or not readable_here(UID(syntax)):
            continue
        name = str(p.relative_to(DATA))
        cls, sop = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
        if not sop or not cls:  # the TotalSegmentator CT has empty UIDs: give it some
            ds.SOPClassUID = cls = cls or pydicom.uid.CTImageStorage
            ds.SOPInstanceUID = sop = pydicom.uid.generate_uid()
            ds.StudyInstanceUID = pydicom.uid.generate_uid()
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
            found.append(Seed(name, cls, sop, str(syntax), _encode(ds, bool(UID(syntax).is_implicit_VR))))
        else:
            found.append(Seed(name, cls, sop, str(syntax), raw[fp.tell():]))
        if UID(syntax).is_encapsulated:
            continue
        found.append(Seed(name + "@implicit", cls, sop, ImplicitVRLittleEndian, _encode(ds, True)))
        found.append(Seed(name + "@deflated", cls, sop, DeflatedExplicitVRLittleEndian, _encode(ds, False)))
    for rows, label in ((16, "ct16"), (64, "ct64")):
        ds = ct_dataset(rows, rows)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription = "Thorax Abdomen"
        ds.StationName = "CT01"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagesInAcquisition = 20
        ds.add_new(0x00081140, "SQ", [Dataset()])  # ReferencedImageSequence: an item to break
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = pydicom.uid.generate_uid()
        ds.ReferencedImageSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
            found.append(Seed(f"generated-{label}@{UID(syntax).keyword}", str(ds.SOPClassUID),
                              str(ds.SOPInstanceUID), syntax, _encode(ds, syntax == ImplicitVRLittleEndian)))
    return found


# The two readings ------------------------------------------------------------------------------------


def wire(seed: Seed, data: bytes) -> bytes:
    """The bytes on the wire for ``data`` in the seed's syntax (deflated for the deflated one)."""
    if UID(seed.syntax).is_deflated:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush()
    return data


def stored_file(seed: Seed, received: bytes) -> bytes:
    """The file the node writes: preamble, File Meta Information as the handler encodes it, the bytes as received."""
    return PREAMBLE + file_meta_bytes(seed.sop_class, seed.sop_instance, seed.syntax, IMPLEMENTATION_UID,
                                      IMPLEMENTATION_VERSION) + received


def node_reading(seed: Seed, received: bytes) -> tuple[InstanceMeta, dict[int, int]] | str:
    """What the C-STORE path indexes (the InstanceMeta and the image attributes the door checks read), or the
    reason it refuses."""
    try:
        texts, facts = read_received(received, UID(seed.syntax), (), CAP)
        meta = InstanceMeta.from_text(texts)
    except (HeaderError, TooLarge, InvalidInstance) as e:
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # the handler answers Cannot Understand to any other error of the reading
        return f"other {type(e).__name__}: {e}"
    if meta.sop_instance_uid != seed.sop_instance:
        return "SOP Instance differs from the request"
    if meta.sop_class_uid != seed.sop_class:
        return "SOP Class differs from the request"
    try:
        check_image(facts, meta.sop_class_uid, seed.implicit)
    except ImageError as e:
        return f"ImageError: {e}"
    image = {tag: struct.unpack("<H", raw[1])[0] for tag, raw in facts.values.items()
             if tag in IMAGE_US_TAGS.values() and len(raw[1]) == 2}
    if facts.pixel_present and facts.pixel_length is not None:
        image[0x7FE00010] = facts.pixel_length
    return meta, image


def pydicom_reading(file: bytes) -> tuple[InstanceMeta, Dataset]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(file), force=False)
        return InstanceMeta.from_dataset(ds), ds


def judge(seed: Seed, data: bytes) -> Verdict:
    """Refused by the node, or indexed as pydicom reads the stored file (else 'disagreed', saying how)."""
    received = wire(seed, data)
    ours = node_reading(seed, received)
    if isinstance(ours, str):
        return Verdict("refused", ours)
    meta, image = ours
    try:
        theirs, ds = pydicom_reading(stored_file(seed, received))
    except Exception as e:
        return Verdict("disagreed", f"pydicom cannot read the stored file: {type(e).__name__}: {e}"[:300], meta)
    if theirs != meta:
        diff = {k: (getattr(meta, k), getattr(theirs, k)) for k in meta.__dataclass_fields__
                if getattr(meta, k) != getattr(theirs, k)}
        if "attributes" in diff:
            a, b = diff.pop("attributes")
            diff.update({f"attributes.{k}": (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)})
        return Verdict("disagreed", f"index {diff!r}"[:400], meta)
    try:
        for tag, value in image.items():
            theirs_value = len(ds[tag].value) if tag == 0x7FE00010 else ds[tag].value
            if theirs_value != value:
                return Verdict("disagreed", f"image ({tag >> 16:04X},{tag & 0xFFFF:04X}) {value} vs {theirs_value!r}",
                               meta)
    except Exception as e:
        return Verdict("disagreed", f"pydicom cannot read an image attribute: {type(e).__name__}: {e}", meta)
    return Verdict("agreed", meta=meta)


# Mutations -------------------------------------------------------------------------------------------


def _elements(data: bytes, implicit: bool) -> list[tuple[int, int, int, int]]:
    """(tag, start, header length, end) of the top-level elements as far as a tolerant walk gets."""
    out = []
    pos = 0
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6]
        if implicit:
            head, length = 8, struct.unpack_from("<I", data, pos + 4)[0]
        elif vr in _LONG:
            if pos + 12 > len(data):
                break
            head, length = 12, struct.unpack_from("<I", data, pos + 8)[0]
        else:
            head, length = 8, struct.unpack_from("<H", data, pos + 6)[0]
        if length == 0xFFFFFFFF:
            end = data.find(SEQ_DELIM, pos + head)
            # the outermost delimiter of a nested value is not found this way: skip to the last before the
            # next element would be guesswork, so stop at the first and carry on from there
            if end < 0:
                break
            end += 8
        else:
            end = pos + head + length
        if end > len(data):
            break
        out.append((group << 16 | elem, pos, head, end))
        pos = end
    return out


def _element(tag: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    if vr in _LONG:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value) & 0xFFFF) + value


_UID_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E)
_TEXT_TAGS = {0x00080060: b"CS", 0x00080008: b"CS", 0x0008103E: b"LO", 0x00081010: b"SH", 0x00200013: b"IS",
              0x00200032: b"DS", 0x00200037: b"DS", 0x00280008: b"IS", 0x00201002: b"IS", 0x00100020: b"LO",
              0x00180050: b"DS", 0x00200011: b"IS", 0x00080005: b"CS", 0x00080070: b"LO"}
_WEIRD_TEXT = [b"", b" ", b"\x00", b"CT\x00", b"ct", b"C\xe9", b"\x1b$B", b"1\\2", b"1.0", b"1e3", b"+1", b" 7 ",
               b"nan", b"inf", b"0x10", b"-0", b"12345678901234567", b"1.2.3", b"ISO_IR 192", b"ISO 2022 IR 87",
               b"ISO_IR 100\\ISO_IR 126", b"\xff\xfe", b"A" * 70, b"1\\2\\3", b"1\\0\\0\\0\\1\\0", b"\t1"]
_BAD_UIDS = [b"1.2.3.abc", b"1.2..3", b"1.2.03", b"1.2.3 ", b" 1.2.3", b"1.2.3\x00\x00", b"1.2.3\\1.2.4",
             b"1.2.\xe93", b"", b"\x00", b"1" * 65, b"1.2.840.10008.5.1.4.1.1.2", b"0.0", b"1.2.3.", b"1.2.-3"]


def _insert_at_boundary(rng: random.Random, data: bytes, spans: list[tuple[int, int, int, int]], blob: bytes) -> bytes:
    at = rng.choice([s[1] for s in spans] + [len(data)]) if spans else 0
    return data[:at] + blob + data[at:]


def mutate(rng: random.Random, seed: Seed, data: bytes) -> tuple[str, bytes]:
    """One random mutation of ``data``: (its kind, the mutant)."""
    implicit = seed.implicit
    spans = _elements(data, implicit)
    kind = rng.choice(MUTATIONS)
    if kind == "byte-flip":
        limit = len(data) if rng.random() < 0.3 else min(len(data), 3000)
        pos = rng.randrange(max(1, limit))
        b = bytearray(data)
        if pos < len(b):
            b[pos] = rng.choice([b[pos] ^ (1 << rng.randrange(8)), rng.randrange(256), 0, 0xFF])
        return kind, bytes(b)
    if kind == "truncate":
        cut = rng.choice([rng.randrange(len(data) + 1), *([s[1] + rng.randrange(1, 13) for s in spans[-3:]])])
        return kind, data[:cut]
    if kind == "trailing-bytes":
        return kind, data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
    if kind in ("length-edit", "undefined-length") and spans:
        tag, start, head, end = rng.choice(spans)
        b = bytearray(data)
        length = end - start - head
        new = 0xFFFFFFFF if kind == "undefined-length" else rng.choice(
            [length + 1, length - 1, length + 2, length - 2, 0, 1, length * 2, 0xFFFF, 0x7FFFFFFF, length + 4])
        new &= 0xFFFFFFFF
        if head == 12 or implicit:
            struct.pack_into("<I", b, start + (8 if head == 12 else 4), new)
        else:
            struct.pack_into("<H", b, start + 6, new & 0xFFFF)
        out = bytes(b)
        if kind == "undefined-length" and rng.random() < 0.5:
            out = out[:end] + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + out[end:]
        return kind, out
    if kind == "vr-edit" and spans and not implicit:
        tag, start, head, end = rng.choice(spans)
        vr = rng.choice([*_VRS, b"QQ", b"un", b"\x00\x00", b"A\x01", b"ZZ", b"Z[", b"@A", bytes([rng.randrange(256),
                                                                                                  rng.randrange(256)])])
        value = data[start + head:end]
        if (vr in _LONG) != (head == 12) and rng.random() < 0.7:  # re-encode the header to keep lengths right
            return kind, data[:start] + _element(tag, vr, value[:0xFFFF], False) + data[end:]
        return kind, data[:start + 4] + vr + data[start + 6:]
    if kind == "vr-edit-in-item":
        positions = [i for i in _find_all(data, ITEM, 50) if i + 16 <= len(data)]
        if positions and not implicit:
            p = rng.choice(positions) + 8 + 4
            return kind, data[:p] + rng.choice([b"QQ", b"\x00\x00", b"UN", b"OB", b"SQ", b"ui"]) + data[p + 2:]
    if kind == "delimiter-insert":
        blob = rng.choice([ITEM_DELIM + b"\0" * 4, SEQ_DELIM + b"\0" * 4, ITEM + b"\0" * 4, ITEM + b"\xff" * 4,
                           ITEM_DELIM + b"\x4f\x42\x00\x00", SEQ_DELIM + b"\x01\x00\x00\x00"])
        if rng.random() < 0.5 or not spans:
            return kind, _insert_at_boundary(rng, data, spans, blob)
        nested = _find_all(data, b"\xfe\xff", 40)
        at = rng.choice(nested) if nested else rng.randrange(len(data) + 1)
        return kind, data[:at] + blob + data[at:]
    if kind == "delimiter-remove":
        found = _find_all(data, ITEM_DELIM, 30) + _find_all(data, SEQ_DELIM, 30)
        if found:
            i = rng.choice(found)
            return kind, data[:i] + data[i + 8:]
    if kind == "item-length-edit":
        found = [i for i in _find_all(data, ITEM, 60) if i + 8 <= len(data)]
        if found:
            i = rng.choice(found)
            length = struct.unpack_from("<I", data, i + 4)[0]
            new = rng.choice([0xFFFFFFFF, length + 2, length - 2 if length >= 2 else 3, 0, length + 8])
            return kind, data[:i + 4] + struct.pack("<I", new & 0xFFFFFFFF) + data[i + 8:]
    if kind == "duplicate" and spans:
        tag, start, head, end = rng.choice(spans)
        return kind, _insert_at_boundary(rng, data, spans, data[start:end])
    if kind == "group-0002":
        blob = _element(rng.choice([0x00020010, 0x00020003, 0x00020000, 0x00020002]), b"UI",
                        b"1.2.840.10008.1.2\x00", implicit)
        return kind, (blob + data) if rng.random() < 0.5 else _insert_at_boundary(rng, data, spans, blob)
    if kind == "group-0000":
        blob = struct.pack("<HHI", 0, rng.choice([0, 0x0100, 0x1000]), 2) + b"\x01\x00"
        return kind, (blob + data) if rng.random() < 0.6 else _insert_at_boundary(rng, data, spans, blob)
    if kind == "bad-uid" and spans:
        tags = [s for s in spans if s[0] in _UID_TAGS]
        if tags:
            tag, start, head, end = rng.choice(tags)
            value = rng.choice([*_BAD_UIDS, data[start + head:end] + b"\x00", data[start + head:end] + b"\\" + b"1.2"])
            return kind, data[:start] + _element(tag, b"UI", value, implicit) + data[end:]
    if kind == "text-value" and spans:
        tags = [s for s in spans if s[0] in _TEXT_TAGS]
        if tags:
            tag, start, head, end = rng.choice(tags)
            vr = _TEXT_TAGS[tag] if rng.random() < 0.8 else rng.choice([b"UN", b"OB", b"LO", b"UT", b"SQ"])
            value = rng.choice(_WEIRD_TEXT)
            if rng.random() < 0.3:
                value = data[start + head:end] + rng.choice([b" ", b"\x00", b"\\", b"\x80"])
            return kind, data[:start] + _element(tag, vr, value, implicit) + data[end:]
    if kind == "wrong-vr-encoding":  # the data set in the other VR encoding than the context says
        try:
            ds = pydicom.filereader.read_dataset(BytesIO(data), implicit, True)
            return kind, _encode(ds, not implicit)
        except Exception:
            pass
    if kind == "swap-elements" and len(spans) > 2:
        k = rng.randrange(len(spans) - 1)
        first, second = spans[k], spans[k + 1]
        return kind, data[:first[1]] + data[second[1]:second[3]] + data[first[1]:first[3]] + data[second[3]:]
    if kind == "sequence-break":
        found = [i - 4 for i in _find_all(data, b"SQ\x00\x00", 40) if i >= 4 and i + 8 <= len(data)] if not implicit else []
        if found:
            i = rng.choice(found)
            new = rng.choice([0xFFFFFFFF, 0, struct.unpack_from("<I", data, i + 8)[0] + 8])
            return kind, data[:i + 8] + struct.pack("<I", new & 0xFFFFFFFF) + data[i + 12:]
    if kind == "private-undefined":  # an unknown tag of undefined length: pydicom looks ahead for an item
        value = rng.choice([ITEM + b"\x04\x00\x00\x00abcd" + SEQ_DELIM + b"\0" * 4,
                           b"abcd" + SEQ_DELIM + b"\0" * 4, ITEM + b"\xff" * 4 + ITEM_DELIM + b"\0" * 4
                           + SEQ_DELIM + b"\0" * 4])
        private = rng.choice([0x00091010, 0x00290010, 0x00081010, 0x60003000, 0x00191001])
        header = (struct.pack("<HHI", private >> 16, private & 0xFFFF, 0xFFFFFFFF) if implicit else
                struct.pack("<HH2s2xI", private >> 16, private & 0xFFFF,
                            rng.choice([b"UN", b"OB", b"SQ", b"UT"]), 0xFFFFFFFF))
        return kind, _insert_at_boundary(rng, data, spans, header + value)
    if kind == "non-ascii" and spans:
        tags = [s for s in spans if s[0] in _TEXT_TAGS or s[0] in _UID_TAGS]
        if tags:
            tag, start, head, end = rng.choice(tags)
            b = bytearray(data)
            if end > start + head:
                b[rng.randrange(start + head, end)] = rng.choice([0x80, 0xE9, 0xFF, 0x1B, 0x5C, 0x00])
            return kind, bytes(b)
    return "byte-flip", mutate_bytes(rng, data)


def _find_all(data: bytes, needle: bytes, limit: int) -> list[int]:
    out: list[int] = []
    i = data.find(needle)
    while i >= 0 and len(out) < limit:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    if b:
        pos = rng.randrange(min(len(b), 2000))
        b[pos] ^= 1 << rng.randrange(8)
    return bytes(b)


MUTATIONS = ["byte-flip", "truncate", "trailing-bytes", "length-edit", "undefined-length", "vr-edit",
             "vr-edit-in-item", "delimiter-insert", "delimiter-remove", "item-length-edit", "duplicate", "group-0002",
             "group-0000", "bad-uid", "text-value", "wrong-vr-encoding", "swap-elements", "sequence-break",
             "private-undefined", "non-ascii"]


def mutants(seed_list: list[Seed], rng: random.Random, count: int) -> Iterator[tuple[Seed, str, bytes]]:
    """``count`` mutants: a seed at random, one to three mutations."""
    for _ in range(count):
        seed = rng.choice(seed_list)
        data = seed.data
        kinds = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            kind, data = mutate(rng, seed, data)
            kinds.append(kind)
        yield seed, "+".join(kinds), data


def run(seed_list: list[Seed], rng_seed: int, count: int, budget_s: float,
        on_mutant: Callable[[Seed, str, bytes, Verdict], None] | None = None) -> Tally:
    """Judge up to ``count`` mutants within ``budget_s`` seconds; the seeds themselves first."""
    tally = Tally()
    t0 = time.monotonic()
    rng = random.Random(rng_seed)
    pairs: list[tuple[Seed, str, bytes]] = [(s, "none", s.data) for s in seed_list]
    for seed, kind, data in itertools.chain(pairs, mutants(seed_list, rng, count)):
        if time.monotonic() - t0 > budget_s:
            break
        with warnings.catch_warnings():  # pydicom warns about most mutants
            warnings.simplefilter("ignore")
            verdict = judge(seed, data)
        tally.tried += 1
        for k in kind.split("+"):
            tally.kinds[k] += 1
        if verdict.outcome == "refused":
            tally.refused += 1
            tally.refusals[verdict.detail.split(":")[0] if not verdict.detail.startswith("HeaderError")
                           else " ".join(verdict.detail.split()[1:4])] += 1
        elif verdict.outcome == "agreed":
            tally.agreed += 1
        else:
            tally.disagreed.append((kind, verdict.detail, seed, data))
        if on_mutant is not None:
            on_mutant(seed, kind, data, verdict)
    tally.seconds = time.monotonic() - t0
    return tally
