"""The versioned code table (``codes.toml``) as typed highdicom objects.

The table is data: segment descriptions (label, SNOMED CT category and type, optional
laterality modifier and anatomic region, display colour, algorithm type) and SR concepts
(measurement names, finding sites, qualitative values), plus UCUM units and the private
coding scheme ``99PROGNODE``.  It is parsed once per process (:func:`table`, cached) and
every accessor raises :class:`KeyError` naming the unknown key.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept

PRIVATE_SCHEME = "99PROGNODE"
_ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")


@dataclass(frozen=True)
class SegmentCode:
    """One segment row of the table, ready for a SEG Segment Description (PS3.3 C.8.20.4)."""

    key: str
    label: str
    category: CodedConcept
    type: CodedConcept
    modifier: CodedConcept | None
    region: CodedConcept | None
    color: tuple[int, int, int]  # recommended display colour, sRGB 0-255
    algorithm_type: str  # AUTOMATIC | SEMIAUTOMATIC | MANUAL

    def display_color(self) -> hd.color.CIELabColor:
        return hd.color.CIELabColor.from_rgb(*self.color)


@dataclass(frozen=True)
class ExternalCode:
    """A standard code that pydicom's tables lack, with where it is published."""

    scheme: str
    value: str
    meaning: str
    source: str


@dataclass(frozen=True)
class PrivateCode:
    """A ``99PROGNODE`` code with the reason no standard code is used.

    ``differs_from`` names standard codes ("SCHEME:VALUE") whose meaning is close to this one's
    but whose concept is not this one.
    """

    value: str
    meaning: str
    reason: str
    differs_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    version: str
    segments: Mapping[str, SegmentCode]
    concepts: Mapping[str, CodedConcept]
    units: Mapping[str, CodedConcept]
    schemes: Mapping[str, Mapping[str, str]]
    sections: Mapping[str, Any] = field(default_factory=dict)  # other top-level tables, as parsed
    external: Mapping[tuple[str, str], ExternalCode] = field(default_factory=dict)  # (scheme, value) ->
    private: Mapping[str, PrivateCode] = field(default_factory=dict)  # 99PROGNODE code value ->

    def all_codes(self) -> list[tuple[str, CodedConcept]]:
        """Every code the table uses, each with where it is used (``segments.x.type``, ``concepts.y``, ...)."""
        out: list[tuple[str, CodedConcept]] = []
        for key, row in self.segments.items():
            for part in ("category", "type", "modifier", "region"):
                c = getattr(row, part)
                if c is not None:
                    out.append((f"segments.{key}.{part}", c))
        out += [(f"concepts.{key}", c) for key, c in self.concepts.items()]
        out += [(f"units.{key}", c) for key, c in self.units.items()]
        return out


def _coded(raw: Any, where: str) -> CodedConcept:
    if not (isinstance(raw, list) and len(raw) == 3 and all(isinstance(x, str) and x for x in raw)):
        raise ValueError(f"codes.toml {where}: expected [scheme, value, meaning], got {raw!r}")
    scheme, value, meaning = raw
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _segment(key: str, row: Mapping[str, Any]) -> SegmentCode:
    where = f"segments.{key}"
    unknown = set(row) - {"label", "category", "type", "modifier", "region", "color", "algorithm_type"}
    if unknown:
        raise ValueError(f"codes.toml {where}: unknown fields {sorted(unknown)}")
    color = row.get("color")
    if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
        raise ValueError(f"codes.toml {where}.color: expected [r, g, b] in 0..255, got {color!r}")
    algorithm_type = str(row.get("algorithm_type", "AUTOMATIC"))
    if algorithm_type not in _ALGORITHM_TYPES:
        raise ValueError(f"codes.toml {where}.algorithm_type: {algorithm_type!r} not in {_ALGORITHM_TYPES}")
    label = row.get("label")
    if not isinstance(label, str) or not label or len(label) > 64:
        raise ValueError(f"codes.toml {where}.label: 1-64 characters required")
    return SegmentCode(
        key=key,
        label=label,
        category=_coded(row.get("category"), f"{where}.category"),
        type=_coded(row.get("type"), f"{where}.type"),
        modifier=_coded(row["modifier"], f"{where}.modifier") if "modifier" in row else None,
        region=_coded(row["region"], f"{where}.region") if "region" in row else None,
        color=(color[0], color[1], color[2]),
        algorithm_type=algorithm_type,
    )


def parse(text: str) -> Table:
    """Parse the TOML text of a code table (validates every row)."""
    data = tomllib.loads(text)
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise ValueError("codes.toml: version missing")
    segments = {k: _segment(k, v) for k, v in data.get("segments", {}).items()}
    concepts = {k: _coded(v, f"concepts.{k}") for k, v in data.get("concepts", {}).items()}
    units = {
        code: CodedConcept(value=code, scheme_designator="UCUM", meaning=str(meaning))
        for code, meaning in data.get("units", {}).items()
    }
    schemes = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in data.get("schemes", {}).items()}
    external = _external(data.get("external", {}))
    private = _private(data.get("private", {}))
    known = {"version", "segments", "concepts", "units", "schemes", "external", "private"}
    sections = {k: v for k, v in data.items() if k not in known}
    table = Table(version=version, segments=segments, concepts=concepts, units=units, schemes=schemes,
                  sections=sections, external=external, private=private)
    _check_declared(table)
    return table


def _external(raw: Mapping[str, Any]) -> dict[tuple[str, str], ExternalCode]:
    out = {}
    for key, row in raw.items():
        scheme, _, value = key.partition(":")
        meaning, source = row.get("meaning"), row.get("source")
        if not (scheme and value and isinstance(meaning, str) and meaning and isinstance(source, str) and source):
            raise ValueError(f"codes.toml external.{key!r}: needs a SCHEME:VALUE key, a meaning and a source")
        out[(scheme, value)] = ExternalCode(scheme, value, meaning, source)
    return out


def _private(raw: Mapping[str, Any]) -> dict[str, PrivateCode]:
    out = {}
    for value, row in raw.items():
        meaning, reason = row.get("meaning"), row.get("reason")
        if not (isinstance(meaning, str) and meaning and isinstance(reason, str) and reason.strip()):
            raise ValueError(f"codes.toml private.{value}: needs a meaning and the reason no standard code is used")
        differs = row.get("differs_from", [])
        if not (isinstance(differs, list) and all(isinstance(d, str) and ":" in d for d in differs)):
            raise ValueError(f"codes.toml private.{value}.differs_from: a list of \"SCHEME:VALUE\" strings")
        out[value] = PrivateCode(value, meaning, reason, tuple(differs))
    return out


def _check_declared(table: Table) -> None:
    """Every private code used is declared in [private]; declared meanings match the rows'."""
    for where, c in table.all_codes():
        if c.scheme_designator == PRIVATE_SCHEME:
            declared = table.private.get(c.value)
            if declared is None:
                raise ValueError(f"codes.toml {where}: private code {c.value} is not declared in [private] with a reason")
            if declared.meaning != c.meaning:
                raise ValueError(f"codes.toml {where}: {c.value} means {c.meaning!r} here, {declared.meaning!r} in [private]")
        ext = table.external.get((c.scheme_designator, c.value))
        if ext is not None and ext.meaning != c.meaning:
            raise ValueError(f"codes.toml {where}: {c.scheme_designator} {c.value} means {c.meaning!r} here, "
                             f"{ext.meaning!r} in [external]")


@functools.cache
def table() -> Table:
    """The packaged code table, parsed once per process."""
    text = resources.files("dicom_templates").joinpath("codes.toml").read_text(encoding="utf-8")
    return parse(text)


def _lookup(kind: str, mapping: Mapping[str, Any], key: str) -> Any:
    try:
        return mapping[key]
    except KeyError:
        raise KeyError(f"unknown {kind} {key!r} in dicom_templates/codes.toml (version {table().version})") from None


def segment(key: str) -> SegmentCode:
    """The segment row ``key`` (e.g. ``"sat"``); KeyError naming it when unknown."""
    result: SegmentCode = _lookup("segment", table().segments, key)
    return result


def concept(key: str) -> CodedConcept:
    """The SR concept ``key`` (e.g. ``"area"``); KeyError naming it when unknown."""
    result: CodedConcept = _lookup("concept", table().concepts, key)
    return result


def unit(code: str) -> CodedConcept:
    """The UCUM unit ``code`` (e.g. ``"ml"``, ``"[hnsf'U]"``); KeyError naming it when unknown."""
    result: CodedConcept = _lookup("UCUM unit", table().units, code)
    return result


def finding(key: str) -> CodedConcept:
    """A finding type: an SR concept ``key``, else the property type of segment ``key``."""
    t = table()
    if key in t.concepts:
        return t.concepts[key]
    if key in t.segments:
        return t.segments[key].type
    raise KeyError(f"unknown finding {key!r}: neither a concept nor a segment in dicom_templates/codes.toml")


def section(name: str) -> Any:
    """Another top-level table of ``codes.toml`` (e.g. versioned cut-offs with citations), as parsed.

    Lets pipelines keep their coded reference data in the same versioned file; treat the
    result as read-only.  KeyError naming the section when it is missing.
    """
    return _lookup("section", table().sections, name)


def segment_keys() -> list[str]:
    return list(table().segments)


def concept_keys() -> list[str]:
    return list(table().concepts)


def coding_schemes(*concepts: CodedConcept) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for the private schemes that ``concepts`` use.

    Always declares ``99PROGNODE`` when it is used; standard designators (SCT, DCM,
    UCUM, LN, UMLS) need no declaration.
    """
    used = {c.scheme_designator for c in concepts}
    items = []
    for designator, info in table().schemes.items():
        if designator in used:
            items.append(
                CodingSchemeIdentificationItem(
                    designator=designator,
                    name=info.get("name"),
                    version=table().version,
                    responsible_organization=info.get("responsible_organization"),
                )
            )
    return items


TABLE_VERSION: str = table().version
