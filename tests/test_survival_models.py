"""Survival models against independent implementations, artifacts, scoring and metrics.

Real data: the shared HNSCC cohort (CC BY-NC: read in place, never copied into the repository).
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.survival import metrics
from pipelines.survival.artifact import ArtifactError, load_model, save_model
from pipelines.survival.data import Cohort, CohortError, cohort_from_frame, load_cohort
from pipelines.survival.design import fit_design
from pipelines.survival.fit import FitOptions, breslow_survival, fit_model
from pipelines.survival.scoring import score, score_frame

TIME, EVENT = "Survival  (months)", "Overall Survival Censor"
SMI = "Pre-RT L3 Skeletal Muscle Index (cm2/m2)"
SM_AREA = "Pre-RT L3 Skeletal Muscle Cross Sectional Area (cm2)"
FAT_AREA = "Pre-RT L3 Adipose Tissue Cross Sectional Area (cm2)"
SARCO = "PreRT Skeletal Muscle status"
NUMERIC = ("Age", SMI, SM_AREA, FAT_AREA, "BMI start treat (kg/m2)")


@pytest.fixture(scope="session")
def hnscc(shared_data: Path) -> Cohort:
    return load_cohort(shared_data / "survival_csv_hn" / "HNSCC_clinical.csv", TIME, EVENT, "months")


@pytest.fixture(scope="session")
def cox_model(hnscc: Cohort):  # type: ignore[no-untyped-def]
    return fit_model(hnscc, FitOptions(kind="cox", features=("Age", "Sex", SMI, SARCO), n_boot=50))


def test_cohort_matches_readme(hnscc: Cohort) -> None:
    assert hnscc.n == 215 and hnscc.events == 77
    assert hnscc.time_days.max() > 3000  # months were converted to days


def test_cohort_errors_name_the_column(shared_data: Path) -> None:
    with pytest.raises(CohortError, match="did you mean 'Survival  \\(months\\)'"):
        load_cohort(shared_data / "survival_csv_hn" / "HNSCC_clinical.csv", "Survival (months)", EVENT)
    with pytest.raises(CohortError, match="0 \\(censored\\) or 1"):
        cohort_from_frame(pd.DataFrame({"t": [1, 2], "e": [0, 2]}), "t", "e")


def test_cox_lifelines_matches_scikit_survival(hnscc: Cohort) -> None:
    """Same standardised design, Efron ties: coefficients agree to 1e-3 relative, C-index equal."""
    from lifelines import CoxPHFitter
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    design = fit_design(hnscc.frame, [*NUMERIC, "Sex", SARCO])
    x, _ = design.transform(hnscc.frame, impute=True)
    df = pd.DataFrame(x, columns=list(design.columns))
    df["T"], df["E"] = hnscc.time_days, hnscc.event.astype(int)
    ll = CoxPHFitter().fit(df, "T", "E")
    sk = CoxPHSurvivalAnalysis(ties="efron").fit(x, Surv.from_arrays(hnscc.event, hnscc.time_days))
    b_ll = ll.params_[list(design.columns)].to_numpy()
    np.testing.assert_allclose(sk.coef_, b_ll, rtol=1e-3, atol=1e-5)
    c_ll = metrics.harrell_c(hnscc.time_days, hnscc.event, x @ b_ll)
    c_sk = metrics.harrell_c(hnscc.time_days, hnscc.event, sk.predict(x))
    assert c_ll == pytest.approx(c_sk, abs=1e-12)
    # lifelines' own concordance (higher = longer survival) is the same number
    assert ll.concordance_index_ == pytest.approx(c_ll, abs=1e-9)


def test_harrell_c_matches_lifelines(hnscc: Cohort) -> None:
    from lifelines.utils import concordance_index

    s = hnscc.frame["Age"].to_numpy(dtype=float) / 10 - hnscc.frame[SMI].to_numpy(dtype=float) / 20
    ours = metrics.harrell_c(hnscc.time_days, hnscc.event, s)
    assert ours == pytest.approx(concordance_index(hnscc.time_days, -s, hnscc.event), abs=1e-9)


def test_lasso_cox_coxnet_matches_lifelines_penalizer(hnscc: Cohort) -> None:
    """Coxnet (exact L1, Breslow) against lifelines penalizer with l1_ratio=1 (smooth L1, Efron)."""
    from lifelines import CoxPHFitter

    model = fit_model(hnscc, FitOptions(kind="lasso-cox", features=(*NUMERIC, "Sex", SARCO), n_boot=20,
                                        seed=3))
    alpha = model.fit_details["alpha"]
    assert model.fit_details["folds"] == 5 and len(model.fit_details["cv_c_index_mean"]) == len(
        model.fit_details["alphas"])
    x, _ = model.design.transform(hnscc.frame, impute=True)
    df = pd.DataFrame(x, columns=list(model.design.columns))
    df["T"], df["E"] = hnscc.time_days, hnscc.event.astype(int)
    ll = CoxPHFitter(penalizer=alpha, l1_ratio=1.0).fit(df, "T", "E")
    b_ll = ll.params_[list(model.design.columns)].to_numpy()
    b_cn = np.asarray(model.coefficients)
    # smooth-L1 and tie handling differ a little: agreement to 0.02 on the standardised scale
    np.testing.assert_allclose(b_ll, b_cn, atol=0.02)
    big = np.abs(b_cn) > 0.05
    assert (np.sign(b_ll[big]) == np.sign(b_cn[big])).all()
    s_cn = x @ b_cn
    assert metrics.harrell_c(hnscc.time_days, hnscc.event, x @ b_ll) == pytest.approx(
        metrics.harrell_c(hnscc.time_days, hnscc.event, s_cn), abs=0.01)


def test_breslow_baseline_matches_lifelines(hnscc: Cohort, cox_model) -> None:  # type: ignore[no-untyped-def]
    from lifelines import CoxPHFitter

    x, _ = cox_model.design.transform(hnscc.frame, impute=True)
    df = pd.DataFrame(x, columns=list(cox_model.design.columns))
    df["T"], df["E"] = hnscc.time_days, hnscc.event.astype(int)
    ll = CoxPHFitter().fit(df, "T", "E")
    for t in (365.25, 1826.0):
        ours = cox_model.baseline_survival[t]
        bs = ll.baseline_survival_
        theirs = float(bs[bs.index <= t].iloc[-1, 0])
        assert ours == pytest.approx(theirs, abs=1e-6)
    # a patient's horizon probability equals lifelines' predicted survival
    row = hnscc.frame.iloc[[7]]
    risk = score(cox_model, row.iloc[0].to_dict())
    surv = float(ll.predict_survival_function(df.iloc[[7]], times=[1826.0]).iloc[0, 0])
    assert risk.horizon_probability == pytest.approx(1 - surv, abs=1e-6)


def test_breslow_on_toy_data() -> None:
    t = np.array([1.0, 2.0, 2.0, 3.0])
    e = np.array([True, True, False, True])
    s = breslow_survival(t, e, np.zeros(4), [0.5, 1.0, 2.5, 3.0])
    assert s[0.5] == 1.0
    assert s[1.0] == pytest.approx(math.exp(-1 / 4))
    assert s[2.5] == pytest.approx(math.exp(-(1 / 4 + 1 / 3)))
    assert s[3.0] == pytest.approx(math.exp(-(1 / 4 + 1 / 3 + 1)))


def test_logistic_excludes_censored_before_horizon(hnscc: Cohort) -> None:
    from sklearn.linear_model import LogisticRegression

    m = fit_model(hnscc, FitOptions(kind="logistic", features=("Age", SMI), horizon_days=1826.0, n_boot=20))
    keep = (hnscc.time_days >= 1826.0) | hnscc.event
    assert m.training["excluded_censored"] == int((~keep).sum()) > 0
    assert m.training["n"] == 215  # the card reports the whole cohort and the exclusions
    # independent fit (lbfgs with a tiny penalty) on the same rows gives the same coefficients
    x, _ = m.design.transform(hnscc.frame.loc[keep].reset_index(drop=True), impute=True)
    y = (hnscc.event & (hnscc.time_days <= 1826.0))[keep]
    ref = LogisticRegression(C=1e8, max_iter=5000).fit(x, y)
    np.testing.assert_allclose(m.coefficients, ref.coef_[0], atol=1e-3)
    r = score(m, {"Age": 60, SMI: 45.0})
    assert r.horizon_probability == pytest.approx(1 / (1 + math.exp(-r.score)))  # type: ignore[operator]


def test_pca_fusion_groups(hnscc: Cohort) -> None:
    groups = {"body": [SMI, SM_AREA, FAT_AREA, "BMI start treat (kg/m2)"]}
    m = fit_model(hnscc, FitOptions(kind="cox", features=("Age", *groups["body"]), groups=groups,
                                    pca_variance=0.8, n_boot=20))
    g = m.design.pca_groups[0]
    assert sum(g.explained_variance_ratio) >= 0.8
    assert m.design.columns[0] == "Age" and all(c.startswith("body:PC") for c in m.design.columns[1:])
    x, _ = m.design.transform(hnscc.frame, impute=True)
    np.testing.assert_allclose(x[:, 1:].std(axis=0, ddof=1), 1.0, rtol=1e-9)  # scores standardised


def test_artifact_round_trip_and_card(tmp_path: Path, hnscc: Cohort, cox_model) -> None:  # type: ignore[no-untyped-def]
    save_model(cox_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    a = score_frame(cox_model, hnscc.frame)
    b = score_frame(loaded, hnscc.frame)
    np.testing.assert_array_equal(a.scores, b.scores)
    data = json.loads((tmp_path / "m" / "model.json").read_text())
    assert data["schema_version"] == 1 and data["kind"] == "cox"
    assert {"coefficients", "preprocessing", "baseline_survival", "risk_groups", "training"} <= set(data)
    card = (tmp_path / "m" / "MODEL_CARD.md").read_text()
    for needle in ("Research use only", "Patients: 215, events: 77", "95% CI", "## Limitations", "version 1.0.0"):
        assert needle in card


def test_loader_refuses_pickles_and_unknown_versions(tmp_path: Path, cox_model) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ArtifactError, match="never loads"):
        load_model(folder)
    with pytest.raises(ArtifactError, match="refusing"):
        load_model(folder / "model.pkl")
    (folder / "model.json").write_bytes(pickle.dumps({"x": 1}))  # a pickle under the JSON name
    with pytest.raises(ArtifactError, match="pickle"):
        load_model(folder)
    save_model(cox_model, tmp_path / "ok")
    data = json.loads((tmp_path / "ok" / "model.json").read_text())
    for key, value, msg in (("schema_version", 2, "not supported"), ("schema", "other", "schema"),
                            ("kind", "forest", "kind")):
        bad = dict(data, **{key: value})
        (tmp_path / "ok" / "model.json").write_text(json.dumps(bad))
        with pytest.raises(ArtifactError, match=msg):
            load_model(tmp_path / "ok")
    bad = json.loads(json.dumps(data))
    bad["coefficients"]["Age"] = "__import__('os').system('false')"
    (tmp_path / "ok" / "model.json").write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="finite number"):
        load_model(tmp_path / "ok")
    (tmp_path / "ok" / "model.json").write_text(json.dumps(data).replace('"Age": ', '"Age": NaN, "x": ', 1))
    with pytest.raises(ArtifactError):
        load_model(tmp_path / "ok")


def test_missing_inputs_are_not_evaluable(cox_model) -> None:  # type: ignore[no-untyped-def]
    ok = score(cox_model, {"Age": 60, "Sex": "Male", SMI: 50.0, SARCO: "SM depleted"})
    assert ok.evaluable and ok.group in ("low", "high") and 0 < ok.horizon_probability < 1  # type: ignore[operator]
    r = score(cox_model, {"Age": 60, "Sex": "Male", SMI: None})
    assert not r.evaluable and r.score is None and r.label == "not evaluable"
    assert f"{SMI}: missing" in r.reason and f"{SARCO}: missing" in r.reason
    r = score(cox_model, {"Age": "sixty", "Sex": "Robot", SMI: 50.0, SARCO: "SM depleted"})
    assert "Age: not a number" in r.reason and "level 'Robot' not seen in training" in r.reason
    # a model that says it imputes does so, and its card says so
    imputing = fit_model_imputing(cox_model)
    assert score(imputing, {"Age": 60, "Sex": "Male"}).evaluable


def fit_model_imputing(model):  # type: ignore[no-untyped-def]
    from dataclasses import replace

    return replace(model, design=replace(model.design, impute_at_prediction=True))


def test_km_logrank_sarcopenia_matches_scikit_survival(hnscc: Cohort) -> None:
    """Log-rank for pre-RT sarcopenia status: lifelines (via our metrics) against sksurv."""
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    groups = hnscc.frame[SARCO].astype(str).tolist()
    km = metrics.km_by_group(hnscc.time_days, hnscc.event, groups, horizon=1826.0)
    chi2, p = compare_survival(Surv.from_arrays(hnscc.event, hnscc.time_days), np.asarray(groups))
    assert km["logrank_p"] == pytest.approx(p, rel=1e-6)
    assert km["logrank_statistic"] == pytest.approx(chi2, rel=1e-6)
    assert sum(g["n"] for g in km["groups"]) == 215
    assert {g["group"] for g in km["groups"]} == {"SM depleted", "SM not depleted"}


def test_uno_td_auc_calibration_net_benefit(hnscc: Cohort, cox_model) -> None:  # type: ignore[no-untyped-def]
    from pipelines.survival.evaluate import evaluate

    r = evaluate(cox_model, hnscc, n_boot=50, seed=1)
    assert r["c_index_ci"][0] < r["c_index"] < r["c_index_ci"][1]
    assert evaluate(cox_model, hnscc, n_boot=50, seed=1)["c_index_ci"] == r["c_index_ci"]
    assert 0.5 < r["uno_c_index"] < 1 and r["uno_tau_days"] == 1826.0
    assert r["td_auc"]["times_days"] and all(0 <= a <= 1 for a in r["td_auc"]["auc"])
    cal = r["calibration"]
    assert cal["observed_expected"] == pytest.approx(1.0, abs=0.2)  # apparent calibration of a Cox fit
    assert cal["calibration_slope"] == pytest.approx(1.0, abs=1e-3)  # refit on its own data: slope 1
    nb = r["net_benefit"]
    s5 = metrics.km_at(hnscc.time_days, hnscc.event, 1826.0)[0]
    assert nb["treat_all"][0] == pytest.approx((1 - s5) - s5 * 0.01 / 0.99)
    assert nb["model"][0] == pytest.approx(nb["treat_all"][0], abs=0.01)  # at 1% everyone is treated
    assert r["hazard_ratios"][0]["term"] == "score per SD" and r["hazard_ratios"][0]["ratio"] > 1
    json.dumps(r, allow_nan=False)


def test_km_at_matches_lifelines(hnscc: Cohort) -> None:
    from lifelines import KaplanMeierFitter

    km = KaplanMeierFitter().fit(hnscc.time_days, hnscc.event)
    ci = km.confidence_interval_survival_function_
    for t in (200.0, 1000.0, 1826.0, 3000.0):
        s, lo, hi = metrics.km_at(hnscc.time_days, hnscc.event, t)
        assert s == pytest.approx(float(km.survival_function_at_times(t).iloc[0]), abs=1e-12)
        row = ci[ci.index <= t].iloc[-1]
        assert (lo, hi) == pytest.approx((float(row.iloc[0]), float(row.iloc[1])), abs=1e-9)


def test_per_level_hazard_ratio_for_sarcopenia(hnscc: Cohort) -> None:
    """The card's per-level HR (SM depleted vs not) equals a Cox fit on the raw 0/1 indicator."""
    from lifelines import CoxPHFitter

    m = fit_model(hnscc, FitOptions(kind="cox", features=(SARCO,), n_boot=20))
    per = m.hazard_ratios[0]["per_unit"]
    df = pd.DataFrame({"dep": (hnscc.frame[SARCO] == "SM depleted").astype(float),
                       "T": hnscc.time_days, "E": hnscc.event.astype(int)})
    s = CoxPHFitter().fit(df, "T", "E").summary.loc["dep"]
    assert per["ratio"] == pytest.approx(s["exp(coef)"], rel=1e-4)
    assert (per["lower"], per["upper"]) == pytest.approx((s["exp(coef) lower 95%"], s["exp(coef) upper 95%"]), rel=1e-4)
