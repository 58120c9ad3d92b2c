"""Patient factors, skeletal muscle index, published sarcopenia cut-offs and the C3 -> L3 conversion.

The numbers live in ``cutoffs.toml`` (versioned, one citation per row); this module only
reads them and applies them.  Every value that needs a header field the series lacks is
returned as :class:`Unavailable` with the reason, never guessed.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

TABLE_PATH = Path(__file__).with_name("cutoffs.toml")


@dataclass(frozen=True)
class Unavailable:
    """A value that cannot be given; ``reason`` says why (goes into the SR as 'not evaluable')."""

    reason: str


@dataclass(frozen=True)
class PatientFactors:
    height_m: float | None
    weight_kg: float | None
    sex: str | None  # "M" or "F"
    age_years: float | None

    @property
    def bmi(self) -> float | None:
        if self.height_m and self.weight_kg:
            return self.weight_kg / (self.height_m**2)
        return None


def _positive(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f > 0 else None


def _age(value: object) -> float | None:
    """DICOM AS (``065Y``, ``030M``, ``012W``, ``100D``) -> years."""
    m = re.fullmatch(r"(\d{3})([DWMY])", str(value or "").strip())
    if not m:
        return None
    n = float(m.group(1))
    return {"Y": n, "M": n / 12.0, "W": n / 52.1775, "D": n / 365.25}[m.group(2)]


def patient_factors(ds: Dataset) -> PatientFactors:
    """Height (PatientSize, m), weight (kg), sex and age from the image header; absent -> None."""
    height = _positive(ds.get("PatientSize"))
    if height is not None and height > 3.0:  # a centimetre value in a metre field is not trusted
        height = None
    sex = str(ds.get("PatientSex", "") or "").upper()
    return PatientFactors(
        height_m=height,
        weight_kg=_positive(ds.get("PatientWeight")),
        sex=sex if sex in ("M", "F") else None,
        age_years=_age(ds.get("PatientAge")),
    )


@dataclass(frozen=True)
class CutoffRule:
    sex: str
    threshold: float
    bmi_below: float | None = None
    bmi_at_least: float | None = None


@dataclass(frozen=True)
class Cutoff:
    id: str
    level: str
    metric: str
    unit: str
    citation: str
    rules: tuple[CutoffRule, ...]


@dataclass(frozen=True)
class Conversion:
    id: str
    from_level: str
    to_level: str
    citation: str
    intercept: float
    c3: float
    age: float
    weight: float
    sex: float
    sex_codes: Mapping[str, int]


@dataclass(frozen=True)
class ReferenceTable:
    version: str
    cutoffs: Mapping[str, Cutoff]
    conversions: Mapping[str, Conversion]


def load_table(path: Path = TABLE_PATH) -> ReferenceTable:
    data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    cutoffs = {
        c["id"]: Cutoff(
            id=c["id"], level=c["level"], metric=c["metric"], unit=c["unit"], citation=c["citation"],
            rules=tuple(CutoffRule(**r) for r in c["rules"]),
        )
        for c in data.get("cutoff", [])
    }
    conversions = {c["id"]: Conversion(**c) for c in data.get("conversion", [])}
    return ReferenceTable(version=str(data["version"]), cutoffs=cutoffs, conversions=conversions)


def smi(muscle_area_cm2: float, factors: PatientFactors) -> float | Unavailable:
    """Skeletal muscle index = area / height^2 (cm2/m2)."""
    if factors.height_m is None:
        return Unavailable("patient height (PatientSize) missing from the header")
    return muscle_area_cm2 / factors.height_m**2


def c3_to_l3(csa_c3_cm2: float, factors: PatientFactors, conv: Conversion) -> float | Unavailable:
    """Swartz 2016: estimated L3 muscle area from the C3 area, age, weight and sex."""
    missing = [name for name, v in (("age (PatientAge)", factors.age_years), ("weight (PatientWeight)",
               factors.weight_kg), ("sex (PatientSex)", factors.sex)) if v is None]
    if missing:
        return Unavailable(f"{conv.id} conversion needs {', '.join(missing)}, missing from the header")
    assert factors.age_years is not None and factors.weight_kg is not None and factors.sex is not None
    return (conv.intercept + conv.c3 * csa_c3_cm2 + conv.age * factors.age_years
            + conv.weight * factors.weight_kg + conv.sex * conv.sex_codes[factors.sex])


@dataclass(frozen=True)
class Classification:
    sarcopenic: bool
    threshold: float
    cutoff_id: str
    citation: str


def classify(smi_value: float, factors: PatientFactors, cutoff: Cutoff) -> Classification | Unavailable:
    """Sarcopenia by ``cutoff``: SMI below the sex- (and, where published, BMI-) specific threshold."""
    if factors.sex is None:
        return Unavailable(f"{cutoff.id} cut-off needs the patient's sex (PatientSex), missing from the header")
    for rule in cutoff.rules:
        if rule.sex != factors.sex:
            continue
        if rule.bmi_below is not None or rule.bmi_at_least is not None:
            bmi = factors.bmi
            if bmi is None:
                return Unavailable(f"{cutoff.id} cut-off needs BMI: weight (PatientWeight) or height missing")
            if rule.bmi_below is not None and not bmi < rule.bmi_below:
                continue
            if rule.bmi_at_least is not None and not bmi >= rule.bmi_at_least:
                continue
        return Classification(smi_value < rule.threshold, rule.threshold, cutoff.id, cutoff.citation)
    return Unavailable(f"{cutoff.id} has no rule for sex {factors.sex}")
