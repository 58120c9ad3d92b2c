"""Preprocessing that travels with a model: encoding, median imputation, standardisation, PCA fusion.

Order, fitted on the training cohort only:

1. numeric features are parsed as floats; categorical features are one-hot encoded against a
   reference level (the most frequent training level), one column ``name=level`` per other level;
2. missing values are imputed with the training median (numeric) or mode (categorical) at fit time;
   at prediction time only if the model says ``impute_at_prediction`` (otherwise "not evaluable");
3. every encoded column is standardised with the training mean and standard deviation (ddof=1,
   as pandas and lifelines use, so lifelines' own normalisation is the identity);
4. optional PCA fusion: the standardised columns of each named feature group are replaced by the
   principal-component scores that together explain ``variance`` of the group's variance, each score
   divided by its training standard deviation.

Everything is plain numbers and names, so it serialises to JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

Value = float | int | str | None


class DesignError(ValueError):
    """The features cannot be encoded; the message names the feature."""


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: str  # "numeric" or "categorical"
    median: float = math.nan  # numeric: training median (imputation value)
    levels: tuple[str, ...] = ()  # categorical: training levels, reference first
    mode: str = ""  # categorical: most frequent training level (imputation value)

    @property
    def columns(self) -> list[str]:
        if self.kind == "numeric":
            return [self.name]
        return [f"{self.name}={level}" for level in self.levels[1:]]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "numeric":
            return {"name": self.name, "type": "numeric", "median": self.median}
        return {"name": self.name, "type": "categorical", "levels": list(self.levels),
                "reference": self.levels[0], "mode": self.mode}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> FeatureSpec:
        if d["type"] == "numeric":
            return FeatureSpec(str(d["name"]), "numeric", median=float(d["median"]))
        if d["type"] == "categorical":
            levels = tuple(str(x) for x in d["levels"])
            if not levels or levels[0] != d["reference"]:
                raise DesignError(f"feature {d['name']!r}: reference must be the first level")
            return FeatureSpec(str(d["name"]), "categorical", levels=levels, mode=str(d["mode"]))
        raise DesignError(f"feature {d.get('name')!r}: unknown type {d.get('type')!r}")


@dataclass(frozen=True)
class PcaGroup:
    name: str
    features: tuple[str, ...]
    columns: tuple[str, ...]  # encoded input columns (standardised) of the group
    components: tuple[tuple[float, ...], ...]  # k x len(columns)
    score_scale: tuple[float, ...]  # training SD of each score
    explained_variance_ratio: tuple[float, ...]

    @property
    def output_columns(self) -> list[str]:
        return [f"{self.name}:PC{i + 1}" for i in range(len(self.components))]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "features": list(self.features), "columns": list(self.columns),
                "components": [list(c) for c in self.components], "score_scale": list(self.score_scale),
                "explained_variance_ratio": list(self.explained_variance_ratio)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PcaGroup:
        comps = tuple(tuple(float(x) for x in row) for row in d["components"])
        cols = tuple(str(c) for c in d["columns"])
        if any(len(row) != len(cols) for row in comps) or len(comps) != len(d["score_scale"]):
            raise DesignError(f"PCA group {d.get('name')!r}: component shapes do not match its columns")
        return PcaGroup(str(d["name"]), tuple(str(f) for f in d["features"]), cols, comps,
                        tuple(float(x) for x in d["score_scale"]),
                        tuple(float(x) for x in d["explained_variance_ratio"]))


@dataclass(frozen=True)
class Design:
    """Fitted preprocessing: raw feature values -> standardised model columns."""

    features: tuple[FeatureSpec, ...]
    encoded_columns: tuple[str, ...]
    means: tuple[float, ...]
    scales: tuple[float, ...]
    pca_groups: tuple[PcaGroup, ...] = ()
    impute_at_prediction: bool = False
    columns: tuple[str, ...] = field(default=())  # model columns after PCA

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict[str, Any]:
        return {"features": [f.to_dict() for f in self.features], "encoded_columns": list(self.encoded_columns),
                "means": list(self.means), "scales": list(self.scales),
                "pca_groups": [g.to_dict() for g in self.pca_groups],
                "impute_at_prediction": self.impute_at_prediction, "columns": list(self.columns)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Design:
        features = tuple(FeatureSpec.from_dict(f) for f in d["features"])
        encoded = tuple(str(c) for c in d["encoded_columns"])
        if encoded != tuple(c for f in features for c in f.columns):
            raise DesignError("encoded_columns do not match the features")
        means, scales = tuple(float(x) for x in d["means"]), tuple(float(x) for x in d["scales"])
        if len(means) != len(encoded) or len(scales) != len(encoded) or any(s <= 0 for s in scales):
            raise DesignError("means/scales do not match the encoded columns")
        groups = tuple(PcaGroup.from_dict(g) for g in d.get("pca_groups", []))
        design = Design(features, encoded, means, scales, groups, bool(d.get("impute_at_prediction", False)))
        cols = tuple(str(c) for c in d["columns"])
        if cols != tuple(design._model_columns()):
            raise DesignError("columns do not match the encoded columns and PCA groups")
        return Design(features, encoded, means, scales, groups, design.impute_at_prediction, cols)

    def _model_columns(self) -> list[str]:
        grouped = {c for g in self.pca_groups for c in g.columns}
        out = [c for c in self.encoded_columns if c not in grouped]
        for g in self.pca_groups:
            out.extend(g.output_columns)
        return out

    # Encoding ---------------------------------------------------------------------
    def encode_row(self, values: Mapping[str, Value], impute: bool) -> tuple[npt.NDArray[np.float64] | None, list[str]]:
        """One patient's raw values -> model column vector, or None and the reasons it is not evaluable."""
        reasons: list[str] = []
        encoded: list[float] = []
        for spec in self.features:
            raw = values.get(spec.name)
            if spec.kind == "numeric":
                x = _as_float(raw)
                if x is None:
                    if not impute:
                        reasons.append(f"{spec.name}: missing" if _is_missing(raw) else
                                       f"{spec.name}: not a number ({raw!r})")
                        continue
                    x = spec.median
                encoded.append(x)
            else:
                level = _as_level(raw)
                if level is None or level not in spec.levels:
                    if not impute:
                        reasons.append(f"{spec.name}: missing" if level is None else
                                       f"{spec.name}: level {level!r} not seen in training "
                                       f"(known: {', '.join(spec.levels)})")
                        continue
                    level = spec.mode
                encoded.extend(1.0 if level == lv else 0.0 for lv in spec.levels[1:])
        if reasons:
            return None, reasons
        return self._project(np.asarray(encoded, dtype=np.float64)[None, :])[0], []

    def transform(self, frame: pd.DataFrame, impute: bool | None = None) -> tuple[npt.NDArray[np.float64],
                                                                                 list[list[str]]]:
        """Rows -> model matrix; rows that are not evaluable are NaN with their reasons."""
        use_impute = self.impute_at_prediction if impute is None else impute
        missing = [f.name for f in self.features if f.name not in frame.columns]
        if missing:
            raise DesignError(f"feature columns missing from the table: {', '.join(missing)}")
        out = np.full((len(frame), len(self.columns)), np.nan)
        reasons: list[list[str]] = []
        records = frame[self.feature_names].to_dict(orient="records")
        for i, rec in enumerate(records):
            row, why = self.encode_row(rec, use_impute)
            if row is not None:
                out[i] = row
            reasons.append(why)
        return out, reasons

    def _project(self, encoded: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        z = (encoded - np.asarray(self.means)) / np.asarray(self.scales)
        if not self.pca_groups:
            return np.asarray(z, dtype=np.float64)
        index = {c: i for i, c in enumerate(self.encoded_columns)}
        grouped = {c for g in self.pca_groups for c in g.columns}
        parts = [z[:, [index[c] for c in self.encoded_columns if c not in grouped]]]
        for g in self.pca_groups:
            zg = z[:, [index[c] for c in g.columns]]
            parts.append((zg @ np.asarray(g.components).T) / np.asarray(g.score_scale))
        return np.concatenate(parts, axis=1)


def _is_missing(raw: Value) -> bool:
    if raw is None:
        return True
    if isinstance(raw, float) and math.isnan(raw):
        return True
    return isinstance(raw, str) and raw.strip() in ("", "NA", "NaN", "nan", "None")


def _as_float(raw: Value) -> float | None:
    if _is_missing(raw):
        return None
    try:
        x = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _as_level(raw: Value) -> str | None:
    if _is_missing(raw):
        return None
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    return str(raw).strip()


def fit_design(frame: pd.DataFrame, features: Sequence[str], categorical: Sequence[str] = (),
               groups: Mapping[str, Sequence[str]] | None = None, pca_variance: float = 0.9,
               impute_at_prediction: bool = False) -> Design:
    """Fit the preprocessing on the training rows of ``frame``."""
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise DesignError(f"feature columns not in the table: {', '.join(missing)}")
    specs: list[FeatureSpec] = []
    for name in features:
        col = frame[name]
        numeric = pd.api.types.is_numeric_dtype(col) and name not in categorical
        if numeric:
            values = pd.to_numeric(col, errors="coerce")
            if values.notna().sum() == 0:
                raise DesignError(f"feature {name!r}: no values")
            specs.append(FeatureSpec(name, "numeric", median=float(values.median())))
        else:
            levels = [lv for lv in (_as_level(v) for v in col.tolist()) if lv is not None]
            if not levels:
                raise DesignError(f"feature {name!r}: no values")
            counts = pd.Series(levels).value_counts()
            ordered = sorted(counts.index, key=lambda lv: (-int(counts[lv]), str(lv)))
            if len(ordered) < 2:
                raise DesignError(f"feature {name!r}: a single level ({ordered[0]!r}) carries no information")
            specs.append(FeatureSpec(name, "categorical", levels=(ordered[0], *sorted(ordered[1:])),
                                     mode=ordered[0]))
    encoded_cols = [c for s in specs for c in s.columns]
    stub = Design(tuple(specs), tuple(encoded_cols), (0.0,) * len(encoded_cols), (1.0,) * len(encoded_cols))
    raw = np.asarray([_encode_imputed(stub, rec) for rec in frame[list(features)].to_dict(orient="records")])
    means = raw.mean(axis=0)
    scales = raw.std(axis=0, ddof=1)
    const = [c for c, s in zip(encoded_cols, scales, strict=True) if not s > 0]
    if const:
        raise DesignError(f"constant columns in the training data: {', '.join(const)}")
    z = (raw - means) / scales
    pca: list[PcaGroup] = []
    for gname, gfeatures in (groups or {}).items():
        unknown = [f for f in gfeatures if f not in features]
        if unknown:
            raise DesignError(f"PCA group {gname!r}: features not in the model: {', '.join(unknown)}")
        gcols = [c for s in specs if s.name in gfeatures for c in s.columns]
        idx = [encoded_cols.index(c) for c in gcols]
        pca.append(_fit_pca(gname, tuple(gfeatures), tuple(gcols), z[:, idx], pca_variance))
    grouped = [c for g in pca for c in g.columns]
    if len(grouped) != len(set(grouped)):
        raise DesignError("a feature belongs to more than one PCA group")
    design = Design(tuple(specs), tuple(encoded_cols), tuple(float(m) for m in means),
                    tuple(float(s) for s in scales), tuple(pca), impute_at_prediction)
    return Design(design.features, design.encoded_columns, design.means, design.scales, design.pca_groups,
                  impute_at_prediction, tuple(design._model_columns()))


def _encode_imputed(stub: Design, rec: Mapping[str, Value]) -> list[float]:
    out: list[float] = []
    for spec in stub.features:
        raw = rec.get(spec.name)
        if spec.kind == "numeric":
            x = _as_float(raw)
            out.append(spec.median if x is None else x)
        else:
            level = _as_level(raw)
            level = spec.mode if level is None or level not in spec.levels else level
            out.extend(1.0 if level == lv else 0.0 for lv in spec.levels[1:])
    return out


def _fit_pca(name: str, features: tuple[str, ...], columns: tuple[str, ...], z: npt.NDArray[np.float64],
             variance: float) -> PcaGroup:
    if not 0 < variance <= 1:
        raise DesignError(f"PCA variance {variance}: expected a fraction in (0, 1]")
    centred = z - z.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    ratio = s**2 / float(np.sum(s**2))
    k = int(np.searchsorted(np.cumsum(ratio), variance - 1e-12) + 1)
    k = min(k, len(ratio))
    comps = vt[:k]
    # a deterministic sign: the largest loading of each component is positive
    signs = np.sign(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)])
    comps = comps * signs[:, None]
    scores = z @ comps.T
    scale = scores.std(axis=0, ddof=1)
    return PcaGroup(name, features, columns, tuple(tuple(float(x) for x in c) for c in comps),
                    tuple(float(x) for x in scale), tuple(float(x) for x in ratio[:k]))
