"""The versioned code table: every row builds a valid highdicom object, every code is verified, lookups fail loudly.

Every code of ``codes.toml`` (segments' category/type/modifier/region, SR concepts, units) is
checked against pydicom's tables (``pydicom.sr._concepts_dict``, generated from PS3.16): a code
pydicom holds must carry one of pydicom's meanings; a code it lacks must be in ``[external]`` with
its source; a private ``99PROGNODE`` code must be in ``[private]`` with its reason and must not
stand in for a concept pydicom holds.
"""

from __future__ import annotations

import difflib
import functools
import re

import highdicom as hd
import pytest
from pydicom.sr._concepts_dict import concepts as pydicom_concepts
from pydicom.sr.codedict import codes as dcm_codes

from dicom_templates import codes
from dicom_templates.common import Algorithm
from dicom_templates.seg import segment_description

REQUIRED_SEGMENTS = [
    "body", "adipose-tissue", "soft-tissue", "skeletal-muscle", "iliopsoas-left", "iliopsoas-right",
    "autochthon-left", "autochthon-right", "sternocleidomastoid-left", "sternocleidomastoid-right",
    "paravertebral-left", "paravertebral-right", "paravertebral",
    "erector-spinae-left", "erector-spinae-right", "sat", "vat", "imat", "vertebral-body-l3",
    "vertebral-body-c3", "tumour", "peritumoral-ring-3mm", "peritumoral-ring-6mm", "peritumoral-ring-9mm", "liver",
]
REQUIRED_CONCEPTS = [
    "area", "volume", "attenuation", "mean", "smi", "sarcopenia", "present", "absent", "risk-score", "risk-group",
    "horizon-probability", "l3-vertebra", "c3-vertebra", "evaluability", "not-evaluable", "not-evaluable-reason",
    "value-unknown", "level-source", "level-automatic", "level-reader-confirmed", "level-anchor-vote",
    "level-confidence", "level-confirmed-at", "reader",
]
ALGORITHM = Algorithm("codes-test", "1.0")


def test_version_is_calendar_versioned() -> None:
    assert re.fullmatch(r"\d{4}\.\d{1,2}\.\d+", codes.TABLE_VERSION)
    assert codes.table() is codes.table()  # parsed once


@pytest.mark.parametrize("key", codes.segment_keys())
def test_every_segment_row_builds_a_segment_description(key: str) -> None:
    row = codes.segment(key)
    desc = segment_description(key, 1, ALGORITHM)
    assert desc.SegmentLabel == row.label
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == row.category.value
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == row.type.value
    assert len(desc.RecommendedDisplayCIELabValue) == 3
    if row.modifier is not None:
        mod = desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        assert (mod.CodingSchemeDesignator, mod.CodeValue) == (row.modifier.scheme_designator, row.modifier.value)
    if row.region is not None:
        assert desc.AnatomicRegionSequence[0].CodeValue == row.region.value


@pytest.mark.parametrize("key", codes.concept_keys())
def test_every_concept_builds_sr_content(key: str) -> None:
    concept = codes.concept(key)
    assert 0 < len(concept.meaning) <= 64
    item = hd.sr.CodeContentItem(name=codes.concept("finding"), value=concept,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    assert item.ConceptCodeSequence[0].CodeValue == concept.value


@pytest.mark.parametrize("code", list(codes.table().units))
def test_every_unit_builds_a_measurement(code: str) -> None:
    m = hd.sr.Measurement(name=codes.concept("area"), value=1.0, unit=codes.unit(code))
    assert m[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"


def test_required_rows_present() -> None:
    assert not set(REQUIRED_SEGMENTS) - set(codes.segment_keys())
    assert not set(REQUIRED_CONCEPTS) - set(codes.concept_keys())
    assert codes.segment("sat").label == "Subcutaneous adipose tissue"
    assert codes.segment("iliopsoas-left").modifier == dcm_codes.SCT.Left
    assert codes.segment("iliopsoas-left").type.value == "68455001"  # TotalSegmentator's iliopsoas code


# ------------------------------------------------------------------------------------------
# Every code, checked against pydicom's tables


def _norm(meaning: str) -> str:
    """Meaning without case and without the "(body structure)" / "structure of" wording."""
    m = meaning.lower().replace("(body structure)", " ")
    m = re.sub(r"\s+", " ", m).strip()
    m = re.sub(r"^structure of ", "", m)
    m = re.sub(r" structure$", "", m)
    return m.strip()


@functools.cache
def _pydicom_meanings() -> dict[tuple[str, str], set[str]]:
    """(scheme, code value) -> every meaning pydicom's tables give it."""
    out: dict[tuple[str, str], set[str]] = {}
    for scheme, keywords in pydicom_concepts.items():
        for by_code in keywords.values():
            for value, (meaning, _cids) in by_code.items():
                out.setdefault((scheme, value), set()).add(meaning)
    return out


@functools.cache
def _pydicom_by_meaning() -> dict[str, set[str]]:
    """normalised meaning -> {"SCHEME:VALUE", ...} over pydicom's tables."""
    out: dict[str, set[str]] = {}
    for (scheme, value), meanings in _pydicom_meanings().items():
        for m in meanings:
            out.setdefault(_norm(m), set()).add(f"{scheme}:{value}")
    return out


ALL_CODES = codes.table().all_codes()


@pytest.mark.parametrize(("where", "code"), ALL_CODES, ids=[w for w, _ in ALL_CODES])
def test_every_code_is_verified(where: str, code: hd.sr.CodedConcept) -> None:
    t = codes.table()
    scheme, value, meaning = code.scheme_designator, code.value, code.meaning
    if scheme == codes.PRIVATE_SCHEME:
        declared = t.private.get(value)
        assert declared is not None and declared.meaning == meaning and declared.reason.strip(), (
            f"{where}: private {value} must be declared in [private] with a reason")
        return
    known = _pydicom_meanings().get((scheme, value))
    if known is not None:
        if scheme == "UCUM":  # the UCUM code is the unit; pydicom's display texts vary ("Centimeter**2")
            return
        assert _norm(meaning) in {_norm(m) for m in known}, (
            f"{where}: {scheme} {value} {meaning!r} is not pydicom's meaning for that code: {sorted(known)}")
        return
    ext = t.external.get((scheme, value))
    assert ext is not None, (
        f"{where}: {scheme} {value} {meaning!r} is not in pydicom's tables: list it in [external] with its source")
    assert ext.meaning == meaning and ext.source.strip()


@pytest.mark.parametrize("key", list(codes.table().external), ids=lambda k: ":".join(k))
def test_external_codes_are_used_and_really_missing_from_pydicom(key: tuple[str, str]) -> None:
    t = codes.table()
    assert key not in _pydicom_meanings(), f"{key} is in pydicom's tables: use pydicom's meaning, drop it from [external]"
    assert any((c.scheme_designator, c.value) == key for _, c in t.all_codes()), f"{key} is declared but not used"


@pytest.mark.parametrize("value", list(codes.table().private))
def test_private_codes_do_not_stand_in_for_standard_ones(value: str) -> None:
    t = codes.table()
    row = t.private[value]
    assert any(c.scheme_designator == codes.PRIVATE_SCHEME and c.value == value for _, c in t.all_codes()), (
        f"private {value} is declared but not used")
    by_meaning = _pydicom_by_meaning()
    same = by_meaning.get(_norm(row.meaning))
    assert not same, f"private {value} {row.meaning!r} stands in for {sorted(same)} in pydicom's tables: use that code"
    close = difflib.get_close_matches(_norm(row.meaning), list(by_meaning), n=5, cutoff=0.8)
    near = {c for m in close for c in by_meaning[m]}
    unexplained = near - set(row.differs_from)
    assert not unexplained, (
        f"private {value} {row.meaning!r} is close to {sorted(unexplained)} ({close}): use that code, or say in "
        "differs_from why it is another concept")


def test_psoas_is_not_the_intercostal_lymph_node_code() -> None:
    used = {c.value for _, c in codes.table().all_codes()}
    assert "64038003" not in used  # pydicom: SCT 64038003 is "intercostal lymph node"


@pytest.mark.parametrize("key", codes.segment_keys())
def test_laterality_is_a_modifier(key: str) -> None:
    row = codes.segment(key)
    words = set(re.findall(r"[a-z]+", row.label.lower()))
    for part in (row.type, row.region, row.category):
        if part is not None:
            assert not {"left", "right"} & set(re.findall(r"[a-z]+", part.meaning.lower())), (
                f"{key}: laterality belongs in the modifier, not in {part.meaning!r}")
    if "left" in words:
        assert row.modifier == dcm_codes.SCT.Left
    elif "right" in words:
        assert row.modifier == dcm_codes.SCT.Right
    elif row.modifier is not None:
        assert row.modifier not in (dcm_codes.SCT.Left, dcm_codes.SCT.Right), f"{key}: side in modifier, not in label"


def test_one_meaning_per_code() -> None:
    seen: dict[tuple[str, str], str] = {}
    t = codes.table()
    all_codes = list(t.concepts.values())
    for row in t.segments.values():
        all_codes += [c for c in (row.category, row.type, row.modifier, row.region) if c is not None]
    for c in all_codes:
        key = (c.scheme_designator, c.value)
        assert seen.setdefault(key, c.meaning) == c.meaning, f"{key} has two meanings"
    designators = {c.scheme_designator for c in all_codes}
    assert designators <= {"SCT", "DCM", "UCUM", "LN", "UMLS", "NCIt", codes.PRIVATE_SCHEME}


def test_unknown_keys_raise_keyerror_naming_them() -> None:
    with pytest.raises(KeyError, match="no-such-segment"):
        codes.segment("no-such-segment")
    with pytest.raises(KeyError, match="no-such-concept"):
        codes.concept("no-such-concept")
    with pytest.raises(KeyError, match="furlong"):
        codes.unit("furlong")
    with pytest.raises(KeyError, match="family-nope"):
        Algorithm("x", "1", family="family-nope")


def test_private_scheme_is_declared() -> None:
    items = codes.coding_schemes(codes.concept("smi"), codes.concept("area"))
    assert [i.CodingSchemeDesignator for i in items] == [codes.PRIVATE_SCHEME]
    assert items[0].CodingSchemeVersion == codes.TABLE_VERSION
    assert codes.coding_schemes(codes.concept("area")) == []


def test_bad_table_rows_are_refused() -> None:
    good = 'version = "1"\n[segments.x]\nlabel = "X"\ncategory = ["SCT", "1", "a"]\ntype = ["SCT", "2", "b"]\n'
    assert codes.parse(good + "color = [1, 2, 3]\n").segments["x"].color == (1, 2, 3)
    with pytest.raises(ValueError, match="segments.x.color"):
        codes.parse(good + "color = [1, 2, 300]\n")
    with pytest.raises(ValueError, match="unknown fields"):
        codes.parse(good + "color = [1, 2, 3]\nshade = 1\n")
    with pytest.raises(ValueError, match="concepts.y"):
        codes.parse('version = "1"\n[concepts]\ny = ["SCT", "1"]\n')


def test_other_sections_are_kept_for_pipelines() -> None:
    t = codes.parse('version = "1"\n[cutoffs.prado-2008]\ncitation = "Prado 2008"\nmen = 52.4\n')
    assert t.sections["cutoffs"]["prado-2008"]["men"] == 52.4
    with pytest.raises(KeyError, match="no-such-section"):
        codes.section("no-such-section")
