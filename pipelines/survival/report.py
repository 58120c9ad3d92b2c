"""Self-contained HTML validation report: tables plus matplotlib plots embedded as base64 PNG.

Plots: Kaplan-Meier by risk group (with log-rank p), time-dependent AUC, calibration at the horizon,
decision curve (net benefit), forest plot of hazard ratios.  The file has no external references,
so it can be mailed to a colleague.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import Any

from pipelines.survival.artifact import INTENDED_USE, SurvivalModel


def _png(draw: Callable[[Any], None], size: tuple[float, float] = (6.0, 4.0)) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _km(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        km = result["kaplan_meier"]
        for g in km["groups"]:
            t = [x / 365.25 for x in g["curve"]["time_days"]]
            ax.step(t, g["curve"]["survival"], where="post", label=f"{g['group']} (n={g['n']}, {g['events']} events)")
        p = km.get("logrank_p")
        ax.set_title("Kaplan-Meier by risk group" + (f" (log-rank p={p:.3g})" if p is not None else ""))
        ax.set_xlabel("years")
        ax.set_ylabel("survival probability")
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower left")
    return draw


def _auc(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        a = result["td_auc"]
        pts = [(t / 365.25, v) for t, v in zip(a["times_days"], a["auc"], strict=True) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="cumulative/dynamic AUC")
        if a.get("mean_auc") is not None:
            ax.axhline(a["mean_auc"], ls="--", c="grey", label=f"mean {a['mean_auc']:.3f}")
        ax.axhline(0.5, ls=":", c="k")
        ax.set_ylim(0.3, 1.0)
        ax.set_xlabel("years")
        ax.set_ylabel("AUC(t)")
        ax.set_title("Time-dependent AUC")
        ax.legend()
    return draw


def _cal(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        cal = result["calibration"]
        xs = [g["predicted"] for g in cal["groups"]]
        ys = [g["observed"] for g in cal["groups"]]
        err = [[y - g["observed_lower"] for y, g in zip(ys, cal["groups"], strict=True)],
               [g["observed_upper"] - y for y, g in zip(ys, cal["groups"], strict=True)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label="groups (KM observed, 95% CI)")
        top = max([*xs, *ys, 0.1]) * 1.1
        ax.plot([0, top], [0, top], ls="--", c="grey", label="ideal")
        ax.set_xlabel(f"predicted P(event by {cal['horizon_days']:g} d)")
        ax.set_ylabel("observed (1 - KM)")
        ax.set_title("Calibration at the horizon")
        ax.legend()
    return draw


def _dca(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        nb = result["net_benefit"]
        ax.plot(nb["thresholds"], nb["model"], label="model")
        ax.plot(nb["thresholds"], nb["treat_all"], label="treat all")
        ax.plot(nb["thresholds"], nb["treat_none"], label="treat none")
        lo = min(nb["model"]) if nb["model"] else -0.05
        ax.set_ylim(min(-0.05, lo), max(max(nb["treat_all"] + nb["model"]), 0.05) * 1.1)
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.set_title(f"Decision curve at {nb['horizon_days']:g} days")
        ax.legend()
    return draw


def _forest(rows: list[dict[str, Any]], title: str) -> Callable[[Any], None]:
    def draw(ax: Any) -> None:
        for i, h in enumerate(rows):
            y = len(rows) - i
            ax.plot([h["lower"], h["upper"]], [y, y], c="k")
            ax.plot([h["ratio"]], [y], "s", c="C0")
        ax.set_yticks(range(len(rows), 0, -1), [h["term"][:40] for h in rows])
        ax.axvline(1.0, ls="--", c="grey")
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ratio (95% CI), log scale")
        ax.set_title(title)
    return draw


def _drawable(h: dict[str, Any]) -> bool:
    vals = [h.get("ratio"), h.get("lower"), h.get("upper")]
    return all(isinstance(v, int | float) and 0 < v < float("inf") for v in vals)


def _img(b64: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"/></figure>'


def render(model: SurvivalModel, result: dict[str, Any], table: str, nomogram_png: bytes | None = None,
           nomogram_note: str = "") -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>prognode report: {html.escape(model.name)} {html.escape(model.version)}</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}figure{margin:1em 0}"
        "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}"
        ".warn{background:#fff3cd;padding:.5em 1em}</style></head><body>",
        f"<h1>{html.escape(model.name)} {html.escape(model.version)} ({html.escape(model.kind)})</h1>",
        f"<p class='warn'>{html.escape(INTENDED_USE)}</p>",
        f"<h2>Summary</h2><pre>{html.escape(table)}</pre>",
    ]
    if result.get("c_index") is not None:
        parts.append("<h2>Kaplan-Meier by risk group</h2>" + _img(_png(_km(result)), "Kaplan-Meier by risk group"))
        if result["td_auc"].get("times_days"):
            parts.append("<h2>Time-dependent AUC</h2>" + _img(_png(_auc(result)), "time-dependent AUC"))
        if result.get("calibration"):
            parts.append("<h2>Calibration</h2>" + _img(_png(_cal(result)), "calibration"))
        if result.get("net_benefit"):
            parts.append("<h2>Decision curve</h2>" + _img(_png(_dca(result)), "decision curve"))
        rows = [h for h in result.get("hazard_ratios", []) if _drawable(h)]
        rows += [{**h, "term": f"model: {h['term']}"} for h in result.get("model_hazard_ratios", []) if _drawable(h)]
        if rows:
            parts.append("<h2>Hazard/odds ratios</h2>" + _img(
                _png(_forest(rows, "Ratios with 95% CIs"), (7.0, 1.5 + 0.35 * len(rows))), "forest plot"))
    if nomogram_png is not None:
        parts.append("<h2>Nomogram</h2>" + _img(base64.b64encode(nomogram_png).decode("ascii"), "nomogram")
                     + "<p>Each variable's points are read on the top scale; their sum on the total-points scale "
                     "gives the predicted risk on the bottom scale.</p>")
    elif nomogram_note:
        parts.append(f"<h2>Nomogram</h2><p>Not drawn: {html.escape(nomogram_note)}</p>")
    parts.append("<h2>Model</h2><p>Training: " + html.escape(
        f"n={model.training.get('n')}, events={model.training.get('events')}, source {model.training.get('source')}")
        + "</p></body></html>")
    return "\n".join(parts)
