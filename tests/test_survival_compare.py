"""``prognode model compare`` (paired bootstrap, DeLong, NRI, HTML) and the nomogram of ``model report``.

Synthetic cohorts with a known signal: ``strong`` drives the hazard, ``weak`` barely does.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.survival.artifact import SurvivalModel, load_model, save_model
from pipelines.survival.compare import auc, delong, delong_paired, nri
from pipelines.survival.data import cohort_from_frame
from pipelines.survival.fit import FitOptions, fit_model
from pipelines.survival.nomogram import axes, nomogram_spec, points_to_risk, total_axis_scale
from pipelines.survival.scoring import score_frame

H = 730.5  # two years


def synthetic(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    grade = rng.choice(["G1", "G2", "G3"], size=n)
    lp = 1.2 * x1 + 0.15 * x2 + 0.4 * (grade == "G3")
    t = rng.exponential(800 * np.exp(-lp))
    c = rng.uniform(300, 3000, n)
    return pd.DataFrame({"id": [f"P{i}" for i in range(n)], "strong": x1 * 10 + 50, "weak": x2, "grade": grade,
                         "a": x1 + rng.normal(size=n), "b": x1 + rng.normal(size=n),
                         "time": np.minimum(t, c).round(1), "event": (t <= c).astype(int)})


def fit(frame: pd.DataFrame, kind: str, features: tuple[str, ...], name: str, **kw: object) -> SurvivalModel:
    cohort = cohort_from_frame(frame, "time", "event", source="train.csv")
    opts = FitOptions(kind=kind, features=features, horizon_days=H, name=name, n_boot=10, time_column="time",
                      event_column="event", **kw)  # type: ignore[arg-type]
    return fit_model(cohort, opts)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cmp")
    train = synthetic(300, 1)
    synthetic(200, 2).to_csv(d / "test.csv", index=False)
    save_model(fit(train, "cox", ("strong", "grade"), "strong"), d / "strong")
    save_model(fit(train, "cox", ("weak",), "weak"), d / "weak")
    save_model(fit(train, "logistic", ("strong", "weak", "grade"), "logi"), d / "logi")
    return d


def test_delong_hand_example() -> None:
    # positives 0.9, 0.4; negatives 0.6, 0.1: 3 of 4 pairs ordered -> AUC 0.75;
    # placement values V10 = (1, 0.5), V01 = (0.5, 1): var = 0.125/2 + 0.125/2 = 0.125
    aucs, cov = delong([1, 1, 0, 0], [[0.9, 0.4, 0.6, 0.1]])
    assert aucs[0] == pytest.approx(0.75) and cov[0, 0] == pytest.approx(0.125)
    # ties count one half
    assert auc([1, 0, 1, 0], [0.5, 0.5, 0.7, 0.1]) == pytest.approx(0.875)


def test_delong_matches_brute_force_and_bootstrap() -> None:
    rng = np.random.default_rng(3)
    n = 300
    y = rng.random(n) < 0.4
    a = y * 1.0 + rng.normal(size=n)
    b = y * 0.5 + 0.5 * a + rng.normal(size=n)  # correlated with a
    b = np.round(b, 1)  # with ties
    aucs, cov = delong(y, np.vstack([a, b]))
    # brute-force placement values (DeLong 1988)
    pos, neg = np.vstack([a, b])[:, y], np.vstack([a, b])[:, ~y]

    def psi(p: np.ndarray, q: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
        return (p > q) + 0.5 * (p == q)  # type: ignore[no-any-return]

    v10 = np.stack([psi(pos[r][:, None], neg[r][None, :]).mean(axis=1) for r in range(2)])
    v01 = np.stack([psi(pos[r][:, None], neg[r][None, :]).mean(axis=0) for r in range(2)])
    assert np.allclose(aucs, v10.mean(axis=1))
    assert np.allclose(cov, np.cov(v10) / y.sum() + np.cov(v01) / (~y).sum())
    # the paired SE agrees with a bootstrap of the difference
    d = delong_paired(y, a, b)
    boot = []
    for _ in range(400):
        i = rng.integers(0, n, n)
        boot.append(auc(y[i], a[i]) - auc(y[i], b[i]))
    assert d["se"] == pytest.approx(float(np.std(boot, ddof=1)), rel=0.15)
    assert d["difference"] == pytest.approx(aucs[0] - aucs[1]) and 0 <= d["p"] <= 1


def test_nri_small_example() -> None:
    y = np.array([1, 1, 0, 0])
    r = nri(y, [0.6, 0.5, 0.2, 0.4], [0.4, 0.5, 0.3, 0.3], cutoffs=[0.5])
    # events: one up, none down -> 0.5; non-events: one down, one up -> 0
    assert r["continuous"] == {"nri": 0.5, "events": 0.5, "non_events": 0.0}
    # categories at 0.5: event 1 moves up (0.4 -> 0.6), event 2 stays (0.5 -> 0.5); no non-event moves
    assert r["categorical"]["nri"] == pytest.approx(0.5)


def test_compare_strong_beats_weak(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.survival.cli import main

    html = cohort / "out" / "compare.html"
    code = main(["model", "compare", "--models", str(cohort / "strong"), str(cohort / "weak"), str(cohort / "logi"),
                 "--data", str(cohort / "test.csv"), "--n-boot", "100", "--seed", "1", "--json",
                 "--nri-cutoffs", "0.3", "0.6", "--out", str(html)])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["endpoint"] == "survival" and res["n"] == 200 and res["horizon_days"] == H
    for key in ("data", "n", "events", "n_not_evaluable", "seed", "n_boot", "models", "pairs", "horizon_outcome"):
        assert key in res, key
    strong, weak, logi = res["models"]
    for m in res["models"]:
        for key in ("c_index", "c_index_ci", "td_auc", "td_auc_ci", "horizon_auc", "horizon_auc_ci",
                    "horizon_auc_delong_ci", "calibration", "net_benefit"):
            assert m.get(key) is not None, (m["label"], key)
        assert m["c_index_ci"][0] <= m["c_index"] <= m["c_index_ci"][1]
    assert strong["c_index"] > 0.7 and weak["c_index"] < 0.62
    pair = res["pairs"][0]
    assert (pair["a"], pair["b"]) == ("strong", "weak")
    assert pair["c_index_difference_ci"][0] > 0  # the strong model is better; the CI excludes 0
    assert pair["td_auc_difference_ci"][0] > 0
    assert pair["horizon_auc_delong"]["p"] < 0.001 and pair["horizon_auc_delong"]["ci"][0] > 0
    assert pair["horizon_auc_difference_bootstrap_ci"][0] > 0
    assert pair["nri"]["continuous"]["nri"] > 0 and pair["nri"]["continuous"]["ci"][0] > 0
    assert "categorical" in pair["nri"]
    # strong vs logi (the same signal): no clear difference
    assert res["pairs"][1]["c_index_difference_ci"][0] < 0 < res["pairs"][1]["c_index_difference_ci"][1]
    text = html.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)
    assert {alt for alt, _ in images} == {"time-dependent ROC", "ROC", "calibration", "decision curve"}
    for _, b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_compare_binary_outcome_and_errors(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.survival.cli import main

    test = pd.read_csv(cohort / "test.csv")
    test["early"] = ((test["event"] == 1) & (test["time"] <= 365)).astype(int)
    test.to_csv(cohort / "binary.csv", index=False)
    code = main(["model", "compare", "--models", str(cohort / "strong"), str(cohort / "weak"),
                 "--data", str(cohort / "binary.csv"), "--outcome", "early", "--n-boot", "50"])
    out = capsys.readouterr().out
    assert code == 0 and "DeLong p=" in out and "AUC" in out
    code = main(["model", "compare", "--models", str(cohort / "strong"), "--data", str(cohort / "test.csv")])
    assert code == 2 and "at least two models" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["cox", "logistic", "pca"])
def test_nomogram_axis_reproduces_predictions(which: str, cohort: Path) -> None:
    """Points of a subject -> risk by the drawn axis's own mapping == the model's prediction."""
    if which == "pca":
        model = fit(synthetic(300, 1), "cox", ("strong", "grade", "a", "b"), "pca", groups={"ab": ("a", "b")})
    else:
        model = load_model(cohort / ("strong" if which == "cox" else "logi"))
    test = pd.read_csv(cohort / "test.csv")
    spec = nomogram_spec(model, test)
    rows = axes(model, spec)
    assert rows[0][0] == "Points" and rows[-2][0] == "Total points" and rows[-1][0].startswith("P(event by 2 years)")
    # the largest variable spans exactly 0-100 points
    assert max(v.spread for v in spec.variables) * spec.points_per_score == pytest.approx(100.0)
    # every risk tick sits where the mapping gives its risk
    scale = total_axis_scale(rows)
    for x, _, risk in rows[-1][1]:
        assert points_to_risk(model, spec, x / scale)[0] == pytest.approx(risk, abs=1e-9)
    # subjects: their total points map to the model's predicted probability
    sub = test.iloc[:8]
    expected = score_frame(model, sub).probabilities
    assert expected is not None
    totals = [spec.total_points(rec) for rec in sub.to_dict(orient="records")]
    assert np.allclose(points_to_risk(model, spec, totals), expected, atol=1e-9)


def test_report_draws_and_saves_the_nomogram(cohort: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.survival.cli import main

    out = cohort / "rep" / "report.html"
    code = main(["model", "report", "--model", str(cohort / "strong"), "--data", str(cohort / "test.csv"),
                 "--n-boot", "10", "--out", str(out)])
    assert code == 0
    png = (out.parent / "nomogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    assert f'<img alt="nomogram" src="data:image/png;base64,{base64.b64encode(png).decode()}"' in text


def _binary_model(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The logistic model relabelled as ``kind: binary`` for the 0/1 column ``early`` (the hook for binary models;
    the intercept is 0 so the score is the same whether or not scoring adds it)."""
    import pipelines.survival.artifact as artifact

    if "binary" not in artifact.KINDS:
        monkeypatch.setattr(artifact, "KINDS", (*artifact.KINDS, "binary"))
    d = json.loads((cohort / "logi" / "model.json").read_text())
    d.update(kind="binary", name="binary", intercept=0.0, horizon_days=None, baseline_survival=[])
    d["training"]["outcome_column"] = "early"
    (cohort / "bin").mkdir(exist_ok=True)
    (cohort / "bin" / "model.json").write_text(json.dumps(d))
    test = pd.read_csv(cohort / "test.csv")
    test["early"] = ((test["event"] == 1) & (test["time"] <= 365)).astype(int)
    test.to_csv(cohort / "binary.csv", index=False)
    return cohort / "bin"


def test_compare_binary_kind_hook(cohort: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.survival.cli import main

    b = _binary_model(cohort, monkeypatch)
    code = main(["model", "compare", "--models", str(b), str(cohort / "weak"), "--data", str(cohort / "binary.csv"),
                 "--n-boot", "50", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0 and res["endpoint"] == "binary" and res["outcome_column"] == "early"
    assert res["models"][0]["auc"] > res["models"][1]["auc"]
    assert res["models"][0]["calibration"]["groups"] and res["models"][0]["net_benefit"]["treat_none"][0] == 0
    assert "nri_note" in res["pairs"][0]  # the Cox model gives no probability of this outcome
    assert res["pairs"][0]["auc_delong"]["p"] < 0.05


def test_nomogram_of_a_binary_model(cohort: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(_binary_model(cohort, monkeypatch))
    test = pd.read_csv(cohort / "binary.csv")
    spec = nomogram_spec(model, test)
    assert axes(model, spec)[-1][0] == "P(outcome)"
    sub = test.iloc[:8]
    expected = 1 / (1 + np.exp(-score_frame(model, sub).scores))
    totals = [spec.total_points(rec) for rec in sub.to_dict(orient="records")]
    assert np.allclose(points_to_risk(model, spec, totals), expected, atol=1e-9)


def test_td_roc_curve_area_is_sksurv_td_auc(cohort: Path) -> None:
    """The drawn time-dependent ROC curve has the area scikit-survival reports."""
    from pipelines.survival.compare import _td_auc_at, td_roc_curve

    test = pd.read_csv(cohort / "test.csv")
    t, e = test["time"].to_numpy(float), test["event"].to_numpy(bool)
    s = score_frame(load_model(cohort / "strong"), test).scores
    fpr, tpr = td_roc_curve(t, e, s, H)
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(_td_auc_at(t, e, s, H), abs=1e-9)
