"""Pluggable feature sources for the risk pipeline.

A source turns what a job has (the CT headers, other objects of the study) into named values.
The pipeline's ``features`` option maps each model feature to ``"<source>:<key>"``:

- ``header``: from the CT header: ``age`` (years; PatientAge, else birth date and study date),
  ``sex`` (PatientSex: M/F/O), ``height_m`` (PatientSize), ``weight_kg`` (PatientWeight), ``bmi``;
- ``sr``: from TID 1500 SRs among the study's other objects (e.g. prognode's body-composition SR):
  every NUM by its concept meaning in lower case (``skeletal muscle index``) and every CODE
  (``sarcopenia`` -> ``present``);
- ``const``: a fixed value written in the option (``const:Male``), for tests and site defaults;
- ``cohort``: a column of ``prognode cohort features`` (``cohort:intra_firstorder_Mean``), computed
  on the study by the cohort's own family code with the options the model recorded at fit time
  (:mod:`pipelines.survival.cohort_source`; the pipeline fills these, ``gather`` takes them in).

Adding a source is writing a class with ``name`` and ``collect``.  Value maps (option ``values``)
translate source values into the model's levels, e.g. ``{"Sex": {"M": "Male", "F": "Female"}}``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset

from pipelines.survival.design import Value

log = logging.getLogger(__name__)
SR_MODALITY = "SR"


class FeatureSource(Protocol):
    name: str

    def collect(self, header: Dataset, extra_files: Sequence[Path]) -> dict[str, Value]: ...


def _age_years(header: Dataset) -> float | None:
    raw = str(header.get("PatientAge", "") or "").strip().upper()
    if len(raw) == 4 and raw[:3].isdigit() and raw[3] in "DWMY":
        n = int(raw[:3])
        return {"D": n / 365.25, "W": n * 7 / 365.25, "M": n / 12, "Y": float(n)}[raw[3]]
    birth = str(header.get("PatientBirthDate", "") or "")
    study = str(header.get("StudyDate", "") or header.get("SeriesDate", "") or "")
    try:
        b = dt.datetime.strptime(birth, "%Y%m%d").date()
        s = dt.datetime.strptime(study, "%Y%m%d").date()
    except ValueError:
        return None
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return float(years) if years >= 0 else None


class HeaderSource:
    name = "header"

    def collect(self, header: Dataset, extra_files: Sequence[Path]) -> dict[str, Value]:
        out: dict[str, Value] = {"age": _age_years(header)}
        sex = str(header.get("PatientSex", "") or "").strip().upper()
        out["sex"] = sex if sex in ("M", "F", "O") else None
        height = header.get("PatientSize")
        weight = header.get("PatientWeight")
        out["height_m"] = float(height) if height not in (None, "") and float(height) > 0 else None
        out["weight_kg"] = float(weight) if weight not in (None, "") and float(weight) > 0 else None
        h, w = out["height_m"], out["weight_kg"]
        out["bmi"] = w / (h * h) if isinstance(h, float) and isinstance(w, float) else None
        return out


class SRSource:
    """NUM and CODE items of TID 1500 SRs of the same patient among ``extra_files``."""

    name = "sr"

    def collect(self, header: Dataset, extra_files: Sequence[Path]) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for path in extra_files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as e:  # noqa: BLE001 - not DICOM: not ours to read
                log.debug("skipping %s: %s", path, e)
                continue
            if ds.get("Modality") != SR_MODALITY or "ContentSequence" not in ds:
                continue
            if ds.get("PatientID") != header.get("PatientID"):
                log.warning("skipping SR %s: another patient", path.name)
                continue
            self._walk(ds.ContentSequence, out)
        return out

    def _walk(self, items: Sequence[Dataset], out: dict[str, Value]) -> None:
        for it in items:
            name = str(it.ConceptNameCodeSequence[0].CodeMeaning).lower() if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "NUM" and "MeasuredValueSequence" in it and name:
                out.setdefault(name, float(it.MeasuredValueSequence[0].NumericValue))
            elif it.ValueType == "CODE" and name:
                out.setdefault(name, str(it.ConceptCodeSequence[0].CodeMeaning).lower())
            if "ContentSequence" in it:
                self._walk(it.ContentSequence, out)


class ConstSource:
    name = "const"

    def collect(self, header: Dataset, extra_files: Sequence[Path]) -> dict[str, Value]:
        return {}


SOURCES: dict[str, type[HeaderSource] | type[SRSource] | type[ConstSource]] = {
    "header": HeaderSource, "sr": SRSource, "const": ConstSource}
COHORT = "cohort"  # computed by the pipeline (pipelines.survival.cohort_source), not a FeatureSource


def parse_mapping(features: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{"Age": "header:age"}`` -> ``{"Age": ("header", "age")}``; unknown sources raise ValueError."""
    out = {}
    for feature, spec in features.items():
        source, sep, key = str(spec).partition(":")
        if not sep or source not in (*SOURCES, COHORT) or not key:
            raise ValueError(f"pipelines.survival-risk.features.{feature}: expected '<source>:<key>' with source in "
                             f"{', '.join((*SOURCES, COHORT))}, got {spec!r}")
        out[str(feature)] = (source, key if source in ("const", COHORT) else key.lower())
    return out


def gather(mapping: Mapping[str, tuple[str, str]], values: Mapping[str, Mapping[str, str]], header: Dataset,
           extra_files: Sequence[Path], cohort: Mapping[str, Value] | None = None) -> dict[str, Value]:
    """The model's raw feature values; a value the sources lack is None (the scorer says why).

    ``cohort``: the values of the ``cohort`` source, computed by the pipeline.
    """
    needed = {src for src, _ in mapping.values()}
    collected = {name: SOURCES[name]().collect(header, extra_files) for name in needed
                 if name not in ("const", COHORT)}
    collected[COHORT] = dict(cohort or {})
    out: dict[str, Value] = {}
    for feature, (source, key) in mapping.items():
        value: Value = key if source == "const" else collected[source].get(key)
        vmap = values.get(feature)
        if vmap is not None and value is not None:
            value = vmap.get(str(value), value)
        out[feature] = value
    return out
