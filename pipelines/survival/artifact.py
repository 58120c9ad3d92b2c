"""Model artifacts: a folder with ``model.json`` (plain JSON, schema-checked) and ``MODEL_CARD.md``.

Loading parses JSON only; it never unpickles or imports anything named in the file.  A folder
holding a pickle or joblib file instead of ``model.json`` is refused, and so is a ``model.json``
whose ``schema`` or ``schema_version`` is not one this code knows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.survival.design import Design, DesignError

SCHEMA = "prognode.survival-model"
SCHEMA_VERSION = 1
KINDS = ("cox", "lasso-cox", "logistic", "binary")
MODEL_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"
_UNSAFE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".npy", ".npz")
INTENDED_USE = ("Research use only. Not a medical device; not for clinical decisions about individual "
                "patients. Scores are valid only for patients like the training cohort.")


class ArtifactError(ValueError):
    """A model folder cannot be loaded; the message names the file and the field."""


@dataclass(frozen=True)
class RiskGroups:
    method: str  # "median", "tertiles", "quartiles" or "custom"
    cutoffs: tuple[float, ...]  # ascending; group i holds scores in (cutoffs[i-1], cutoffs[i]]
    labels: tuple[str, ...]  # len(cutoffs) + 1, lowest risk first

    def group(self, score: float) -> str:
        for cut, label in zip(self.cutoffs, self.labels, strict=False):
            if score <= cut:
                return label
        return self.labels[-1]

    def index(self, score: float) -> int:
        return self.labels.index(self.group(score))


@dataclass(frozen=True)
class SurvivalModel:
    """A fitted model: everything needed to score a patient, and what it was trained on."""

    name: str
    version: str
    kind: str
    design: Design
    coefficients: tuple[float, ...]  # aligned with design.columns
    risk_groups: RiskGroups
    horizon_days: float | None = None
    intercept: float = 0.0  # logistic and binary only
    lp_center: float = 0.0  # Cox: linear predictor of the baseline (lifelines' mean covariates)
    baseline_survival: Mapping[float, float] = field(default_factory=dict)  # Cox: S0(t) at stored horizons
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    hazard_ratios: tuple[Mapping[str, Any], ...] = ()  # per-SD HRs (Cox) or ORs (logistic) with 95% CIs
    fit_details: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    software_version: str = ""

    @property
    def feature_names(self) -> list[str]:
        return self.design.feature_names

    @property
    def has_horizon_probability(self) -> bool:
        if self.horizon_days is None:
            return False
        return self.kind == "logistic" or self.horizon_days in self.baseline_survival

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "name": self.name, "version": self.version, "kind": self.kind,
            "created": self.created, "software_version": self.software_version,
            "intended_use": INTENDED_USE,
            "preprocessing": self.design.to_dict(),
            "coefficients": dict(zip(self.design.columns, self.coefficients, strict=True)),
            "intercept": self.intercept, "lp_center": self.lp_center,
            "horizon_days": self.horizon_days,
            "baseline_survival": [{"time_days": t, "survival": s} for t, s in sorted(self.baseline_survival.items())],
            "risk_groups": {"method": self.risk_groups.method, "cutoffs": list(self.risk_groups.cutoffs),
                            "labels": list(self.risk_groups.labels)},
            "training": _json_safe(dict(self.training)), "metrics": _json_safe(dict(self.metrics)),
            "hazard_ratios": _json_safe([dict(h) for h in self.hazard_ratios]),
            "fit_details": _json_safe(dict(self.fit_details)),
        }


def _json_safe(value: Any) -> Any:
    """Non-finite numbers in descriptive fields (e.g. an infinite CI bound) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _need(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    if key not in d:
        raise ArtifactError(f"{MODEL_FILE}: missing field {where}{key}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ArtifactError(f"{MODEL_FILE}: field {where}{key} has the wrong type ({type(value).__name__})")
    return value


def _finite(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(float(x)):
        raise ArtifactError(f"{MODEL_FILE}: {what} must be a finite number, got {x!r}")
    return float(x)


def model_from_dict(d: Mapping[str, Any]) -> SurvivalModel:
    """Validate the schema and build the model; raises :class:`ArtifactError` naming the field."""
    if not isinstance(d, Mapping):
        raise ArtifactError(f"{MODEL_FILE}: expected a JSON object")
    if d.get("schema") != SCHEMA:
        raise ArtifactError(f"{MODEL_FILE}: schema {d.get('schema')!r} is not {SCHEMA!r}")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{MODEL_FILE}: schema_version {version!r} is not supported "
                            f"(this prognode reads version {SCHEMA_VERSION})")
    kind = _need(d, "kind", str)
    if kind not in KINDS:
        raise ArtifactError(f"{MODEL_FILE}: kind {kind!r} is not one of {', '.join(KINDS)}")
    try:
        design = Design.from_dict(_need(d, "preprocessing", dict))
    except (DesignError, KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{MODEL_FILE}: preprocessing: {e}") from None
    coefs = _need(d, "coefficients", dict)
    if list(coefs) != list(design.columns):
        raise ArtifactError(f"{MODEL_FILE}: coefficients must name exactly the model columns {list(design.columns)}")
    coefficients = tuple(_finite(coefs[c], f"coefficient {c!r}") for c in design.columns)
    horizon = d.get("horizon_days")
    horizon_days = None if horizon is None else _finite(horizon, "horizon_days")
    baseline = {}
    for item in _need(d, "baseline_survival", list):
        t = _finite(item.get("time_days"), "baseline_survival.time_days")
        s = _finite(item.get("survival"), "baseline_survival.survival")
        if not 0 <= s <= 1:
            raise ArtifactError(f"{MODEL_FILE}: baseline survival {s} outside [0, 1]")
        baseline[t] = s
    rg = _need(d, "risk_groups", dict)
    cutoffs = tuple(_finite(c, "risk_groups.cutoffs") for c in _need(rg, "cutoffs", list, "risk_groups."))
    labels = tuple(str(x) for x in _need(rg, "labels", list, "risk_groups."))
    if len(labels) != len(cutoffs) + 1 or list(cutoffs) != sorted(cutoffs):
        raise ArtifactError(f"{MODEL_FILE}: risk_groups needs ascending cutoffs and one more label than cutoffs")
    return SurvivalModel(
        name=_need(d, "name", str), version=_need(d, "version", str), kind=kind, design=design,
        coefficients=coefficients,
        risk_groups=RiskGroups(str(rg.get("method", "custom")), cutoffs, labels),
        horizon_days=horizon_days,
        intercept=_finite(d.get("intercept", 0.0), "intercept"),
        lp_center=_finite(d.get("lp_center", 0.0), "lp_center"),
        baseline_survival=baseline,
        training=dict(d.get("training", {})), metrics=dict(d.get("metrics", {})),
        hazard_ratios=tuple(dict(h) for h in d.get("hazard_ratios", [])),
        fit_details=dict(d.get("fit_details", {})),
        created=str(d.get("created", "")), software_version=str(d.get("software_version", "")),
    )


def _reject_constant(name: str) -> float:
    raise ArtifactError(f"{MODEL_FILE}: {name} is not valid JSON for a model (non-finite number)")


def load_model(folder: Path) -> SurvivalModel:
    """Load ``folder/model.json``.  Executes no code: JSON parsing and schema checks only."""
    folder = Path(folder)
    path = folder / MODEL_FILE if folder.is_dir() else folder
    if path.suffix.lower() in _UNSAFE_SUFFIXES:
        raise ArtifactError(f"{path}: refusing to load {path.suffix} files; models are JSON ({MODEL_FILE})")
    if not path.is_file():
        unsafe = sorted(p.name for p in folder.glob("*") if p.suffix.lower() in _UNSAFE_SUFFIXES) \
            if folder.is_dir() else []
        extra = f"; found {', '.join(unsafe)}, which prognode never loads (no pickles)" if unsafe else ""
        raise ArtifactError(f"{folder}: no {MODEL_FILE}{extra}")
    head = path.read_bytes()[:2]
    if head[:1] == b"\x80":
        raise ArtifactError(f"{path}: this is a pickle, not JSON; refusing to load it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from None
    return model_from_dict(data)


def save_model(model: SurvivalModel, folder: Path) -> Path:
    """Write ``model.json`` and ``MODEL_CARD.md`` into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = model.to_dict()
    model_from_dict(json.loads(json.dumps(data)))  # what we write must load
    (folder / MODEL_FILE).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (folder / CARD_FILE).write_text(model_card(model), encoding="utf-8")
    return folder


def _fmt_ci(m: Mapping[str, Any], key: str) -> str:
    value, ci = m.get(key), m.get(f"{key}_ci")
    if value is None:
        return "n/a"
    if ci:
        return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
    return f"{value:.3f}"


def model_card(model: SurvivalModel) -> str:
    """The human-readable card: data, metrics with CIs, intended use, limitations, version."""
    t = model.training
    lines = [
        f"# Model card: {model.name} (version {model.version})", "",
        f"- Kind: `{model.kind}`; schema {SCHEMA} v{SCHEMA_VERSION}; written by prognode {model.software_version}"
        f" on {model.created}",
        f"- Horizon: {model.horizon_days:g} days" if model.horizon_days else "- Horizon: none stored",
        "", "## Intended use", "", INTENDED_USE, "",
        "## Training data", "",
        f"- Source: `{t.get('source', '?')}` (SHA-256 `{str(t.get('sha256', ''))[:16]}...`)",
    ]
    if model.kind == "binary":
        lines.append(f"- Outcome column `{t.get('outcome_column')}` (1 = present, 0 = absent): {t.get('n')} patients, "
                     f"{t.get('events')} with the outcome")
    else:
        lines += [f"- Time column `{t.get('time_column')}` ({t.get('time_unit')}), event column "
                  f"`{t.get('event_column')}`",
                  f"- Patients: {t.get('n')}, events: {t.get('events')}, median follow-up (reverse KM): "
                  f"{t.get('median_follow_up_days', float('nan')):.0f} days"]
    if model.kind == "logistic" and t.get("censoring") == "ipcw":
        lo, hi = t.get("ipcw_weight_range") or (float("nan"), float("nan"))
        lines.append(f"- Horizon outcome: event by {model.horizon_days:g} days. Censoring: **IPCW** "
                     f"(`--censoring ipcw`): the {t.get('excluded_censored', 0)} patients censored before the "
                     "horizon carry no weight; the others are weighted by the inverse Kaplan-Meier probability of "
                     f"remaining uncensored (weights {lo:.2f}-{hi:.2f}); assumes censoring independent of the "
                     "features")
    elif model.kind == "logistic":
        lines.append(f"- Horizon outcome: event by {model.horizon_days:g} days. Censoring: **excluded** "
                     f"(`--censoring exclude`, complete case): {t.get('excluded_censored', 0)} "
                     "patients censored before the horizon were left out (not IPCW)")
    cf = t.get("cohort_features")
    if isinstance(cf, Mapping):
        lines.append(f"- Image features from `prognode cohort features` (`{cf.get('table', '?')}`), param_hash "
                     f"`{cf.get('param_hash', '?')}`, families: {', '.join(cf.get('families', [])) or 'none'}; "
                     "the node computes them on a new study with the same options and refuses (not evaluable) "
                     "when its param_hash differs")
    sel = t.get("feature_selection")
    lines += ["", "## Columns used and dropped", ""]
    if isinstance(sel, Mapping):
        lines.append("Features were not named (`--features` not given): every column except the outcome "
                     "columns (" + ", ".join(f"`{c}`" for c in sel.get("outcome_columns", [])) + ") and "
                     + (", ".join(f"`{c}`" for c in sel.get("excluded", [])) + " (`--exclude`)"
                        if sel.get("excluded") else "none excluded (`--exclude`)") + " was a candidate.")
        lines.append("")
        lines.append(f"- Used ({len(sel.get('used', []))}): " + ", ".join(f"`{c}`" for c in sel.get("used", [])))
        dropped = sel.get("dropped", [])
        lines.append(f"- Dropped ({len(dropped)}):" + ("" if dropped else " none"))
        for d in dropped:
            lines.append(f"  - `{d.get('column')}`: {d.get('reason')}")
    else:
        lines.append("Features named with `--features`: " + ", ".join(f"`{c}`" for c in model.feature_names))
    lines += ["", "## Inputs and preprocessing", ""]
    for spec in model.design.features:
        if spec.kind == "numeric":
            lines.append(f"- `{spec.name}`: numeric, training median {spec.median:.4g}")
        else:
            lines.append(f"- `{spec.name}`: categorical, reference `{spec.levels[0]}`, levels "
                         + ", ".join(f"`{lv}`" for lv in spec.levels))
    lines.append("")
    lines.append("Standardised with training means and SDs. Missing values were imputed with the training "
                 "median/mode for fitting. At prediction time the model "
                 + ("**imputes** missing inputs the same way." if model.design.impute_at_prediction else
                    "does **not** impute: a patient with a missing input is reported as not evaluable."))
    for g in model.design.pca_groups:
        lines.append(f"- PCA group `{g.name}`: {len(g.features)} features -> {len(g.components)} components "
                     f"explaining {sum(g.explained_variance_ratio):.1%} of its variance")
    lines += ["", "## Coefficients", "",
              "| column | coefficient | HR/OR per SD (95% CI) | per unit or level vs reference (95% CI) |",
              "|---|---|---|---|"]
    hr = {h["term"]: h for h in model.hazard_ratios}
    for c, b in zip(model.design.columns, model.coefficients, strict=True):
        h = hr.get(c)
        ci = f"{h['ratio']:.3f} ({h['lower']:.3f}-{h['upper']:.3f})" if h and h.get("lower") is not None \
            and h.get("upper") is not None \
            else f"{math.exp(b):.3f} (no CI: penalised)" if model.kind in ("lasso-cox", "binary") else "-"
        pu = (h or {}).get("per_unit") or {}
        unit = "-" if pu.get("ratio") is None else f"{pu['ratio']:.3f}" + (
            f" ({pu['lower']:.3f}-{pu['upper']:.3f})" if pu.get("lower") is not None and pu.get("upper") is not None
            else "")
        lines.append(f"| `{c}` | {b:+.4f} | {ci} | {unit} |")
    rg = model.risk_groups
    lines += ["", f"Risk groups ({rg.method} of the training scores): "
              + ", ".join(f"{lab}" for lab in rg.labels) + "; cut-offs " + ", ".join(f"{c:.4f}" for c in rg.cutoffs)]
    lines += ["", "## Metrics", ""]
    for split, m in model.metrics.items():
        if isinstance(m, Mapping) and model.kind == "binary":
            dev = f", deviance {m['deviance']:.4f}" if isinstance(m.get("deviance"), float) else ""
            lines.append(f"- {split}: AUC {_fmt_ci(m, 'auc')}{dev} (n={m.get('n')}, with outcome {m.get('events')})")
        elif isinstance(m, Mapping):
            lines.append(f"- {split}: Harrell's C {_fmt_ci(m, 'c_index')}; Uno's C {_fmt_ci(m, 'uno_c_index')}"
                         f" (n={m.get('n')}, events={m.get('events')})")
    if model.fit_details:
        brief = {k: v for k, v in model.fit_details.items() if not isinstance(v, list) or k in ("selected", "warnings")}
        lines += ["", "## Fitting", "", "```", json.dumps(brief, indent=1), "```",
                  "(the full penalty path and cross-validation curve are in model.json)"
                  if len(brief) < len(model.fit_details) else ""]
    lines += ["", "## Limitations", "",
              "- Apparent (training) metrics are optimistic; judge the model on held-out or external data "
              "(`prognode model evaluate`).",
              "- Linearity of the log-odds in the (standardised) features is assumed, not guaranteed."
              if model.kind == "binary" else
              "- Proportional hazards and linearity in the (standardised) features are assumed, not guaranteed.",
              "- Small cohorts give wide confidence intervals; risk-group cut-offs come from the training cohort.",
              "- The model has not been validated prospectively and is not approved for clinical use.", ""]
    return "\n".join(lines)
