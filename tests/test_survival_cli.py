"""``prognode model fit|evaluate|report`` and ``cohort split`` through the command line, on HNSCC.

The main checks run ``python -m node`` as a subprocess (node/cli.py loads ``register`` through
EXTENSIONS); secondary checks call ``pipelines.survival.cli.main`` in-process.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.peers import REPO

TIME, EVENT = "Survival  (months)", "Overall Survival Censor"
SMI = "Pre-RT L3 Skeletal Muscle Index (cm2/m2)"
SARCO = "PreRT Skeletal Muscle status"


def cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``prognode ...`` as the console script runs it: node/cli.py with its EXTENSIONS."""
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-m", "node", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def inproc(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """The same CLI in this process (cheaper than a subprocess for the secondary checks)."""
    from pipelines.survival.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def split(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    r = cli("cohort", "split", "--data", shared_data / "survival_csv_hn" / "HNSCC_clinical.csv",
            "--test-fraction", "0.3", "--seed", "7", "--stratify", EVENT, "--out-dir", out)
    assert "train.csv (151 rows)" in r.stdout and "test.csv (64 rows)" in r.stdout
    return out


def test_split_is_seeded_stratified_and_disjoint(split: Path, shared_data: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    train, test = pd.read_csv(split / "train.csv"), pd.read_csv(split / "test.csv")
    assert set(train["TCIA code"]).isdisjoint(test["TCIA code"]) and len(train) + len(test) == 215
    assert test[EVENT].sum() == round(0.3 * 77)  # stratified on the event
    inproc(capsys, "cohort", "split", "--data", shared_data / "survival_csv_hn" / "HNSCC_clinical.csv",
           "--test-fraction", "0.3", "--seed", "7", "--stratify", EVENT, "--out-dir", tmp_path)
    assert (tmp_path / "test.csv").read_bytes() == (split / "test.csv").read_bytes()
    assert json.loads((split / "split.json").read_text())["seed"] == 7


@pytest.mark.parametrize("kind", ["cox", "lasso-cox", "logistic"])
def test_fit_and_evaluate_each_kind(kind: str, split: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"hn-{kind}"
    r = cli("model", "fit", "--data", split / "train.csv", "--time", TIME, "--event", EVENT, "--time-unit", "months",
            "--kind", kind, "--features", "Age", "Sex", "Stage", SMI, SARCO, "--horizon", "1826",
            "--n-boot", "20", "--out", out)
    assert f"fitted {kind} on 151 patients" in r.stdout
    assert (out / "model.json").is_file() and (out / "MODEL_CARD.md").is_file()
    assert not list(out.glob("*.pkl"))
    r = cli("model", "evaluate", "--model", out, "--data", split / "test.csv", "--json", "--n-boot", "20")
    res = json.loads(r.stdout)
    assert res["n"] + res["n_not_evaluable"] == 64
    assert 0 <= res["c_index"] <= 1 and len(res["c_index_ci"]) == 2
    assert res["c_index_ci"][0] <= res["c_index"] <= res["c_index_ci"][1]
    for key in ("uno_c_index", "uno_c_index_ci", "td_auc", "calibration", "hazard_ratios", "kaplan_meier",
                "net_benefit", "model_hazard_ratios"):
        assert key in res, key
    assert res["kaplan_meier"]["logrank_p"] is not None
    assert res["calibration"]["groups"] and res["net_benefit"]["treat_none"][0] == 0
    if kind == "cox":
        code, text, _ = inproc(capsys, "model", "evaluate", "--model", out, "--data", split / "test.csv",
                               "--n-boot", "20")
        assert code == 0 and "Harrell C" in text and "log-rank p=" in text and "net benefit" in text


def test_evaluate_counts_missing_inputs_as_not_evaluable(split: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    inproc(capsys, "model", "fit", "--data", split / "train.csv", "--time", TIME, "--event", EVENT, "--time-unit", "months",
        "--kind", "cox", "--features", "Age", SMI, "--n-boot", "20", "--out", out)
    test = pd.read_csv(split / "test.csv")
    test.loc[:4, SMI] = None
    test.to_csv(tmp_path / "holes.csv", index=False)
    res = json.loads(inproc(capsys, "model", "evaluate", "--model", out, "--data", tmp_path / "holes.csv",
                            "--json", "--n-boot", "20")[1])
    assert res["n_not_evaluable"] == 5 and res["n"] == 59
    assert res["not_evaluable_reasons"] == {f"{SMI}: missing": 5}


def test_report_is_self_contained_html_with_plots(split: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    inproc(capsys, "model", "fit", "--data", split / "train.csv", "--time", TIME, "--event", EVENT, "--time-unit", "months",
        "--kind", "cox", "--features", "Age", "Sex", SMI, "--n-boot", "20", "--out", out)
    html = tmp_path / "report.html"
    inproc(capsys, "model", "report", "--model", out, "--data", split / "test.csv", "--out", html, "--n-boot", "20")
    text = html.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)
    assert {alt for alt, _ in images} >= {"Kaplan-Meier by risk group", "time-dependent AUC", "calibration",
                                          "decision curve", "forest plot"}
    for _, b64 in images:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "Research use only" in text


def test_pca_group_option_and_errors(split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pca"
    body = f"body={SMI},Pre-RT L3 Skeletal Muscle Cross Sectional Area (cm2),Pre-RT L3 Adipose Tissue Cross Sectional Area (cm2)"
    inproc(capsys, "model", "fit", "--data", split / "train.csv", "--time", TIME, "--event", EVENT, "--time-unit",
           "months", "--kind", "cox", "--features", "Age", "--group", body, "--pca-variance", "0.9", "--n-boot", "20",
        "--out", out)
    cols = list(json.loads((out / "model.json").read_text())["coefficients"])
    assert cols[0] == "Age" and cols[1] == "body:PC1"
    code, _, err = inproc(capsys, "model", "fit", "--data", split / "train.csv", "--time", "Survival (months)",
                          "--event", EVENT, "--kind", "cox", "--features", "Age", "--out", tmp_path / "x")
    assert code == 2 and "did you mean" in err
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "model.joblib").write_bytes(b"\x80\x04junk")
    code, _, err = inproc(capsys, "model", "evaluate", "--model", tmp_path / "evil", "--data", split / "test.csv")
    assert code == 2 and "never loads" in err


def test_cohort_km_sarcopenia(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """KM and log-rank for pre-RT sarcopenia status on the whole HNSCC cohort."""
    code, out, _ = inproc(capsys, "cohort", "km", "--data", shared_data / "survival_csv_hn" / "HNSCC_clinical.csv",
                          "--time", TIME, "--event", EVENT, "--time-unit", "months", "--group", SARCO, "--json")
    res = json.loads(out)
    assert code == 0 and res["logrank_df"] == 1 and 0 < res["logrank_p"] < 1
    by = {g["group"]: g for g in res["groups"]}
    assert by["SM depleted"]["n"] == 76 and by["SM not depleted"]["n"] == 139
    assert by["SM depleted"]["events"] + by["SM not depleted"]["events"] == 77


def test_cohort_group_is_shared_with_radiomics() -> None:
    """`prognode cohort` holds radiomics' `features` and survival's `split` and `km` together."""
    r = cli("cohort", "--help")
    assert all(name in r.stdout for name in ("features", "split", "km"))


def test_logistic_on_separated_data_is_refused_with_the_reason(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An outcome that one feature separates has no maximum-likelihood odds ratio: a clear refusal naming
    the feature and what to use instead, not an overflow."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=80)
    event = (x > 0).astype(int)
    time = np.where(event == 1, rng.uniform(10, 300, 80), rng.uniform(2000, 4000, 80))
    pd.DataFrame({"t": time, "e": event, "x": x, "z": rng.normal(size=80)}).to_csv(tmp_path / "c.csv", index=False)
    rc, _out, err = inproc(capsys, "model", "fit", "--data", tmp_path / "c.csv", "--time", "t", "--event", "e",
                           "--kind", "logistic", "--horizon", "365", "--out", tmp_path / "m")
    assert rc == 2 and "separated by x" in err and "--kind binary" in err
    assert not (tmp_path / "m").exists()
