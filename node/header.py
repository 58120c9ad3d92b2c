"""Read the few header elements the C-STORE handler needs, without decoding the whole dataset.

The handler needs a dozen attributes of every instance (UIDs, position, routing keywords) and
to know that the dataset is not cut short.  Decoding the whole dataset with pydicom and then
converting each attribute costs about a millisecond per instance, on the critical path of
every C-STORE.  :func:`read_header` instead walks the encoded element headers of a *little
endian* dataset (PS3.5 7.1: explicit or implicit VR; encapsulated pixel data and sequences of
undefined length included), keeps the raw values of the wanted top-level tags, and returns
returns their text (character sets, rare VRs and sequences still go through pydicom).

Deflated and big endian transfer syntaxes are not read here: the caller decodes those with
pydicom as before (:func:`readable_here`).

:file_meta_bytes: encodes the File Meta Information (PS3.10 7.1) that goes in front of the
dataset as received: the same elements, in the same order, as pynetdicom's
``create_file_meta``, encoded directly.
"""

from __future__ import annotations

import functools
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.charset import convert_encodings
from pydicom.datadict import _dictionary_vr_fast, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.values import convert_string

from node.dicom_facts import STORAGE_SOP_CLASSES

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
SPECIFIC_CHARACTER_SET = 0x00080005
PIXEL_DATA = 0x7FE00010
MAX_DEPTH = 32  # nesting of sequences and items; deeper is refused, not recursed into

# Image Pixel module attributes (PS3.3 C.7.6.3) that are Type 1 in the image IODs the node receives, and
# Number of Frames (PS3.3 C.7.6.6): read from every data set for :func:`check_image`.
IMAGE_US_TAGS = {"SamplesPerPixel": 0x00280002, "Rows": 0x00280010, "Columns": 0x00280011,
                 "BitsAllocated": 0x00280100, "BitsStored": 0x00280101, "HighBit": 0x00280102,
                 "PixelRepresentation": 0x00280103}
PHOTOMETRIC_INTERPRETATION = 0x00280004
NUMBER_OF_FRAMES = 0x00280008
IMAGE_TAGS = frozenset((*IMAGE_US_TAGS.values(), PHOTOMETRIC_INTERPRETATION, NUMBER_OF_FRAMES))

# PS3.5 Table 7.1-1: explicit VRs whose element header has a reserved field and a 32-bit length
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG_AND_LENGTH = struct.Struct("<HHI")  # implicit VR element header, and item / delimiter headers
_TAG_VR_LENGTH16 = struct.Struct("<HH2sH")  # explicit VR element header with a 16-bit length


class HeaderError(ValueError):
    """The encoded dataset is malformed or cut short (the message says where)."""


class VRMismatch(HeaderError):
    """The data set is encoded in the other VR encoding (explicit or implicit) than its transfer syntax."""


class ImageError(ValueError):
    """The data set is readable but is not a usable image of its SOP Class (the message says why)."""


@dataclass
class ImageFacts:
    """What :func:`check_image` needs, collected by the same walk: the raw values (VR as sent, or None in
    implicit VR) of the image pixel attributes, and the Pixel Data element: its VR, its length (None:
    encapsulated) and, encapsulated, how many non-empty fragments follow the Basic Offset Table."""

    values: dict[int, tuple[str | None, bytes]]
    pixel_vr: str | None = None
    pixel_length: int | None = None
    pixel_present: bool = False
    fragments: int = 0


@dataclass(frozen=True)
class HeaderReader:
    """Reads the top-level elements named by ``keywords`` (and SpecificCharacterSet)."""

    tags: frozenset[int]

    @classmethod
    def for_keywords(cls, keywords: Iterable[str]) -> HeaderReader:
        tags = {SPECIFIC_CHARACTER_SET}
        for kw in keywords:
            tag = tag_for_keyword(kw)
            if tag is None:
                raise ValueError(f"not a DICOM keyword: {kw!r}")
            tags.add(int(tag))
        return cls(frozenset(tags))

    @functools.cached_property
    def keywords(self) -> dict[int, str]:
        """The keyword of each tag read (looked up once)."""
        return {tag: keyword_for_tag(tag) for tag in self.walked if keyword_for_tag(tag)}

    @functools.cached_property
    def walked(self) -> frozenset[int]:
        """The tags the walk keeps: the wanted ones and :data:`IMAGE_TAGS`."""
        return self.tags | IMAGE_TAGS

    def read(self, data: bytes | bytearray | memoryview, implicit_vr: bool) -> dict[str, str]:
        """The text of each wanted element present in the little endian ``data``, by keyword
        (multiple values joined by backslashes, padding stripped, text decoded by the
        dataset's SpecificCharacterSet), as :class:`node.index.InstanceMeta` reads it.

        Raises :class:`HeaderError` when ``data`` ends inside an element or its structure is
        broken (an element or item longer than what is left, a sequence never closed, an
        element of the File Meta Information group 0002, a delimitation item or an element
        that occurs twice at the top level)."""
        return self.read_instance(data, implicit_vr)[0]

    def read_instance(self, data: bytes | bytearray | memoryview,
                      implicit_vr: bool) -> tuple[dict[str, str], ImageFacts]:
        """:meth:`read`, and the :class:`ImageFacts` of the data set (same walk)."""
        view = memoryview(data).cast("B")
        if not view:
            raise HeaderError("no data elements")
        found: dict[int, tuple[str | None, bytes]] = {}
        facts = ImageFacts({})
        check_encoding(view, implicit_vr)
        _walk(view, 0, len(view), implicit_vr, self.walked, found, 0, stop_at=None, facts=facts)
        for tag in IMAGE_TAGS:
            if tag in found:
                facts.values[tag] = found[tag] if tag in self.tags else found.pop(tag)
        charset = found.get(SPECIFIC_CHARACTER_SET)
        texts: dict[str, str] = {}
        for tag, (vr, raw) in found.items():
            text = _to_text(tag, vr, raw, None if charset is None else charset[1])
            keyword = self.keywords.get(tag)
            if keyword:
                texts[keyword] = text
        return texts, facts


def readable_here(transfer_syntax: UID) -> bool:
    """Whether :meth:`HeaderReader.read` can read datasets in ``transfer_syntax`` (little endian, not deflated)."""
    return bool(transfer_syntax.is_little_endian) and not transfer_syntax.is_deflated


def _dictionary_vr(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0] if " or " in vr else vr


_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
# Values whose text is their ASCII bytes less the trailing padding, exactly as pydicom converts them (checked by
# tests/test_node_oneread.py): one or more values of these characters, joined by backslashes, then NULs or
# spaces.  Every other value (non-ASCII, control characters, leading or inner padding, empty values in a list,
# numbers pydicom may rewrite, text VRs where a backslash is a character) is converted by pydicom itself.
_PLAIN_WORD = rb"[\x21-\x5B\x5D-\x7E]+(?: [\x21-\x5B\x5D-\x7E]+)*"
_PLAIN = {vr: re.compile(rb"(?:%s(?:\\%s)*)?%s" % (word, word, rb" *" if vr == "AE" else rb"[\x00 ]*"))
          for vr, word in (  # (pydicom strips spaces only from AE values, NULs and spaces from the others)
    ("UI", rb"[0-9]+(?:\.[0-9]+)*"),
    ("IS", rb"[+-]?[0-9]{1,9}(?![0-9])"),  # pydicom reads longer ones as floats
    ("DS", rb"(?=[0-9eE+.-]{1,16}(?![0-9eE+.-]))[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"),
    *((vr, _PLAIN_WORD) for vr in ("AE", "AS", "CS", "DA", "DT", "TM", "LO", "SH", "PN", "UC")),
)}


def _to_text(tag: int, vr: str | None, raw: bytes, charset: bytes | None) -> str:
    """One element's value as text, as ``InstanceMeta.text_of`` gives it for pydicom's reading of the same
    element (``vr``: as sent, None in implicit VR); plain values here, the others converted by pydicom."""
    known = vr if vr is not None else _dictionary_vr(tag)
    plain = _PLAIN.get(known)
    if plain is not None and plain.fullmatch(raw):
        return raw.rstrip(b"\x00 ").decode("ascii")
    fmt = _BINARY.get(known)
    if fmt is not None and len(raw) % struct.calcsize(fmt) == 0:
        n = len(raw) // struct.calcsize(fmt)
        return "\\".join(str(v) for v in struct.unpack(f"<{n}{fmt}", raw))
    ds = Dataset()
    if charset is not None:
        ds[SPECIFIC_CHARACTER_SET] = RawDataElement(  # type: ignore[assignment]
            Tag(SPECIFIC_CHARACTER_SET), "CS", len(charset), charset, 0, vr is None, True)
    ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, vr is None, True)  # type: ignore[assignment]
    return value_text(ds[tag].value)


@functools.lru_cache(maxsize=64)
def _check_charset(vr: str | None, raw: bytes) -> None:
    """Refuse a Specific Character Set that pydicom cannot read: it converts it twice while reading a data
    set or item (filereader.data_element_generator and read_dataset), and an error there fails the whole file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_encodings(convert_string(raw, True))
            ds = Dataset()
            ds[SPECIFIC_CHARACTER_SET] = RawDataElement(  # type: ignore[assignment]
                Tag(SPECIFIC_CHARACTER_SET), vr, len(raw), raw, 0, vr is None, True)
            convert_encodings(ds[SPECIFIC_CHARACTER_SET].value)
    except Exception as e:
        raise HeaderError(f"Specific Character Set unreadable: {type(e).__name__}: {e}") from None


def value_text(value: object) -> str:
    """A pydicom value as the index keeps it: multiple values joined by backslashes, None as ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)


# PS3.5 6.2: the VRs; an explicit VR element with any other code is refused (pydicom would read it with a
# 16-bit length, or as an implicit VR element when the code is not two capitals)
_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD",
                  b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
                  b"UL", b"UN", b"UR", b"US", b"UT", b"UV"})


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _name(tag: int) -> str:
    """The keyword of ``tag``, or (gggg,eeee) (an ErrorComment holds 64 characters)."""
    return keyword_for_tag(tag) or _tag(tag)


def _looks_implicit(view: memoryview, pos: int) -> bool:
    """pydicom's test of the encoding of a data set or item starting at ``pos`` (filereader._is_implicit_vr):
    implicit unless the two bytes where an explicit VR would be are capital letters."""
    if len(view) - pos < 6:
        return False
    return not (0x40 < view[pos + 4] < 0x5B and 0x40 < view[pos + 5] < 0x5B)


def check_encoding(view: memoryview, implicit_vr: bool) -> None:
    """Refuse (:class:`VRMismatch`) a data set whose first element is encoded in the other VR encoding than the
    transfer syntax says: pydicom reads a stored file by its first element, and would read it all otherwise."""
    if len(view) < 6 or _U16.unpack_from(view, 0)[0] in (0x0000, 0x0002):
        return  # too short, or a command or File Meta element first: the walk refuses those by name
    if _looks_implicit(view, 0) != implicit_vr:
        raise VRMismatch(f"VR mismatch: {'explicit' if implicit_vr else 'implicit'} VR data set on an "
                         f"{'implicit' if implicit_vr else 'explicit'} VR context")


def _is_sequence(view: memoryview, pos: int, end: int, tag: int, vr: bytes | None) -> bool:
    """Whether pydicom reads an element of undefined length as a sequence (filereader.data_element_generator):
    SQ or UN (PS3.5 6.2.2) in explicit VR; in implicit VR, by the dictionary, or when the tag is unknown, by
    whether an item follows."""
    if vr is not None:
        return vr in (b"SQ", b"UN")
    try:
        return bool(_dictionary_vr_fast(tag) == "SQ")
    except KeyError:
        if end - pos < 4:
            raise HeaderError(f"element {_tag(tag)} of undefined length cut short") from None
        return bool(_U32.unpack_from(view, pos)[0] == (ITEM >> 16 | (ITEM & 0xFFFF) << 16))


def _walk(view: memoryview, pos: int, end: int, implicit_vr: bool, wanted: frozenset[int] | None,
          found: dict[int, tuple[str | None, bytes]], depth: int, stop_at: int | None,
          facts: ImageFacts | None = None) -> int:
    """Walk data elements from ``pos`` as pydicom reads them; return the offset after the last one (after
    the ``stop_at`` delimiter when one is given).  Top-level wanted values go in ``found``; at the top level
    (``facts`` given) Pixel Data is described in ``facts`` and command and File Meta elements and repeated
    elements are refused.  Anything pydicom would read another way than this walk (an unknown VR, a
    delimiter or item out of place, an element running past its item, a wanted element of undefined
    length) is refused."""
    if depth > MAX_DEPTH:
        raise HeaderError(f"sequences nested deeper than {MAX_DEPTH}")
    last_tag = -1
    seen: list[int] = []
    while pos < end:
        if end - pos < 8:
            raise HeaderError(f"{end - pos} stray bytes at offset {pos}")
        group, element, length = _TAG_AND_LENGTH.unpack_from(view, pos)
        tag = group << 16 | element
        if group == 0xFFFE:
            if stop_at is not None and tag == stop_at:
                if length:
                    raise HeaderError(f"item delimitation item of length {length} at offset {pos}")
                return pos + 8
            raise HeaderError(f"stray delimitation item ({group:04X},{element:04X}) at offset {pos} of the data set")
        if facts is not None:  # the top level
            if group < 0x0008:
                if group == 0x0002:
                    raise HeaderError(f"File Meta Information element ({group:04X},{element:04X}) inside the "
                                      "data set")
                if group == 0x0000:
                    raise HeaderError(f"command element ({group:04X},{element:04X}) inside the data set")
            if tag <= last_tag and tag in seen:
                raise HeaderError(f"element ({group:04X},{element:04X}) occurs twice in the data set")
            seen.append(tag)
            last_tag = tag
        vr: bytes | None = None
        if implicit_vr:
            pos += 8
        else:
            vr = _TAG_VR_LENGTH16.unpack_from(view, pos)[2]
            if vr not in _VRS:
                raise HeaderError(f"{_name(tag)} of unknown VR {vr.decode('latin-1')!r}")
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise HeaderError(f"element ({group:04X},{element:04X}) header cut short")
                length = _U32.unpack_from(view, pos + 8)[0]
                pos += 12
            else:
                length = _U16.unpack_from(view, pos + 6)[0]
                pos += 8
        if facts is not None and tag == PIXEL_DATA:
            facts.pixel_present = True
            facts.pixel_vr = None if vr is None else vr.decode("ascii")
            facts.pixel_length = None if length == UNDEFINED_LENGTH else length
        if length == UNDEFINED_LENGTH:
            if wanted is not None and tag in wanted:
                raise HeaderError(f"{_name(tag)} of undefined length")
            if _is_sequence(view, pos, end, tag, vr):
                pos = _walk_items(view, pos, end, implicit_vr, depth + 1, tag)
            else:  # encapsulated Pixel Data, or any other value of undefined length
                pos = _walk_fragments(view, pos, end, tag, facts if facts is not None and tag == PIXEL_DATA else None)
            continue
        if pos + length > end:
            raise HeaderError(f"element ({group:04X},{element:04X}) truncated ({end - pos} of {length} bytes)")
        if wanted is not None and tag in wanted:
            found[tag] = (None if vr is None else vr.decode("ascii"), bytes(view[pos:pos + length]))
        if tag == SPECIFIC_CHARACTER_SET:
            _check_charset(None if vr is None else vr.decode("ascii"), bytes(view[pos:pos + length]))
        pos += length
    if stop_at is not None:
        raise HeaderError(f"item or sequence not closed before offset {end}")
    return pos


def _next_item(view: memoryview, pos: int, end: int, owner: int) -> tuple[int, int | None]:
    """The item header at ``pos`` in a value of undefined length of element ``owner``: the position past it and
    the item's length, or ``None`` for the length when it is the sequence delimiter (the value's end)."""
    if end - pos < 8:
        raise HeaderError(f"element {_tag(owner)} of undefined length not closed")
    group, element, length = _TAG_AND_LENGTH.unpack_from(view, pos)
    tag = group << 16 | element
    if tag == SEQUENCE_DELIMITER:
        return pos + 8, None
    if tag != ITEM:
        raise HeaderError(f"({group:04X},{element:04X}) where an item of {_tag(owner)} was expected")
    return pos + 8, length


def _walk_items(view: memoryview, pos: int, end: int, implicit_vr: bool, depth: int, owner: int) -> int:
    """Walk the items of a sequence of undefined length up to and past its sequence delimiter, as pydicom's
    ``read_sequence`` does: each item read in implicit VR when the sequence is, or when its first element
    looks implicit (PS3.5 6.2.2), every element of an item of defined length inside it."""
    while True:
        pos, length = _next_item(view, pos, end, owner)
        if length is None:
            return pos
        item_implicit = implicit_vr or _looks_implicit(view, pos)
        if length == UNDEFINED_LENGTH:
            pos = _walk(view, pos, end, item_implicit, None, {}, depth + 1, stop_at=ITEM_DELIMITER)
        elif pos + length > end:
            raise HeaderError(f"item of {_tag(owner)} truncated ({end - pos} of {length} bytes)")
        else:
            _walk(view, pos, pos + length, item_implicit, None, {}, depth + 1, stop_at=None)
            pos += length


def _walk_fragments(view: memoryview, pos: int, end: int, owner: int, facts: ImageFacts | None) -> int:
    """Walk a value of undefined length that is not a sequence (encapsulated Pixel Data) up to and past its
    sequence delimiter, as pydicom reads it when its items are well formed (fileutil's
    ``_try_read_encapsulated_pixel_data``; pydicom's fallback, a search for the delimiter's bytes, is refused);
    counts the non-empty fragments after the Basic Offset Table in ``facts``."""
    first = True
    while True:
        pos, length = _next_item(view, pos, end, owner)
        if length is None:
            return pos
        if length == UNDEFINED_LENGTH or pos + length > end:
            raise HeaderError(f"item of {_tag(owner)} truncated ({end - pos} of {length} bytes)")
        pos += length
        if facts is not None and not first and length:
            facts.fragments += 1
        first = False


# Image Storage SOP Classes whose data sets must carry a complete image (PS3.4 B.5): CT, Enhanced CT, Legacy
# Converted Enhanced CT; Segmentation and Label Map Segmentation (PS3.3 A.51) with their own bit depths.
# (node.dicom_facts: the SOP Classes that require Pixel Data; the segmentations are its non-image ones)
IMAGE_SOP_CLASSES = frozenset(c.uid for c in STORAGE_SOP_CLASSES if c.pixel_data and c.image)
SEGMENTATION_SOP_CLASSES = frozenset(c.uid for c in STORAGE_SOP_CLASSES if c.pixel_data and not c.image)
_CS_CHARACTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")


def check_image(facts: ImageFacts, sop_class_uid: str, implicit_vr: bool) -> None:
    """Refuse (:class:`ImageError`) an image data set that cannot be an image of its SOP Class: a Type 1
    Image Pixel attribute missing or unreadable (wrong VR or length, an impossible value), no Pixel Data,
    native Pixel Data shorter than Rows x Columns x Samples per Pixel x Bits Allocated x Frames / 8
    (rounded up), or encapsulated Pixel Data without a non-empty fragment.  Other SOP Classes pass."""
    segmentation = sop_class_uid in SEGMENTATION_SOP_CLASSES
    if sop_class_uid not in IMAGE_SOP_CLASSES and not segmentation:
        return
    us: dict[str, int] = {}
    for keyword, tag in IMAGE_US_TAGS.items():
        raw = facts.values.get(tag)
        if raw is None:
            raise ImageError(f"{keyword} missing (Type 1)")
        vr, value = raw
        if (vr is not None and vr not in ("US", "UN")) or len(value) != 2:
            raise ImageError(f"{keyword} unreadable: {len(value)} bytes" + ("" if vr is None else f" of VR {vr}"))
        us[keyword] = _U16.unpack(value)[0]
    raw = facts.values.get(PHOTOMETRIC_INTERPRETATION)
    if raw is None:
        raise ImageError("PhotometricInterpretation missing (Type 1)")
    photometric = raw[1].rstrip(b" \x00")
    if (raw[0] is not None and raw[0] not in ("CS", "UN")) or not photometric \
            or not set(photometric) <= _CS_CHARACTERS:
        raise ImageError("PhotometricInterpretation unreadable or empty")
    bits, stored = us["BitsAllocated"], us["BitsStored"]
    allowed_bits = (1, 8, 16) if segmentation else (8, 16, 32, 64)
    if bits not in allowed_bits:
        raise ImageError(f"BitsAllocated {bits} not one of {', '.join(map(str, allowed_bits))}")
    if not 1 <= stored <= bits or us["HighBit"] >= bits:
        raise ImageError(f"BitsStored {stored} / HighBit {us['HighBit']} do not fit BitsAllocated {bits}")
    if us["PixelRepresentation"] not in (0, 1) or us["SamplesPerPixel"] < 1 or not us["Rows"] or not us["Columns"]:
        raise ImageError("PixelRepresentation, SamplesPerPixel, Rows or Columns out of range")
    frames = 1
    raw = facts.values.get(NUMBER_OF_FRAMES)
    if raw is not None and raw[1].strip(b" \x00"):
        try:
            frames = int(raw[1].strip(b" \x00").decode("ascii"))
        except ValueError:
            raise ImageError("NumberOfFrames unreadable") from None
        if frames < 1:
            raise ImageError(f"NumberOfFrames {frames}")
    if not facts.pixel_present:
        raise ImageError("Pixel Data missing")
    if facts.pixel_vr not in (None, "OB", "OW", "UN"):  # pydicom would read other VRs as text or numbers
        raise ImageError(f"Pixel Data of VR {facts.pixel_vr}")
    if facts.pixel_length is None:
        if not facts.fragments:
            raise ImageError("encapsulated Pixel Data without a complete fragment")
        return
    needed = (us["Rows"] * us["Columns"] * us["SamplesPerPixel"] * bits * frames + 7) // 8
    if facts.pixel_length < needed:
        raise ImageError(f"Pixel Data of {facts.pixel_length} bytes, {needed} needed for {us['Rows']}x"
                         f"{us['Columns']}x{us['SamplesPerPixel']}x{frames} at {bits} bits")


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                    implementation_uid: str, implementation_version: str) -> bytes:
    """The encoded File Meta Information group (PS3.10 Table 7.1-1; explicit VR little endian),
    without the preamble and prefix: group length, version 00\\01, Media Storage SOP Class and
    Instance UIDs, Transfer Syntax UID, Implementation Class UID and Version Name."""
    body = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", padded(sop_class_uid, b"\x00")),
        _explicit(0x0003, b"UI", padded(sop_instance_uid, b"\x00")),
        _explicit(0x0010, b"UI", padded(transfer_syntax, b"\x00")),
        _explicit(0x0012, b"UI", padded(implementation_uid, b"\x00")),
        _explicit(0x0013, b"SH", padded(implementation_version, b" ")),
    ))
    return _explicit(0x0000, b"UL", _U32.pack(len(body))) + body


def padded(text: str, pad: bytes) -> bytes:
    """``text`` as ASCII, padded to an even length with ``pad`` (PS3.5 6.2: NUL for UI, space otherwise)."""
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value
