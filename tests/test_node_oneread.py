"""One reading (issue 11, item 3): what the C-STORE path indexes is what pydicom reads back from the stored file.

A differential test: every readable DICOM file of ../shared/data and generated CTs, in explicit VR, implicit VR
and deflated explicit VR, mutated at random (seeded) a few thousand times within a time budget; each mutant is
either refused by the node's header reading (:func:`node.handlers.read_received`, the request checks,
:func:`node.header.check_image`) or indexed exactly as ``pydicom.dcmread(force=False)`` reads the file the node
stores (tests/oneread.py).  Then the kinds of disagreement the fuzzer found, built by hand, sent through a running
node with a raw C-STORE: refused with a named status and reason and nothing stored, or stored and indexed as
pydicom reads the file.  bench/oneread_fuzz.py runs more mutants and prints the table.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.handlers import CANNOT_UNDERSTAND, SUCCESS
from node.header import HeaderError, HeaderReader, VRMismatch
from node.index import InstanceMeta
from node.service import Node
from tests.node_helpers import running_node, write_config
from tests.oneread import KEYWORDS, Seed, judge, run, seeds
from tests.probes import _element, _replace, ct_dataset, encoded, raw_c_store

READER = HeaderReader.for_keywords(KEYWORDS)
RNG_SEED = 20261205
MUTANTS = 3000
BUDGET_S = 15.0


@pytest.fixture(scope="module")
def seed_list() -> list[Seed]:
    found = seeds()
    assert len([s for s in found if not s.name.startswith("generated")]) > 30 or not found, "shared data missing?"
    return found


def test_every_seed_is_read_identically(seed_list: list[Seed]) -> None:
    for seed in seed_list:
        verdict = judge(seed, seed.data)
        assert verdict.outcome == "agreed", (seed.name, verdict.detail)


def test_mutants_are_refused_or_read_identically(seed_list: list[Seed]) -> None:
    tally = run(seed_list, RNG_SEED, MUTANTS, BUDGET_S)
    print(f"\nmutants tried {tally.tried}, refused {tally.refused}, agreed {tally.agreed}, "
          f"disagreed {len(tally.disagreed)} in {tally.seconds:.1f} s")
    assert not tally.disagreed, [(kind, detail, seed.name) for kind, detail, seed, _ in tally.disagreed[:10]]
    assert tally.tried >= min(MUTANTS, 600)  # a slow machine still judges hundreds within the budget
    assert tally.refused and tally.agreed


# The kinds of disagreement found, by hand -------------------------------------------------------------------


def _ct(implicit: bool = False) -> tuple[Dataset, bytes]:
    ds = ct_dataset(16, 16)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StationName = "CT01"
    return ds, encoded(ds, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)


def _undefined_sequence(tag: int, vr: bytes, items: bytes, implicit: bool) -> bytes:
    head = (struct.pack("<HHI", tag >> 16, tag & 0xFFFF, 0xFFFFFFFF) if implicit
            else struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, 0xFFFFFFFF))
    return head + items + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _item(body: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


STATION = 0x00081010
REFERENCED_IMAGES = 0x00081140


def refused_cases() -> list[tuple[str, str, Dataset, bytes, str]]:
    """(name, syntax, data set, payload, a word of the reason) that the node must refuse."""
    cases: list[tuple[str, str, Dataset, bytes, str]] = []
    ds, explicit = _ct()
    implicit = encoded(ds, ImplicitVRLittleEndian)
    cases.append(("explicit-on-implicit", ImplicitVRLittleEndian, ds, explicit, "VR mismatch"))
    cases.append(("implicit-on-explicit", ExplicitVRLittleEndian, ds, implicit, "VR mismatch"))
    cases.append(("implicit-on-deflated", DeflatedExplicitVRLittleEndian, ds, implicit, "VR mismatch"))
    # pydicom reads group 0000 at the start of a data set as a command set, in implicit VR
    cases.append(("command-element-first", ExplicitVRLittleEndian, ds,
                  struct.pack("<HHI", 0, 0x0100, 2) + b"\x01\x00" + explicit, "command element"))
    # a lower-case VR: pydicom reads that element as implicit VR (a 32-bit length), the walk as explicit
    station = _element(STATION, "SH", b"CT01", False)
    cases.append(("vr-lower-case", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, STATION, station[:4] + b"sh" + station[6:]), "unknown VR"))
    cases.append(("vr-unknown", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, STATION, station[:4] + b"QQ" + station[6:]), "StationName"))
    # a wanted element of undefined length: pydicom reads its items as its value
    for name, implicit_vr in (("explicit", False), ("implicit", True)):
        payload = encoded(ds, ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian)
        undefined = _undefined_sequence(STATION, b"UN", _item(b"abcd"), implicit_vr)
        cases.append((f"wanted-undefined-length-{name}", ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian,
                      ds, _replace(payload, implicit_vr, STATION, undefined), "undefined length"))
    # an item of defined length whose element runs past it: pydicom reads on into the next item or element
    inner = _element(0x00081150, "UI", b"1.2.3.4\x00", False)
    short_item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner) - 2) + inner  # declared 2 bytes short
    overrun = _undefined_sequence(REFERENCED_IMAGES, b"SQ", short_item, False)
    cases.append(("item-overrun", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, REFERENCED_IMAGES, overrun), "truncated"))
    # Specific Character Set as a US value: pydicom fails reading the whole file
    cases.append(("charset-unreadable", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, 0x00080005, _element(0x00080005, "US", b"\x01\x00", False)),
                  "Character Set"))
    return cases


def agreed_cases() -> list[tuple[str, str, Dataset, bytes, dict[str, str]]]:
    """(name, syntax, data set, payload, index attributes expected) that the node must store, indexed as pydicom
    reads them (before, the index and the file said different things)."""
    cases: list[tuple[str, str, Dataset, bytes, dict[str, str]]] = []
    ds, explicit = _ct()
    modality = _element(0x00080060, "CS", b"C\xc9", False)  # non-ASCII: pydicom decodes it as Latin-1
    cases.append(("modality-non-ascii", ExplicitVRLittleEndian, ds, _replace(explicit, False, 0x00080060, modality),
                  {"Modality": "C\u00c9"}))
    ds, explicit = _ct()
    series_number = _element(0x00200011, "IS", b"12345678901234567 ", False)  # pydicom reads it as a float
    cases.append(("series-number-17-digits", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, 0x00200011, series_number), {"SeriesNumber": "1.2345678901234568e+16"}))
    ds, explicit = _ct()
    manufacturer = _element(0x00080070, "LO", b"ACME \\B ", False)  # padding inside a list of values
    cases.append(("padding-between-values", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, 0x00080070, manufacturer), {"Manufacturer": "ACME\\B"}))
    ds, explicit = _ct()
    # an item of an explicit VR sequence written in implicit VR (PS3.5 6.2.2): pydicom reads it so
    inner = struct.pack("<HHI", 0x0008, 0x1150, 8) + b"1.2.3.4\x00"
    sequence = _undefined_sequence(REFERENCED_IMAGES, b"UN", _item(inner, undefined=True), False)
    cases.append(("implicit-item-in-un-sequence", ExplicitVRLittleEndian, ds,
                  _replace(explicit, False, REFERENCED_IMAGES, sequence), {"Modality": "CT"}))
    return cases


@pytest.mark.parametrize("case", refused_cases(), ids=lambda c: c[0])
def test_disagreements_now_refused_by_the_reader(case: tuple[str, str, Dataset, bytes, str]) -> None:
    name, syntax, ds, payload, word = case
    seed = Seed(name, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, payload)
    verdict = judge(seed, payload)
    assert verdict.outcome == "refused" and word.lower() in verdict.detail.lower(), verdict


@pytest.mark.parametrize("case", agreed_cases(), ids=lambda c: c[0])
def test_disagreements_now_read_identically(case: tuple[str, str, Dataset, bytes, dict[str, str]]) -> None:
    name, syntax, ds, payload, attributes = case
    verdict = judge(Seed(name, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, payload), payload)
    assert verdict.outcome == "agreed", verdict
    assert verdict.meta is not None
    assert {k: verdict.meta.attributes[k] for k in attributes} == attributes


def test_vr_mismatch_is_its_own_error() -> None:
    ds, explicit = _ct()
    with pytest.raises(VRMismatch, match="explicit VR data set on an implicit VR context"):
        READER.read(explicit, implicit_vr=True)
    with pytest.raises(VRMismatch, match="implicit VR data set on an explicit VR context"):
        READER.read(encoded(ds, ImplicitVRLittleEndian), implicit_vr=False)
    assert issubclass(VRMismatch, HeaderError)


def test_encapsulated_fragment_holding_delimiter_bytes_read_as_pydicom() -> None:
    """A fragment that contains the bytes of a sequence delimiter: pydicom parses the items (not the bytes) first,
    as the walk does, and both find the elements after Pixel Data."""
    ds, explicit = _ct()
    fragment = b"\x00" * 8 + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + b"\x00" * 8
    pixels = (struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) + _item(b"") + _item(fragment)
              + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    payload = _replace(explicit, False, 0x7FE00010, None) + pixels + _element(0xFFFCFFFC, "OB", b"\x00\x00", False)
    verdict = judge(Seed("fragment", str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.5", payload),
                    payload)
    assert verdict.outcome == "agreed", verdict


# Through a running node ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with running_node(write_config(tmp_path_factory.mktemp("oneread"))) as n:
        yield n


@pytest.mark.parametrize("case", refused_cases(), ids=lambda c: c[0])
def test_refused_through_the_node(node: Node, case: tuple[str, str, Dataset, bytes, str]) -> None:
    name, syntax, ds, payload, word = case
    data = payload
    if syntax == DeflatedExplicitVRLittleEndian:
        import zlib
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        data = c.compress(payload) + c.flush()
    status, comment = raw_c_store(node.port, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, data)
    assert status == CANNOT_UNDERSTAND, (status, comment)
    assert word.lower() in comment.lower(), comment
    assert not node.index.has_instance(str(ds.SOPInstanceUID))
    assert not list((node.storage.root / "instances").rglob(f"{ds.SOPInstanceUID}.dcm"))


@pytest.mark.parametrize("case", agreed_cases(), ids=lambda c: c[0])
def test_stored_through_the_node_as_pydicom_reads_it(node: Node,
                                                     case: tuple[str, str, Dataset, bytes, dict[str, str]]) -> None:
    name, syntax, ds, payload, attributes = case
    assert raw_c_store(node.port, str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, payload) == (SUCCESS, "")
    files = list((node.storage.root / "instances").rglob(f"{ds.SOPInstanceUID}.dcm"))
    assert len(files) == 1
    back = InstanceMeta.from_dataset(pydicom.dcmread(BytesIO(files[0].read_bytes()), force=False))
    series = node.index.series(str(ds.SeriesInstanceUID))
    assert series is not None and series.modality == back.modality
    assert {k: back.attributes[k] for k in attributes} == attributes


PLAIN_VALUES = [b"AB", b"AB\x00", b"AB ", b"AB\x00 ", b"AB \x00", b"A B\\C\x00", b"A^B=C", b"AB\\CD ", b"", b" ",
                b"\x00", b"1.2\x00", b"1.2 ", b"1.2\\1.3\x00", b"12 ", b"+1 ", b"-0", b"007", b"1.5\x00", b"1e3",
                b"-.5", b"1.\\2 ", b"1.50", b"0.0000000000001", b"12345678901", b"1\xe9", b" A", b"A  B", b"A\\\\B"]


@pytest.mark.parametrize("vr", ["AE", "AS", "CS", "DA", "DT", "TM", "LO", "SH", "PN", "UC", "UI", "IS", "DS"])
def test_text_of_each_value_as_pydicom_converts_it(vr: str) -> None:
    """The reader's text of a value (its own plain fast path or pydicom's conversion) is pydicom's, per VR."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from node.header import _to_text, value_text

    for raw in PLAIN_VALUES:
        ds = Dataset()
        ds[0x00091010] = RawDataElement(Tag(0x00091010), vr, len(raw), raw, 0, False, True)
        try:
            theirs = value_text(ds[0x00091010].value)
        except Exception:
            continue  # pydicom refuses it: so does the reader (the same conversion raises)
        assert _to_text(0x00091010, vr, raw, None) == theirs, (vr, raw)
