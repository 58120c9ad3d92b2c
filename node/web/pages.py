"""Server-rendered HTML of the dashboard: no external assets, no JavaScript framework."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape
from typing import Any

from node.web.data import DeadLetterOut, JobOut, ResultOut, SeriesOut, SweepOut

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#17324d;color:#fff;padding:12px 24px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:20px;margin:0}header span{opacity:.8;font-size:13px}
nav a{color:#cfe3ff;margin-right:14px;font-size:14px;text-decoration:none}
main{padding:16px 24px}section{background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;margin-bottom:18px;padding:8px 16px 14px}
h2{font-size:16px;margin:8px 0}table{border-collapse:collapse;width:100%;font-size:12.5px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #e3e7eb;white-space:nowrap}
th{background:#eef2f6;font-weight:600}td.uid{font-family:ui-monospace,monospace;font-size:11.5px;max-width:260px;
overflow:hidden;text-overflow:ellipsis}.st{padding:1px 7px;border-radius:9px;font-size:11.5px;background:#e3e7eb}
.st-done,.st-complete,.st-sent,.st-retrieved{background:#d5f2dc;color:#17692d}.st-dead,.st-failed{background:#fbd9d9;color:#9b1c1c}
.st-running,.st-receiving,.st-pending{background:#fff0c7;color:#7a5600}.st-interrupted{background:#e6dcf8;color:#4d2a8f}
.cards{display:flex;gap:12px;margin-bottom:16px}.card{background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;
padding:10px 16px;min-width:120px}.card b{display:block;font-size:22px}.empty{color:#7a8793;font-style:italic}
form.inline{display:inline}button{background:#17324d;color:#fff;border:0;border-radius:4px;padding:3px 10px;cursor:pointer}
input[type=password]{font-size:13px;padding:3px 6px;width:260px}.signout{margin-left:auto;font-size:13px}.msg{background:#e1efff;padding:8px 12px;border-radius:4px}
"""


def fmt_time(t: float | None) -> str:
    if t is None:
        return ""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_secs(v: float | None) -> str:
    return "" if v is None else f"{v:.1f} s"


def _state(s: str) -> str:
    return f'<span class="st st-{escape(s)}">{escape(s)}</span>'


def _table(section_id: str, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], note: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    if rows:
        body = "".join("<tr>" + "".join(f"<td{' class=uid' if c.startswith('<!--uid-->') else ''}>{c}</td>"
                                        for c in r) + "</tr>" for r in rows)
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    else:
        table = '<p class="empty">none</p>'
    return f'<section id="{section_id}"><h2>{escape(title)}</h2>{note}{table}</section>'


def _uid(v: str) -> str:
    return f"<!--uid--><span title=\"{escape(v)}\">{escape(v)}</span>"


def _page(title: str, header_extra: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>prognode {escape(title)}</title>"
            f'<meta name="viewport" content="width=device-width">'
            f"<style>{CSS}</style></head><body><header><h1>prognode</h1><span>{escape(title)}</span>"
            f"{header_extra}</header><main>{body}</main></body></html>")


def signin(node_title: str, message: str, next_path: str, enabled: bool, signed_in_as: str = "") -> str:
    """The token form (``POST /signin``); no PHI on this page."""
    msg = f'<p class="msg" id="message">{escape(message)}</p>' if message else ""
    if not enabled:
        form = ('<p id="closed">No token is configured on this node: set <code>[web].read_token</code> and/or '
                "<code>[web].token</code> (or <code>PROGNODE_WEB_READ_TOKEN</code> / "
                "<code>PROGNODE_WEB_TOKEN</code>) and restart.</p>")
    else:
        already = (f'<p id="signed-in">Signed in ({escape(signed_in_as)}). <a href="/">Dashboard</a></p>'
                   if signed_in_as else "")
        form = (f'{already}<form method="post" action="/signin" id="signin">'
                f'<input type="hidden" name="next" value="{escape(next_path)}">'
                '<label>Token <input type="password" name="token" id="token" autocomplete="current-password" '
                'required autofocus></label> <button type="submit" id="signin-submit">Sign in</button></form>'
                '<p class="empty">The read token shows the dashboard; the write token also resends.</p>')
    return _page(node_title, "", f'{msg}<section id="signin-section"><h2>Sign in</h2>{form}</section>')


def dashboard(node_title: str, series: list[SeriesOut], jobs: list[JobOut], dead: list[DeadLetterOut],
              results: list[ResultOut], sweeps: list[SweepOut], writes: str = "disabled", csrf: str = "",
              access: str = "", message: str = "", counts: dict[str, Any] | None = None,
              outcomes: str = "", histograms: str = "") -> str:
    """``writes``: "enabled" (a write session: Resend buttons), "read-only" or "disabled" (no write token);
    ``access``: the session's access ("read"/"write"; empty for a bearer client: no sign-out form);
    ``outcomes``, ``histograms``: the readable results section and the time-to-result histograms
    beside the counts (HTML from :mod:`node.web.outcomes`)."""
    counts = counts or {}
    cards = "".join(f'<div class="card">{escape(k)}<b>{escape(str(v))}</b></div>' for k, v in counts.items())
    csrf_input = f'<input type="hidden" name="csrf" value="{escape(csrf)}">'

    def resend_form(job_id: int) -> str:
        if writes == "disabled":
            return '<span class="empty">writes disabled</span>'
        if writes != "enabled":
            return '<span class="empty">sign in with the write token to resend</span>'
        return (f'<form class="inline" method="post" action="/ui/jobs/{job_id}/resend">{csrf_input}'
                f'<button type="submit" id="resend-{job_id}">Resend</button></form>')

    sections = [
        _table("dead-letters", f"Dead letters ({len(dead)})",
               ["Kind", "Job", "Pipeline", "Destination", "Attempts", "Error", "Series UID", ""],
               [[escape(d.kind), str(d.job_id), escape(d.pipeline), escape(d.destination), str(d.attempts),
                 escape(d.error[:120]), _uid(d.series_uid), resend_form(d.job_id)] for d in dead]),
        outcomes,
        _table("results", f"Recent results ({len(results)})",
               ["Result SOP UID", "Type", "Pipeline", "Job", "Source series", "Created (UTC)", "In PACS (UTC)",
                "Last image to PACS", "Supersedes"],
               [[_uid(r.sop_instance_uid),
                 escape(r.modality) + (' <span class="retracted">retracted</span>' if r.retracted else ""),
                 escape(r.pipeline), str(r.job_id),
                 _uid(r.source_series_uid), fmt_time(r.created_at), fmt_time(r.in_pacs_at),
                 fmt_secs(r.seconds_to_pacs), _uid(r.supersedes) if r.supersedes else ""] for r in results]),
        _table("jobs", f"Jobs ({len(jobs)})",
               ["Job", "Pipeline", "Route", "Series UID", "State", "Attempts", "Created (UTC)", "Finished (UTC)",
                "Error"],
               [[str(j.id), escape(j.pipeline + (f" {j.pipeline_version}" if j.pipeline_version else "")),
                 escape(j.route), _uid(j.series_uid),
                 _state(j.state) + (f' <span class="retracted" title="{escape(j.retraction["reason"])}">retracted'
                                    '</span>' if j.retraction else ""),
                 str(j.attempts), fmt_time(j.created_at), fmt_time(j.finished_at), escape(j.error[:120])]
                for j in jobs]),
        _table("sweeps", f"Sweeps ({len(sweeps)})",
               ["Sweep", "Source", "Dates", "State", "Studies", "Retrieved", "Skipped", "Failed", "Planned",
                "Started (UTC)", "Finished (UTC)"],
               [[str(w.id), escape(w.source), f"{escape(w.date_from)}-{escape(w.date_to)}"
                 + (" (dry run)" if w.dry_run else ""), _state(w.state), str(w.studies), str(w.retrieved),
                 str(w.skipped), str(w.failed), str(w.planned), fmt_time(w.started_at), fmt_time(w.finished_at)]
                for w in sweeps]),
        _table("series", f"Series ({len(series)})",
               ["Series UID", "Patient", "Modality", "Description", "Instances", "State", "Gen", "Last image (UTC)",
                "Completed (UTC)", "By", "From AE"],
               [[_uid(s.series_uid), escape(s.patient_id), escape(s.modality), escape(s.description),
                 str(s.instances), _state(s.state), str(s.generation), fmt_time(s.last_received),
                 fmt_time(s.completed_at), escape(s.completion_reason), escape(s.source)] for s in series]),
    ]
    msg = f'<p class="msg" id="message">{escape(message)}</p>' if message else ""
    nav = "".join(f'<a href="#{a}">{escape(t)}</a>' for a, t in
                  (("dead-letters", "Dead letters"), ("outcomes", "Results"), ("results", "Result objects"), ("jobs", "Jobs"), ("sweeps", "Sweeps"),
                   ("series", "Series"))) + '<a href="/openapi.json">API</a><a href="/metrics">Metrics</a>'
    who = ""
    if access:
        who = (f'<form class="inline signout" method="post" action="/signout">{csrf_input}'
               f'<span id="access">signed in: {escape(access)}</span> <button type="submit" id="signout">Sign out</button></form>')
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>prognode {escape(node_title)}</title>"
            f'<meta name="viewport" content="width=device-width"><meta http-equiv="refresh" content="30">'
            f"<style>{CSS}</style></head><body><header><h1>prognode</h1><span>{escape(node_title)}</span>"
            f"<nav>{nav}</nav>{who}</header><main>{msg}<div class=cards>{cards}</div>{histograms}{''.join(sections)}</main>"
            "</body></html>")
