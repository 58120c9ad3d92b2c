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
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

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
        _walk(view, 0, len(view), implicit_vr, self.walked, found, 0, stop_at=None, facts=facts)
        for tag in IMAGE_TAGS:
            if tag in found:
                facts.values[tag] = found[tag] if tag in self.tags else found.pop(tag)
        charset = found.get(SPECIFIC_CHARACTER_SET)
        encodings = [e.strip() for e in charset[1].decode("ascii", "replace").split("\\")] if charset else []
        texts: dict[str, str] = {}
        for tag, (vr, raw) in found.items():
            vr = vr or _dictionary_vr(tag)
            text = _to_text(tag, vr, raw, encodings, implicit_vr)
            keyword = keyword_for_tag(tag)
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
_NUMBER_STRINGS = frozenset({"DS", "IS"})
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})  # PS3.5 6.1.2.3: affected by the charset
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}


def _to_text(tag: int, vr: str, raw: bytes, encodings: list[str], implicit_vr: bool) -> str:
    """One element's value as text; rare VRs and non-ASCII text are converted by pydicom."""
    if vr in _TEXT_VRS and (vr not in _CHARSET_VRS or (raw.isascii() and b"\x1b" not in raw)):
        text = raw.decode("ascii", "replace")
    elif vr in _CHARSET_VRS:
        text = decode_bytes(raw, convert_encodings(encodings or ["ISO_IR 6"]), {0x5C, 0x3D, 0x5E} if vr == "PN" else set())
    elif vr in _BINARY:
        fmt = _BINARY[vr]
        n = len(raw) // struct.calcsize(fmt)
        return "\\".join(str(v) for v in struct.unpack(f"<{n}{fmt}", raw[:n * struct.calcsize(fmt)]))
    else:  # sequences of defined length, OB, OW, UN...: as the slow path would show them
        ds = Dataset()
        ds[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, implicit_vr, True)  # type: ignore[assignment]
        value = ds[tag].value
        return "\\".join(str(v) for v in value) if type(value).__name__ == "MultiValue" else str(value)
    if vr in _NUMBER_STRINGS:  # pydicom parses each value, dropping the spaces around it
        return "\\".join(p.strip("\x00 ") for p in text.split("\\"))
    return text.rstrip("\x00 ")  # trailing padding only, as pydicom


def _walk(view: memoryview, pos: int, end: int, implicit_vr: bool, wanted: frozenset[int] | None,
          found: dict[int, tuple[str | None, bytes]], depth: int, stop_at: int | None,
          facts: ImageFacts | None = None) -> int:
    """Walk data elements from ``pos``; return the offset after the last one (after the
    ``stop_at`` delimiter when one is given).  Top-level wanted values go in ``found``; at the
    top level (``facts`` given) Pixel Data is described in ``facts`` and group 0002 elements,
    delimitation items and repeated elements are refused."""
    if depth > MAX_DEPTH:
        raise HeaderError(f"sequences nested deeper than {MAX_DEPTH}")
    last_tag = -1
    while pos < end:
        if end - pos < 8:
            raise HeaderError(f"{end - pos} stray bytes at offset {pos}")
        group, element, length = _TAG_AND_LENGTH.unpack_from(view, pos)
        tag = group << 16 | element
        if stop_at is not None and tag == stop_at:
            return pos + 8
        if facts is not None:  # the top level
            if group == 0x0002:
                raise HeaderError(f"File Meta Information element ({group:04X},{element:04X}) inside the data set")
            if group == 0xFFFE:
                raise HeaderError(f"stray delimitation item ({group:04X},{element:04X}) at offset {pos} of the data set")
            if tag <= last_tag and tag in _top_level_tags(view, 0, pos, implicit_vr):
                raise HeaderError(f"element ({group:04X},{element:04X}) occurs twice in the data set")
            last_tag = tag
        vr: bytes | None = None
        if implicit_vr or group == 0xFFFE:
            pos += 8
        else:
            _, _, vr, short = _TAG_VR_LENGTH16.unpack_from(view, pos)
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise HeaderError(f"element ({group:04X},{element:04X}) header cut short")
                length = _U32.unpack_from(view, pos + 8)[0]
                pos += 12
            else:
                length = short
                pos += 8
        if facts is not None and tag == PIXEL_DATA:
            facts.pixel_present = True
            facts.pixel_vr = None if vr is None else vr.decode("ascii", "replace")
            facts.pixel_length = None if length == UNDEFINED_LENGTH else length
        if length == UNDEFINED_LENGTH:
            # a sequence, encapsulated pixel data, or UN holding an implicit VR sequence (PS3.5 6.2.2)
            pos = _walk_items(view, pos, end, implicit_vr or vr == b"UN", found, depth + 1, tag,
                              facts if facts is not None and tag == PIXEL_DATA else None)
            continue
        if pos + length > end:
            raise HeaderError(f"element ({group:04X},{element:04X}) truncated ({end - pos} of {length} bytes)")
        if wanted is not None and tag in wanted:
            found[tag] = (None if vr is None else vr.decode("ascii", "replace"), bytes(view[pos:pos + length]))
        pos += length
    if stop_at is not None:
        raise HeaderError(f"item or sequence not closed before offset {end}")
    return pos


def _top_level_tags(view: memoryview, pos: int, end: int, implicit_vr: bool) -> set[int]:
    """The tags of the top-level elements between ``pos`` and ``end`` (walked again: only when the data set
    is out of order, which PS3.5 7.1 does not allow either)."""
    tags: set[int] = set()
    while pos < end:
        group, element, length = _TAG_AND_LENGTH.unpack_from(view, pos)
        tags.add(group << 16 | element)
        if implicit_vr or group == 0xFFFE:
            pos += 8
        else:
            _, _, vr, short = _TAG_VR_LENGTH16.unpack_from(view, pos)
            if vr in _LONG_VRS:
                length = _U32.unpack_from(view, pos + 8)[0]
                pos += 12
            else:
                length = short
                pos += 8
        pos = _walk_items(view, pos, end, implicit_vr or vr == b"UN", {}, 1, 0) if length == UNDEFINED_LENGTH \
            else pos + length
    return tags


def _walk_items(view: memoryview, pos: int, end: int, implicit_vr: bool,
                found: dict[int, tuple[str | None, bytes]], depth: int, owner: int,
                facts: ImageFacts | None = None) -> int:
    """Skip the items of an undefined-length value up to and past its sequence delimiter (counting, for
    encapsulated Pixel Data, the non-empty fragments after the Basic Offset Table in ``facts``)."""
    first = True
    while True:
        if end - pos < 8:
            raise HeaderError(f"element ({owner >> 16:04X},{owner & 0xFFFF:04X}) of undefined length not closed")
        group, element, length = _TAG_AND_LENGTH.unpack_from(view, pos)
        tag = group << 16 | element
        pos += 8
        if tag == SEQUENCE_DELIMITER:
            return pos
        if tag != ITEM:
            raise HeaderError(f"({group:04X},{element:04X}) where an item of ({owner >> 16:04X},"
                              f"{owner & 0xFFFF:04X}) was expected")
        if length == UNDEFINED_LENGTH:
            pos = _walk(view, pos, end, implicit_vr, None, found, depth + 1, stop_at=ITEM_DELIMITER)
        elif pos + length > end:
            raise HeaderError(f"item of ({owner >> 16:04X},{owner & 0xFFFF:04X}) truncated "
                              f"({end - pos} of {length} bytes)")
        else:
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
