"""Results an operator can read: one row per finished job, and time to result per pipeline.

Each done job shows its verdict (evaluable, or "not evaluable" and why), its key values, the
model and version that made it (:func:`pipelines.common.key_values.key_values`, the one reading of
the summaries, shared with the burned-in key images) and a link that opens the study in the site's
viewer (``[web] viewer_url``).  The values come from the job's ``summary.json`` in its result
folder (what the worker wrote: it also names the pipeline version), or from the summary stored
with the job when that file is gone (retention).  No new column.

Time to result is from the last image of the input series to the first of the job's results
stored in a PACS (``jobs.last_image_at`` to ``min(results.in_pacs_at)``), binned per pipeline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel
from sqlalchemy import func, select

from node.db import Database, Job, JobState, Result
from pipelines.common.key_values import key_values

logger = logging.getLogger(__name__)

# upper edges (seconds) of the time-to-result bins; the last bin is open
BIN_EDGES: tuple[float, ...] = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
HISTOGRAM_JOBS = 5000  # the latest done jobs the histograms count


class OutcomeOut(BaseModel):
    job_id: int
    pipeline: str
    study_uid: str
    series_uid: str
    finished_at: float | None
    evaluable: bool
    verdict: str  # "evaluable" or "not evaluable: <reason>"
    reason: str
    values: list[tuple[str, str]]  # (label, value) in reading order
    model: str  # pipeline and version, backend and model where the pipeline names them
    viewer_link: str  # empty when [web] viewer_url is not set
    seconds_to_result: float | None  # last image to the first result in a PACS


class HistogramOut(BaseModel):
    pipeline: str
    edges: list[float]  # upper edges in seconds; counts has one more (the open last bin)
    counts: list[int]
    median_seconds: float | None


def viewer_link(template: str, study_uid: str) -> str:
    return template.replace("{study_uid}", quote(study_uid, safe="")) if template else ""


def _summary(job: Job) -> Mapping[str, Any]:
    """The worker's summary.json of the job, else what the job row keeps."""
    if job.result_dir:
        path = Path(job.result_dir) / "summary.json"
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                return loaded
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            logger.warning("dashboard: job %d: cannot read %s: %s", job.id, path, e)
    return {"pipeline": job.pipeline, **(job.summary or {})}


def _first_in_pacs(db: Database, job_ids: Sequence[int]) -> dict[int, float]:
    if not job_ids:
        return {}
    with db.read() as s:
        rows = s.execute(select(Result.job_id, func.min(Result.in_pacs_at)).where(Result.job_id.in_(job_ids))
                         .group_by(Result.job_id)).all()
    return {int(j): float(t) for j, t in rows if t is not None}


def list_outcomes(db: Database, viewer_url: str = "", limit: int = 100) -> list[OutcomeOut]:
    with db.read() as s:
        done = list(s.scalars(select(Job).where(Job.state == JobState.DONE)
                              .order_by(Job.finished_at.desc(), Job.id.desc()).limit(limit)))
        s.expunge_all()
    first = _first_in_pacs(db, [j.id for j in done])
    out = []
    for j in done:
        kv = key_values(_summary(j))
        t = first.get(j.id)
        out.append(OutcomeOut(job_id=j.id, pipeline=j.pipeline, study_uid=j.study_uid, series_uid=j.series_uid,
                              finished_at=j.finished_at, evaluable=kv.evaluable, verdict=kv.verdict, reason=kv.reason,
                              values=list(kv.values), model=kv.model, viewer_link=viewer_link(viewer_url, j.study_uid),
                              seconds_to_result=(t - j.last_image_at) if t is not None and j.last_image_at else None))
    return out


def _bin(seconds: float) -> int:
    for i, edge in enumerate(BIN_EDGES):
        if seconds < edge:
            return i
    return len(BIN_EDGES)


def histograms(db: Database, limit: int = HISTOGRAM_JOBS) -> list[HistogramOut]:
    """Time to result of the latest ``limit`` done jobs that reached a PACS, per pipeline."""
    with db.read() as s:
        first = func.min(Result.in_pacs_at)
        rows = s.execute(select(Job.pipeline, Job.last_image_at, first).join(Result, Result.job_id == Job.id)
                         .where(Job.state == JobState.DONE, Job.last_image_at.is_not(None))
                         .group_by(Job.id, Job.pipeline, Job.last_image_at).having(first.is_not(None))
                         .order_by(Job.id.desc()).limit(limit)).all()
    per: dict[str, list[float]] = {}
    for pipeline, last, t in rows:
        if t is not None and last is not None:
            per.setdefault(str(pipeline), []).append(max(0.0, float(t) - float(last)))
    out = []
    for pipeline in sorted(per):
        secs = sorted(per[pipeline])
        counts = [0] * (len(BIN_EDGES) + 1)
        for v in secs:
            counts[_bin(v)] += 1
        out.append(HistogramOut(pipeline=pipeline, edges=list(BIN_EDGES), counts=counts,
                                median_seconds=secs[len(secs) // 2] if secs else None))
    return out


# HTML -----------------------------------------------------------------------------------------

CSS = """
.hists{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:16px}.hist{background:#fff;border-radius:6px;
box-shadow:0 1px 2px #0002;padding:8px 14px;font-size:12px}.hist h3{font-size:13px;margin:0 0 6px}
.bars{display:flex;align-items:flex-end;gap:3px;height:70px}.bar{width:36px;background:#3d7cc9;position:relative}
.bar span{position:absolute;top:-15px;width:100%;text-align:center;font-size:10.5px}.lbl{display:flex;gap:3px}
.lbl span{width:36px;text-align:center;font-size:10px;color:#55616d}.ok{color:#17692d;font-weight:600}
.ne{color:#9b4a00;font-weight:600}td.kv{white-space:normal;min-width:380px;max-width:600px}
"""


def _edge(v: float) -> str:
    return f"{v / 60:.0f}m" if v >= 60 else f"{v:.0f}s"


def histograms_html(hists: Sequence[HistogramOut]) -> str:
    if not hists:
        return ""
    boxes = []
    for h in hists:
        top = max(h.counts) or 1
        bars = "".join(f'<div class="bar" style="height:{max(1, round(66 * c / top))}px" title="{c}"><span>{c}</span></div>'
                       for c in h.counts)
        labels = [f"&lt;{_edge(e)}" for e in h.edges] + [f"&ge;{_edge(h.edges[-1])}"]
        med = "" if h.median_seconds is None else f" (median {h.median_seconds:.1f} s)"
        boxes.append(f'<div class="hist" id="ttr-{escape(h.pipeline)}"><h3>Time to result: {escape(h.pipeline)}'
                     f"{escape(med)}</h3><div class=bars>{bars}</div><div class=lbl>"
                     + "".join(f"<span>{lbl}</span>" for lbl in labels) + "</div></div>")
    return f"<style>{CSS}</style><div class=hists>{''.join(boxes)}</div>"


def outcomes_html(rows: Sequence[OutcomeOut], fmt_time: Any) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("Job", "Pipeline", "Verdict", "Key values", "Model", "Study",
                                              "Finished (UTC)", "Time to result"))
    body = []
    for r in rows:
        verdict = (f'<span class="ok">{escape(r.verdict)}</span>' if r.evaluable
                   else f'<span class="ne">{escape(r.verdict)}</span>')
        values = "; ".join(f"{escape(k)}: {escape(v)}" for k, v in r.values)
        study = (f'<a href="{escape(r.viewer_link)}" target="_blank" rel="noopener" id="view-{r.job_id}">'
                 f"open in viewer</a>" if r.viewer_link else f'<span title="{escape(r.study_uid)}">{escape(r.study_uid)}</span>')
        ttr = "" if r.seconds_to_result is None else f"{r.seconds_to_result:.1f} s"
        body.append(f'<tr id="outcome-{r.job_id}"><td>{r.job_id}</td><td>{escape(r.pipeline)}</td><td>{verdict}</td>'
                    f'<td class="kv">{values}</td><td>{escape(r.model)}</td><td>{study}</td>'
                    f"<td>{fmt_time(r.finished_at)}</td><td>{ttr}</td></tr>")
    table = (f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>" if body
             else '<p class="empty">none</p>')
    return f'<section id="outcomes"><h2>Results: verdicts and key values ({len(rows)})</h2>{table}</section>'
