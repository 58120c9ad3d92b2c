"""The versioned code table: every row builds a valid highdicom object; lookups fail loudly."""

from __future__ import annotations

import re

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes as dcm_codes

from dicom_templates import codes
from dicom_templates.common import Algorithm
from dicom_templates.seg import segment_description

REQUIRED_SEGMENTS = [
    "body", "adipose-tissue", "soft-tissue", "skeletal-muscle", "psoas-left", "psoas-right",
    "erector-spinae-left", "erector-spinae-right", "sat", "vat", "imat", "vertebral-body-l3",
    "vertebral-body-c3", "tumour", "peritumoral-ring-3mm", "peritumoral-ring-6mm", "peritumoral-ring-9mm", "liver",
]
REQUIRED_CONCEPTS = [
    "area", "volume", "attenuation", "mean", "smi", "sarcopenia", "present", "absent", "risk-score", "risk-group",
    "horizon-probability", "l3-vertebra", "c3-vertebra", "evaluability", "not-evaluable", "not-evaluable-reason",
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
    assert codes.segment("psoas-left").modifier == dcm_codes.SCT.Left


def test_standard_codes_agree_with_pydicom_where_pydicom_knows_them() -> None:
    assert codes.concept("area") == dcm_codes.SCT.Area
    assert codes.concept("volume") == dcm_codes.SCT.Volume
    assert codes.concept("attenuation") == dcm_codes.DCM.AttenuationCoefficient
    assert codes.concept("l3-vertebra") == dcm_codes.SCT.L3Vertebra
    assert codes.concept("c3-vertebra") == dcm_codes.SCT.C3Vertebra
    assert codes.segment("tumour").type == dcm_codes.SCT.Neoplasm
    assert codes.segment("liver").type == dcm_codes.SCT.Liver
    assert codes.segment("erector-spinae-left").type == dcm_codes.SCT.ErectorSpinaeMuscle


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
    assert designators <= {"SCT", "DCM", "UCUM", "LN", "UMLS", codes.PRIVATE_SCHEME}


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
