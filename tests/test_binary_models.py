"""Binary outcomes (``--kind binary``), the default feature set (no ``--features``, ``--exclude``) and
``--censoring ipcw`` for logistic-at-horizon models.

Synthetic cohorts with a known signal (a logistic model of two real features plus noise features; an
exponential survival model with independent uniform censoring), and the shared HNSCC cohort (CC BY-NC:
read in place, never copied into the repository).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest

from pipelines.survival import metrics
from pipelines.survival.binary import auc, binary_from_frame, logistic_path
from pipelines.survival.data import cohort_from_frame
from pipelines.survival.fit import FitError, FitOptions, fit_model, ipcw_weights
from pipelines.survival.scoring import score_frame
from tests.test_survival_cli import EVENT, TIME, cli, inproc

NOISE = [f"noise{i}" for i in range(8)]
# HNSCC columns that are outcomes (or recorded after them): --exclude them from the default features
HN_OUTCOMES = ["Follow up duration (day)", "Follow up duration (year)", "Follow up duration (month)",
               "Date of Death", "Alive or Dead", "Cause of Death", "Date of recurrence",
               "Disease-free interval (months)", "Site of recurrence (Distal/Local/ Locoregional)",
               "Disease Specific Survival Censor", "Loco-regional Control Censor", "Last Contact Date",
               "Unplanned Additional Oncologic Treatment"]


def binary_table(n: int, seed: int) -> pd.DataFrame:
    """y ~ Bernoulli(sigmoid(-0.3 + 1.2 a - 1.0 b)); 8 noise features; a patient code and a row number."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 10))
    y = rng.random(n) < 1 / (1 + np.exp(-(-0.3 + 1.2 * x[:, 0] - 1.0 * x[:, 1])))
    frame = pd.DataFrame(x, columns=["a", "b", *NOISE])
    frame.insert(0, "patient", [f"P{seed}-{i:04d}" for i in range(n)])
    frame.insert(1, "row", np.arange(1, n + 1))
    frame["mvi"] = y.astype(int)
    return frame


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("binary")
    binary_table(400, 1).to_csv(d / "train.csv", index=False)
    binary_table(400, 2).to_csv(d / "test.csv", index=False)
    return d


@pytest.fixture(scope="module")
def binary_model(tables: Path) -> tuple[Path, str]:
    """`prognode model fit --kind binary` without --features, through the console entry (node/cli.py)."""
    out = tables / "mvi-model"
    r = cli("model", "fit", "--data", tables / "train.csv", "--kind", "binary", "--outcome", "mvi",
            "--one-se", "--n-boot", "50", "--seed", "3", "--out", out)
    return out, r.stdout


def test_binary_fit_drops_identifiers_and_most_noise(binary_model: tuple[Path, str]) -> None:
    out, stdout = binary_model
    assert "fitted binary on 400 patients" in stdout
    assert "dropped 'patient': identifies rows" in stdout and "dropped 'row': identifies rows" in stdout
    m = json.loads((out / "model.json").read_text())
    assert m["kind"] == "binary" and m["horizon_days"] is None
    assert [f["name"] for f in m["preprocessing"]["features"]] == ["a", "b", *NOISE]
    sel = m["training"]["feature_selection"]
    assert {d["column"] for d in sel["dropped"]} == {"patient", "row"} and sel["outcome_columns"] == ["mvi"]
    kept = m["fit_details"]["selected"]
    assert {"a", "b"} <= set(kept)
    assert len(set(kept) & set(NOISE)) <= 2, kept  # L1 at the one-SE penalty drops the noise
    coef = m["coefficients"]
    assert coef["a"] > 0.5 and coef["b"] < -0.4  # signs of the truth, shrunk toward 0 by the penalty
    assert m["fit_details"]["l1_ratio"] == 1.0 and m["fit_details"]["rule"] == "one-se"
    assert m["metrics"]["cross-validation"]["auc"] > 0.7
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Columns used and dropped" in card and "`patient`: identifies rows" in card
    assert "Outcome column `mvi`" in card and "AUC" in card
    assert not [p for p in out.iterdir() if p.suffix not in (".json", ".md")]


def test_binary_evaluate_json_on_held_out(binary_model: tuple[Path, str], tables: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = binary_model
    r = cli("model", "evaluate", "--model", out, "--data", tables / "test.csv", "--json", "--n-boot", "100",
            "--seed", "5")
    res = json.loads(r.stdout)
    assert res["n"] == 400 and res["events"] == int(pd.read_csv(tables / "test.csv")["mvi"].sum())
    assert res["auc"] > 0.75  # truth: AUC of the true log-odds on this design is about 0.8
    lo, hi = res["auc_ci"]
    assert lo < res["auc"] < hi and hi - lo < 0.15
    cal = res["calibration"]
    # the one-SE penalty shrinks the log-odds toward 0: predictions too moderate, slope above 1
    assert 1.0 < cal["slope"] < 2.5 and abs(cal["intercept"]) < 0.4
    assert cal["calibration_slope"] == cal["slope"] and cal["slope_ci"][0] < cal["slope"] < cal["slope_ci"][1]
    nb = res["net_benefit"]
    assert len(nb["thresholds"]) == len(nb["model"]) == len(nb["treat_all"]) and nb["treat_none"][0] == 0
    i = nb["thresholds"].index(0.5)
    assert nb["model"][i] > max(nb["treat_all"][i], 0)
    # seeded: the same bootstrap again, in-process; a different seed gives another interval
    code, again, _ = inproc(capsys, "model", "evaluate", "--model", out, "--data", tables / "test.csv", "--json",
                            "--n-boot", "100", "--seed", "5")
    assert code == 0 and json.loads(again)["auc_ci"] == res["auc_ci"]
    code, text, _ = inproc(capsys, "model", "evaluate", "--model", out, "--data", tables / "test.csv",
                           "--n-boot", "20")
    assert code == 0 and "AUC" in text and "calibration slope=" in text and "net benefit" in text


def test_min_deviance_rule_shrinks_the_noise(tables: Path) -> None:
    """The default rule (minimum CV deviance) predicts best and keeps some noise, shrunk near zero."""
    from pipelines.survival.binary import fit_binary

    cohort = binary_from_frame(pd.read_csv(tables / "train.csv"), "mvi")
    model = fit_binary(cohort, FitOptions(kind="binary", features=("a", "b", *NOISE), horizon_days=None, n_boot=10,
                                          outcome_column="mvi"))
    coef = dict(zip(model.design.columns, model.coefficients, strict=True))
    assert coef["a"] > 0.8 and coef["b"] < -0.6
    assert max(abs(coef[c]) for c in NOISE) < 0.3
    assert model.fit_details["rule"] == "min deviance"


def test_penalised_path_matches_scikit_learn() -> None:
    """Our FISTA solution equals scikit-learn's saga at C = 1/(n*lambda), L1 and elastic net."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 6))
    y = rng.random(120) < 1 / (1 + np.exp(-(x[:, 0] - 0.7 * x[:, 1])))
    for r in (1.0, 0.5):
        lam = 0.03
        (b0, w), = logistic_path(x, y, [lam], r, tol=1e-10, max_iter=50_000)
        sk = LogisticRegression(C=1 / (120 * lam), l1_ratio=r, solver="saga", tol=1e-10, max_iter=100_000,
                                random_state=0).fit(x, y.astype(int))
        np.testing.assert_allclose(w, sk.coef_[0], atol=2e-5)
        assert b0 == pytest.approx(float(sk.intercept_[0]), abs=2e-5)


def test_auc_matches_scikit_learn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.asarray(np.round(rng.standard_normal(200) + y, 1), dtype=np.float64)  # rounded: many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError):
        auc(np.zeros(5, dtype=bool), np.arange(5, dtype=np.float64))


def test_elastic_net_chooses_its_mix(tables: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = inproc(capsys, "model", "fit", "--data", tables / "train.csv", "--kind", "binary", "--outcome",
                            "mvi", "--features", "a", "b", "noise0", "noise1", "--penalty", "elasticnet",
                            "--l1-ratios", "0.3", "0.9", "--n-boot", "20", "--out", tmp_path / "en")
    assert code == 0, err
    d = json.loads((tmp_path / "en" / "model.json").read_text())["fit_details"]
    assert d["penalty"] == "elasticnet" and d["l1_ratio"] in (0.3, 0.9) and len(d["path"]) == 2
    assert "feature_selection" not in json.loads((tmp_path / "en" / "model.json").read_text())["training"]


@pytest.mark.parametrize(("args", "message"), [
    (("--kind", "binary", "--outcome", "mvi", "--time", "a"), "--kind binary takes a 0/1 --outcome column"),
    (("--kind", "binary", "--outcome", "mvi", "--event", "mvi"), "--event cannot be used with it"),
    (("--kind", "binary"), "--kind binary needs --outcome"),
    (("--kind", "cox", "--outcome", "mvi"), "--outcome is for --kind binary"),
    (("--kind", "cox", "--time", "a"), "needs --time and --event"),
    (("--kind", "binary", "--outcome", "a"), "are not 0 or 1"),
    (("--kind", "binary", "--outcome", "mvi", "--features", "a", "--exclude", "b"), "--exclude only applies"),
    (("--kind", "binary", "--outcome", "mvi", "--exclude", "nope"), "--exclude names columns not in the table"),
    (("--kind", "binary", "--outcome", "MVI"), "did you mean 'mvi'"),
])
def test_refusals_name_the_problem(args: tuple[str, ...], message: str, tables: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = inproc(capsys, "model", "fit", "--data", tables / "train.csv", *args, "--out", tmp_path / "x")
    assert code == 2 and message in err, err
    assert not (tmp_path / "x").exists()


def survival_table(n: int, seed: int, horizon: float) -> tuple[pd.DataFrame, npt.NDArray[np.float64]]:
    """Exponential times, hazard 0.7/h * exp(0.8 x); independent uniform censoring on (0, 2.5 h)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    rate = 0.7 / horizon * np.exp(0.8 * x)
    t, c = rng.exponential(1 / rate), rng.uniform(0, 2.5 * horizon, n)
    frame = pd.DataFrame({"id": np.arange(n), "x": x, "noise": rng.standard_normal(n),
                          "t": np.minimum(t, c), "e": (t <= c).astype(int)})
    return frame, 1 - np.exp(-rate * horizon)


def test_survival_fit_without_features_and_exclude(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An all-numeric table: every column but time and event is used, the row-number ID is dropped."""
    frame, _ = survival_table(200, 4, 365.0)
    frame.to_csv(tmp_path / "c.csv", index=False)
    code, out, err = inproc(capsys, "model", "fit", "--data", tmp_path / "c.csv", "--time", "t", "--event", "e",
                            "--kind", "cox", "--horizon", "365", "--n-boot", "20", "--out", tmp_path / "all")
    assert code == 0, err
    assert "dropped 'id': identifies rows" in out
    m = json.loads((tmp_path / "all" / "model.json").read_text())
    assert list(m["coefficients"]) == ["x", "noise"]
    assert m["hazard_ratios"][0]["lower"] > 1  # x carries the signal
    code, out, err = inproc(capsys, "model", "fit", "--data", tmp_path / "c.csv", "--time", "t", "--event", "e",
                            "--kind", "cox", "--exclude", "noise", "--n-boot", "20", "--out", tmp_path / "ex")
    assert code == 0, err
    m = json.loads((tmp_path / "ex" / "model.json").read_text())
    assert list(m["coefficients"]) == ["x"] and m["training"]["feature_selection"]["excluded"] == ["noise"]
    assert "`noise` (`--exclude`)" in (tmp_path / "ex" / "MODEL_CARD.md").read_text()
    code, _, err = inproc(capsys, "model", "fit", "--data", tmp_path / "c.csv", "--time", "t", "--event", "e",
                          "--kind", "cox", "--censoring", "ipcw", "--out", tmp_path / "no")
    assert code == 2 and "--censoring is for --kind logistic" in err


def test_ipcw_is_closer_to_the_truth_than_complete_case() -> None:
    h = 365.0
    frame, truth = survival_table(800, 3, h)
    cohort = cohort_from_frame(frame, "t", "e")
    err = {}
    for censoring in ("exclude", "ipcw"):
        model = fit_model(cohort, FitOptions(kind="logistic", features=("x",), horizon_days=h, censoring=censoring,
                                             n_boot=20, time_column="t", event_column="e"))
        p = 1 / (1 + np.exp(-score_frame(model, frame).scores))
        err[censoring] = float(np.mean(np.abs(p - truth)))
        assert model.training["censoring"] == censoring
    # complete case over-represents events (the censored were event-free so far); IPCW removes that
    assert err["ipcw"] < 0.5 * err["exclude"] and err["ipcw"] < 0.03, err
    # the weights reproduce the Kaplan-Meier risk at the horizon exactly and sum to n
    w = ipcw_weights(cohort.time_days, cohort.event, h)
    y = cohort.event & (cohort.time_days <= h)
    assert float(np.sum(w * y)) / cohort.n == pytest.approx(1 - metrics.km_at(cohort.time_days, cohort.event, h)[0])
    assert float(np.sum(w)) == pytest.approx(cohort.n)
    assert np.all(w[(cohort.time_days < h) & ~cohort.event] == 0)
    with pytest.raises(FitError, match="applies to --kind logistic"):
        fit_model(cohort, FitOptions(kind="cox", features=("x",), censoring="ipcw"))


def test_ipcw_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    frame, _ = survival_table(300, 5, 365.0)
    frame.to_csv(tmp_path / "c.csv", index=False)
    code, out, err = inproc(capsys, "model", "fit", "--data", tmp_path / "c.csv", "--time", "t", "--event", "e",
                            "--kind", "logistic", "--horizon", "365", "--censoring", "ipcw", "--features", "x",
                            "--n-boot", "20", "--out", tmp_path / "ipcw")
    assert code == 0, err
    assert "censoring: ipcw" in out
    card = (tmp_path / "ipcw" / "MODEL_CARD.md").read_text()
    assert "Censoring: **IPCW**" in card
    code, out, _ = inproc(capsys, "model", "fit", "--data", tmp_path / "c.csv", "--time", "t", "--event", "e",
                          "--kind", "logistic", "--horizon", "365", "--features", "x", "--n-boot", "20",
                          "--out", tmp_path / "cc")
    assert code == 0 and "censoring: exclude" in out
    assert "Censoring: **excluded**" in (tmp_path / "cc" / "MODEL_CARD.md").read_text()
    res = json.loads(inproc(capsys, "model", "evaluate", "--model", tmp_path / "ipcw", "--data", tmp_path / "c.csv",
                            "--json", "--n-boot", "20")[1])
    assert res["c_index"] > 0.6 and res["calibration"]["groups"]


def test_binary_cohort_refuses_missing_outcomes() -> None:
    from pipelines.survival.data import CohortError

    with pytest.raises(CohortError, match="1 rows are not 0 or 1"):
        binary_from_frame(pd.DataFrame({"y": [0, 1, None], "x": [1, 2, 3]}), "y")


def test_hnscc_default_features(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real table: no --features, the other outcome columns --exclude'd; survival and binary fit and evaluate."""
    src = shared_data / "survival_csv_hn" / "HNSCC_clinical.csv"
    code, _, err = inproc(capsys, "cohort", "split", "--data", src, "--test-fraction", "0.3", "--seed", "7",
                          "--stratify", EVENT, "--out-dir", tmp_path / "split")
    assert code == 0, err
    train, test = tmp_path / "split" / "train.csv", tmp_path / "split" / "test.csv"
    code, out, err = inproc(capsys, "model", "fit", "--data", train, "--time", TIME, "--time-unit", "months",
                            "--event", EVENT, "--kind", "lasso-cox", "--exclude", *HN_OUTCOMES,
                            "--impute-at-prediction", "--n-boot", "20", "--out", tmp_path / "cox")
    assert code == 0, err
    assert "dropped 'TCIA code': identifies rows" in out and "dropped 'Date of Diagnosis': text with" in out
    used = json.loads((tmp_path / "cox" / "model.json").read_text())["training"]["feature_selection"]["used"]
    assert "Age" in used and not set(used) & {*HN_OUTCOMES, TIME, EVENT}
    res = json.loads(inproc(capsys, "model", "evaluate", "--model", tmp_path / "cox", "--data", test, "--json",
                            "--n-boot", "20")[1])
    assert res["n"] == 64 and 0 <= res["c_index"] <= 1  # imputes at prediction: every test patient scored
    # binary: death by last contact as a yes/no outcome, the follow-up columns excluded
    code, out, err = inproc(capsys, "model", "fit", "--data", train, "--kind", "binary", "--outcome", EVENT,
                            "--exclude", TIME, *HN_OUTCOMES, "--impute-at-prediction", "--n-boot", "20",
                            "--out", tmp_path / "bin")
    assert code == 0, err
    res = json.loads(inproc(capsys, "model", "evaluate", "--model", tmp_path / "bin", "--data", test, "--json",
                            "--n-boot", "50")[1])
    assert res["n"] == 64 and res["events"] == 23 and 0 <= res["auc"] <= 1 and len(res["auc_ci"]) == 2
    assert set(res["calibration"]) >= {"slope", "intercept"} and res["net_benefit"]["thresholds"]
