"""A result's verdict and key values, in words, from the summary a pipeline returns.

One reading of the summaries for every place that shows a result to a person: the burned-in
Secondary Capture key images (:mod:`pipelines.common.key_images`) and the node's dashboard.
Pure Python on JSON values; importing it imports no numpy, torch or monai.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["KeyValues", "key_values"]

_AREA_LABELS = (("skeletal_muscle", "Skeletal muscle"), ("sat", "SAT"), ("vat", "VAT"), ("imat", "IMAT"))


@dataclass(frozen=True)
class KeyValues:
    """``evaluable`` and why not; ``values``: (label, text) pairs in reading order; ``model``: what made it."""

    evaluable: bool
    reason: str
    values: tuple[tuple[str, str], ...]
    model: str

    @property
    def verdict(self) -> str:
        return "evaluable" if self.evaluable else f"not evaluable: {self.reason or 'no reason given'}"


def _flag(v: Any) -> bool | None:
    """A yes/no of a summary: a bool, a numpy bool, or the strings "True"/"False" that older
    summaries hold (numpy bools written as text); None when it is neither."""
    if isinstance(v, bool):
        return v
    if type(v).__name__ == "bool_":  # numpy.bool_
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    return None


def _num(v: Any, digits: int) -> str | None:
    if isinstance(v, Mapping):
        v = v.get("value")
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return f"{v:.{digits}f}"


def _body_composition(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    level = str(s.get("level", ""))
    how = ", ".join(str(x) for x in (s.get("level_method"), s.get("level_confidence")) if x)
    out.append(("Level", f"{level} ({how})" if how else level))
    smi = _num((s.get("derived") or {}).get("smi"), 1)
    if smi is not None:
        out.append(("SMI", f"{smi} cm²/m²"))
    for cid, res in (s.get("sarcopenia") or {}).items():
        if not isinstance(res, Mapping):
            continue
        flag = _flag(res.get("sarcopenic"))
        if "sarcopenic" in res and flag is not None:
            via = f" via {res['via']}" if res.get("via") else ""
            out.append((f"Sarcopenia ({cid}{via})", f"{'present' if flag else 'absent'} "
                        f"(cut-off: SMI < {res.get('threshold')} {res.get('unit', '')})".rstrip()))
        elif "sarcopenic" in res:  # never guess a verdict
            out.append((f"Sarcopenia ({cid})", f"not stated ({res['sarcopenic']!r})"))
        else:
            out.append((f"Sarcopenia ({cid})", f"not evaluable: {res.get('not_evaluable', '')}"))
    areas = s.get("areas_cm2") or {}
    hu = s.get("mean_hu") or {}
    for key, name in _AREA_LABELS:
        a = areas.get(key)
        if not isinstance(a, Mapping):
            continue
        v = _num(a, 1)
        if v is None:
            out.append((name, f"not evaluable: {a.get('not_evaluable', '')}"))
            continue
        h = _num(hu.get(key), 0)
        out.append((name, f"{v} cm²" + (f", {h} HU" if h is not None else "")))
    return out


def _tumour(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = [("ROI", f"{s.get('roi_label', '')} ({s.get('roi_source', '')})")]
    vol = _num(s.get("tumour_volume_mm3"), 0)
    if vol is not None:
        out.append(("Volume", f"{float(vol) / 1000.0:.1f} cm³"))
    hu = _num(s.get("mean_hu"), 0)
    if hu is not None:
        out.append(("Mean", f"{hu} HU"))
    if s.get("n_features") is not None:
        out.append(("Features", f"{s['n_features']} ({s.get('params', '')})"))
    return out


def _segments(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    """tissue-hu: volume and mean HU of each segment over the series."""
    out = []
    for name, seg in (s.get("segments") or {}).items():
        if not isinstance(seg, Mapping):
            continue
        vol, hu = _num(seg.get("volume_ml"), 0), _num(seg.get("mean_hu"), 0)
        out.append((str(name).replace("_", " ").capitalize(),
                    ", ".join(x for x in (f"{vol} mL" if vol else "", f"{hu} HU" if hu else "") if x) or "empty"))
    return out


def _generic(s: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in s.items():
        if k in ("evaluable", "reason", "pipeline", "pipeline_version", "version") or isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            out.append((k, f"{v:.4g}"))
        elif isinstance(v, str) and 0 < len(v) <= 40 and not k.endswith("uid"):
            out.append((k, v))
        if len(out) >= 6:
            break
    return out


def _model(s: Mapping[str, Any]) -> str:
    name = str(s.get("pipeline") or "")
    version = str(s.get("pipeline_version") or s.get("version") or "")
    parts = [f"{name} {version}".strip()]
    if s.get("backend"):
        parts.append(f"backend {s['backend']}" + (f", model {s['model_version']}" if s.get("model_version") else ""))
    model = s.get("model")
    if isinstance(model, Mapping) and model.get("name"):
        parts.append(f"model {model.get('name')} {model.get('version', '')}".strip())
    return "; ".join(p for p in parts if p)


def key_values(summary: Mapping[str, Any]) -> KeyValues:
    """The verdict, the key values and the model of one result, from its summary (summary.json)."""
    s = summary
    evaluable = _flag(s.get("evaluable", True))
    reason = str(s.get("reason") or "")
    if evaluable is None:  # a verdict that cannot be read is no verdict
        evaluable, reason = False, reason or f"verdict unreadable ({s.get('evaluable')!r})"
    if not evaluable:
        values: list[tuple[str, str]] = []
    elif "areas_cm2" in s or "sarcopenia" in s:
        values = _body_composition(s)
    elif "roi_label" in s:
        values = _tumour(s)
    elif isinstance(s.get("segments"), Mapping):
        values = _segments(s)
    elif "group" in s and "score" in s:
        score = _num(s.get("score"), 3)
        values = [("Risk group", str(s.get("group"))), ("Score", score or "")]
    else:
        values = _generic(s)
    return KeyValues(evaluable, reason, tuple(values), _model(s))
