"""``prognode model fit|evaluate|report`` and ``prognode cohort split``.

``node/cli.py`` loads this through ``EXTENSIONS`` (``pipelines.survival.cli:register``); it also runs
on its own: ``python -m pipelines.survival.cli model fit ...``.  Each sub-command sets ``func``, a
callable taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.survival.data import DAYS_PER, CohortError
from pipelines.survival.fit import CENSORING, DEFAULT_HORIZON_DAYS, DEFAULT_L1_RATIOS

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("prognode")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0.1.0"


def _sub(subparsers: Any, name: str, help_text: str) -> Any:
    """The sub-command group ``name`` (e.g. ``cohort``), created or reused if another extension made it."""
    existing = subparsers.choices.get(name)
    if existing is not None:
        for action in existing._actions:  # argparse has no public accessor for a parser's subparsers
            if isinstance(action, argparse._SubParsersAction):
                return action
        return existing.add_subparsers(dest=f"{name}_command", required=True)
    parser = subparsers.add_parser(name, help=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def _friendly(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (a missing column, a model folder that is refused, a fit that fails) -> message, exit 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (OSError, ValueError) as e:  # CohortError, FitError, ArtifactError, DesignError are ValueErrors
            print(f"prognode {getattr(args, 'command', '')}: error: {e}".replace("  ", " "), file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    """Add ``model`` (fit, evaluate, report) and ``cohort split`` to the ``prognode`` parser."""
    model = _sub(subparsers, "model", "fit, evaluate and report survival models")

    fit = model.add_parser("fit", help="fit a Cox, Lasso-Cox, logistic-at-horizon or binary-outcome model on a "
                                       "cohort CSV")
    fit.add_argument("--data", type=Path, required=True, help="cohort CSV, one row per patient")
    fit.add_argument("--kind", required=True, choices=("cox", "lasso-cox", "logistic", "binary"),
                     help="binary: a 0/1 --outcome column (penalised logistic); the others: --time and --event")
    fit.add_argument("--time", default=None, help="survival kinds: follow-up time column")
    fit.add_argument("--event", default=None, help="survival kinds: event column, 1 event (e.g. death), 0 censored")
    fit.add_argument("--outcome", default=None, help="--kind binary: the 0/1 outcome column (1 = present)")
    fit.add_argument("--features", nargs="+", default=None,
                     help="feature columns (quote names with spaces); default: every usable column but the "
                          "time/event/outcome columns and --exclude")
    fit.add_argument("--exclude", nargs="+", default=[], metavar="COL",
                     help="columns left out of the default feature set (e.g. other outcome columns)")
    fit.add_argument("--categorical", nargs="*", default=[], help="numeric columns to treat as categorical")
    fit.add_argument("--group", action="append", default=[], metavar="NAME=COL,COL,...",
                     help="PCA fusion group of features (repeatable); columns separated by ','")
    fit.add_argument("--pca-variance", type=float, default=0.9, help="variance kept per PCA group (0-1]")
    fit.add_argument("--horizon", type=float, default=None,
                     help=f"survival kinds: horizon in days (default {DEFAULT_HORIZON_DAYS:g} = 5 years)")
    fit.add_argument("--censoring", choices=CENSORING, default=None,
                     help="logistic: patients censored before the horizon are excluded (complete case, the "
                          "default) or the others are weighted by inverse probability of censoring (ipcw)")
    fit.add_argument("--time-unit", choices=tuple(DAYS_PER), default="days", help="unit of the time column")
    fit.add_argument("--risk-groups", choices=("median", "tertiles", "quartiles"), default="median")
    fit.add_argument("--name", default="", help="model name (default: the output folder's name)")
    fit.add_argument("--model-version", default="1.0.0")
    fit.add_argument("--penalizer", type=float, default=0.0, help="cox: ridge penalty (lifelines)")
    fit.add_argument("--penalty", choices=("l1", "elasticnet"), default=None,
                     help="binary: L1 (the default) or elastic net, strength chosen by cross-validation")
    fit.add_argument("--l1-ratios", nargs="+", type=float, default=None, metavar="R",
                     help="binary --penalty elasticnet: L1 mixing values tried by cross-validation "
                          f"(default {' '.join(map(str, DEFAULT_L1_RATIOS))})")
    fit.add_argument("--cv-folds", type=int, default=5,
                     help="lasso-cox, binary: folds for choosing the penalty")
    fit.add_argument("--one-se", action="store_true",
                     help="lasso-cox, binary: largest penalty within 1 SE of the best")
    fit.add_argument("--impute-at-prediction", action="store_true",
                     help="impute missing inputs at prediction time (stated in the model card)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for confidence intervals")
    fit.add_argument("--out", type=Path, required=True, help="model folder to write")
    fit.add_argument("--cohort-features", type=Path, default=None, metavar="FEATURES.csv",
                     help="the `cohort features` table the data's feature columns came from: its param_hash and "
                          "options go into the model, so the node can compute them on new studies (survival-risk)")
    fit.set_defaults(func=_friendly(cmd_fit))

    for name, helptext in (("evaluate", "evaluate a model on a cohort CSV"),
                           ("report", "write a self-contained HTML validation report")):
        p = model.add_parser(name, help=helptext)
        p.add_argument("--model", type=Path, required=True, help="model folder (model.json)")
        p.add_argument("--data", type=Path, required=True, help="cohort CSV")
        p.add_argument("--time", default=None, help="time column (default: as in training)")
        p.add_argument("--event", default=None, help="event column (default: as in training)")
        p.add_argument("--time-unit", choices=tuple(DAYS_PER), default=None, help="default: as in training")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--n-boot", type=int, default=200)
        if name == "evaluate":
            p.add_argument("--outcome", default=None, help="binary models: outcome column (default: as in training)")
            p.add_argument("--json", action="store_true", help="print one JSON object")
            p.set_defaults(func=_friendly(cmd_evaluate))
        else:
            p.add_argument("--out", type=Path, required=True, help="HTML file to write")
            p.add_argument("--nomogram", type=Path, default=None,
                           help="nomogram PNG to write (default: nomogram.png beside --out; Cox and logistic)")
            p.add_argument("--no-nomogram", action="store_true", help="draw no nomogram")
            p.set_defaults(func=_friendly(cmd_report))

    cmp = model.add_parser("compare", help="compare models on the same test patients (paired CIs, DeLong, NRI)")
    cmp.add_argument("--models", type=Path, nargs="+", required=True, help="two or more model folders")
    cmp.add_argument("--data", type=Path, required=True, help="test cohort CSV")
    cmp.add_argument("--time", default=None, help="time column (default: as the first model was trained)")
    cmp.add_argument("--event", default=None, help="event column (default: as the first model was trained)")
    cmp.add_argument("--time-unit", choices=tuple(DAYS_PER), default=None, help="default: as in training")
    cmp.add_argument("--outcome", default=None, help="0/1 outcome column: compare as classifiers of it")
    cmp.add_argument("--horizon", type=float, default=None, help="days (default: the first model's horizon)")
    cmp.add_argument("--nri-cutoffs", type=float, nargs="*", default=[],
                     help="risk cut-offs (probabilities) for the categorical NRI, e.g. 0.2 0.4")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument("--n-boot", type=int, default=200, help="paired bootstrap resamples")
    cmp.add_argument("--json", action="store_true", help="print one JSON object")
    cmp.add_argument("--out", type=Path, default=None, help="also write a self-contained HTML report")
    cmp.set_defaults(func=_friendly(cmd_compare))

    cohort = _sub(subparsers, "cohort", "cohort tools")
    split = cohort.add_parser("split", help="seeded held-out split of a cohort CSV")
    split.add_argument("--data", type=Path, required=True)
    split.add_argument("--test-fraction", type=float, default=0.3)
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--stratify", default=None, help="column to stratify on (e.g. the event column)")
    split.add_argument("--out-dir", type=Path, required=True)
    split.set_defaults(func=_friendly(cmd_split))

    km = cohort.add_parser("km", help="Kaplan-Meier by a grouping column and the log-rank test")
    km.add_argument("--data", type=Path, required=True)
    km.add_argument("--time", required=True)
    km.add_argument("--event", required=True)
    km.add_argument("--time-unit", choices=tuple(DAYS_PER), default="days")
    km.add_argument("--group", required=True, help="grouping column (e.g. sarcopenia status)")
    km.add_argument("--horizon", type=float, default=1826.0, help="days at which survival is reported")
    km.add_argument("--json", action="store_true")
    km.set_defaults(func=_friendly(cmd_km))


def _parse_groups(items: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise CohortError(f"--group {item!r}: expected NAME=COL,COL,...")
        name, cols = item.split("=", 1)
        groups[name.strip()] = [c.strip() for c in cols.split(",") if c.strip()]
    return groups


def _check_fit_args(args: argparse.Namespace) -> None:
    """--kind binary takes --outcome; the survival kinds take --time and --event: refuse mixtures."""
    if args.kind == "binary":
        given = [flag for flag, v in (("--time", args.time), ("--event", args.event), ("--horizon", args.horizon),
                                      ("--censoring", args.censoring)) if v is not None]
        if given:
            raise CohortError(f"--kind binary takes a 0/1 --outcome column and no time: {', '.join(given)} "
                              "cannot be used with it (for an event by a horizon use --kind logistic)")
        if not args.outcome:
            raise CohortError("--kind binary needs --outcome COL (a column of 0 and 1)")
        return
    if args.outcome is not None:
        raise CohortError(f"--outcome is for --kind binary; --kind {args.kind} takes --time and --event")
    if not args.time or not args.event:
        raise CohortError(f"--kind {args.kind} needs --time and --event (for a 0/1 outcome use --kind binary "
                          "--outcome COL)")
    extra = [flag for flag, v in (("--penalty", args.penalty), ("--l1-ratios", args.l1_ratios)) if v is not None]
    if extra:
        raise CohortError(f"{', '.join(extra)}: for --kind binary only")
    if args.censoring is not None and args.kind != "logistic":
        raise CohortError(f"--censoring is for --kind logistic (an event by a horizon); --kind {args.kind} "
                          "uses every patient's follow-up")


def _with_cohort_record(model: Any, args: argparse.Namespace) -> Any:
    """The model with ``training.cohort_features`` (``--cohort-features``), or as it is with a note."""
    import dataclasses

    from pipelines.survival.cohort_source import RECORD_KEY, CohortRecordError, cohort_record, family_of

    cohort_cols = [c for c in model.feature_names if family_of(c)]
    if args.cohort_features is None:
        if cohort_cols:
            print(f"note: {len(cohort_cols)} feature columns look like `cohort features` columns; without "
                  "--cohort-features FEATURES.csv the node cannot compute them on a new study")
        return model
    try:
        record = cohort_record(args.cohort_features, model.feature_names, args.data)
    except CohortRecordError as e:
        raise CohortError(str(e)) from None
    print(f"cohort features: param_hash {record['param_hash']}, families {', '.join(record['families']) or 'none'} "
          f"({len(record['columns'])} model columns) recorded for deployment")
    return dataclasses.replace(model, training={**model.training, RECORD_KEY: record})


def cmd_fit(args: argparse.Namespace) -> int:
    from pipelines.survival.artifact import save_model
    from pipelines.survival.data import load_cohort
    from pipelines.survival.fit import FitOptions, fit_model

    _check_fit_args(args)
    groups = _parse_groups(args.group)
    features = () if args.features is None else tuple(
        dict.fromkeys([*args.features, *[c for cols in groups.values() for c in cols]]))
    common: dict[str, Any] = dict(
        kind=args.kind, features=features, exclude=tuple(args.exclude), categorical=tuple(args.categorical),
        groups=groups, pca_variance=args.pca_variance, risk_groups=args.risk_groups,
        name=args.name or args.out.resolve().name, version=args.model_version, cv_folds=args.cv_folds,
        one_se=args.one_se, seed=args.seed, n_boot=args.n_boot, impute_at_prediction=args.impute_at_prediction)
    if args.kind == "binary":
        from pipelines.survival.binary import fit_binary, load_binary_cohort

        bcohort = load_binary_cohort(args.data, args.outcome)
        opts = FitOptions(**common, horizon_days=None, outcome_column=args.outcome, penalty=args.penalty or "l1",
                          l1_ratios=tuple(args.l1_ratios or DEFAULT_L1_RATIOS))
        model = fit_binary(bcohort, opts, software_version=_version())
        n, events = bcohort.n, bcohort.events
    else:
        cohort = load_cohort(args.data, args.time, args.event, args.time_unit)
        opts = FitOptions(**common, horizon_days=DEFAULT_HORIZON_DAYS if args.horizon is None else args.horizon,
                          penalizer=args.penalizer, time_column=args.time, event_column=args.event,
                          time_unit=args.time_unit, censoring=args.censoring or "exclude")
        model = fit_model(cohort, opts, software_version=_version())
        n, events = cohort.n, cohort.events
    model = _with_cohort_record(model, args)
    save_model(model, args.out)
    sel = model.training.get("feature_selection")
    if sel:
        print(f"features: {len(sel['used'])} columns used (no --features: every column but "
              f"{', '.join(map(repr, sel['outcome_columns'] + sel['excluded']))})")
        for d in sel["dropped"]:
            print(f"  dropped {d['column']!r}: {d['reason']}")
    m = model.metrics["training (apparent)"]
    if model.kind == "binary":
        d = model.fit_details
        ci = m.get("auc_ci") or (float("nan"), float("nan"))
        print(f"fitted binary on {n} patients ({events} with {args.outcome!r} = 1): "
              f"{len(model.design.columns)} model columns, apparent AUC {m['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f}), "
              f"cross-validated AUC {d['cv_auc_pooled']:.3f}")
        print(f"{d['penalty']}: lambda {d['lambda']:.4g}, l1_ratio {d['l1_ratio']:g} by {d['folds']}-fold CV "
              f"(deviance {d['cv_deviance']:.4f}); kept {len(d['selected'])}: {', '.join(d['selected'])}")
    else:
        ci = m.get("c_index_ci") or (float("nan"), float("nan"))
        print(f"fitted {model.kind} on {n} patients ({events} events): "
              f"{len(model.design.columns)} model columns, apparent C-index {m['c_index']:.3f} "
              f"({ci[0]:.3f}-{ci[1]:.3f})")
    if model.kind == "logistic":
        t = model.training
        print(f"censoring: {t['censoring']} ({t['excluded_censored']} patients censored before the horizon "
              + ("excluded)" if t["censoring"] == "exclude" else "without weight, the others IPC-weighted)"))
    if model.kind == "lasso-cox":
        d = model.fit_details
        print(f"lasso: alpha {d['alpha']:.4g} by {d['folds']}-fold CV (C-index {d['cv_c_index']:.3f}); "
              f"kept {len(d['selected'])}: {', '.join(d['selected'])}")
    print(f"wrote {args.out}/model.json and MODEL_CARD.md")
    return 0


def _evaluate(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    from pipelines.survival.artifact import load_model
    from pipelines.survival.data import load_cohort
    from pipelines.survival.evaluate import evaluate, format_table

    model = load_model(args.model)
    if model.kind == "binary":
        from pipelines.survival.binary import evaluate_binary, format_binary_table, load_binary_cohort

        if args.time or args.event:
            raise CohortError("a binary model is evaluated on its 0/1 outcome column (--outcome), not --time/--event")
        outcome = getattr(args, "outcome", None) or model.training.get("outcome_column")
        if not outcome:
            raise CohortError("the model does not record its outcome column: give --outcome")
        bres = evaluate_binary(model, load_binary_cohort(args.data, outcome), n_boot=args.n_boot, seed=args.seed)
        return model, bres, format_binary_table(bres)
    if getattr(args, "outcome", None):
        raise CohortError(f"--outcome is for binary models; this one is {model.kind} (--time/--event)")
    time_col = args.time or model.training.get("time_column")
    event_col = args.event or model.training.get("event_column")
    unit = args.time_unit or model.training.get("time_unit") or "days"
    if not time_col or not event_col:
        raise CohortError("the model does not record its time/event columns: give --time and --event")
    cohort = load_cohort(args.data, time_col, event_col, unit)
    result = evaluate(model, cohort, n_boot=args.n_boot, seed=args.seed)
    return model, result, format_table(result)


def cmd_evaluate(args: argparse.Namespace) -> int:
    _, result, table = _evaluate(args)
    if args.json:
        print(json.dumps(result, allow_nan=False, default=_json_default))
    else:
        print(table)
    return 0 if result.get("c_index") is not None or result.get("auc") is not None else 1


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.survival.report import render

    model, result, table = _evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png, note = None, ""
    if not args.no_nomogram:
        from pipelines.survival.data import read_table
        from pipelines.survival.nomogram import NomogramError, draw, nomogram_spec

        try:
            png = draw(model, nomogram_spec(model, read_table(args.data)[0]))
        except NomogramError as e:
            note = str(e)
            log.warning("model report: no nomogram for %s: %s", model.name, e)
    args.out.write_text(render(model, result, table, png, note), encoding="utf-8")
    print(f"wrote {args.out}")
    if png is not None:
        path = args.nomogram or args.out.parent / "nomogram.png"
        path.write_bytes(png)
        print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pipelines.survival.compare import compare, format_compare, render_compare

    result = compare(args.models, args.data, time_col=args.time, event_col=args.event, time_unit=args.time_unit,
                     outcome_col=args.outcome, horizon_days=args.horizon, n_boot=args.n_boot, seed=args.seed,
                     nri_cutoffs=args.nri_cutoffs, curves=args.out is not None)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render_compare(result), encoding="utf-8")
    result.pop("curves", None)
    if args.json:
        print(json.dumps(result, allow_nan=False, default=_json_default))
    else:
        print(format_compare(result))
        if args.out is not None:
            print(f"wrote {args.out}")
    return 1 if result.get("error") else 0


def cmd_split(args: argparse.Namespace) -> int:
    from pipelines.survival.cohort import split_file

    s = split_file(args.data, args.out_dir, args.test_fraction, args.seed, args.stratify)
    print(f"wrote {s.train} ({s.n_train} rows) and {s.test} ({s.n_test} rows)")
    return 0


def cmd_km(args: argparse.Namespace) -> int:
    import numpy as np

    from pipelines.survival.data import load_cohort
    from pipelines.survival.metrics import km_by_group

    cohort = load_cohort(args.data, args.time, args.event, args.time_unit)
    if args.group not in cohort.frame.columns:
        raise CohortError(f"column {args.group!r} not in {args.data}")
    values = cohort.frame[args.group]
    ok = values.notna().to_numpy()
    groups = [str(v) for v in values[ok]]
    res = km_by_group(cohort.time_days[ok], cohort.event[ok], groups, horizon=args.horizon)
    res["n_missing_group"] = int((~ok).sum())
    if args.json:
        for g in res["groups"]:
            g.pop("curve")
        print(json.dumps(res, allow_nan=False))
        return 0
    print(f"Kaplan-Meier by {args.group!r} ({int(np.sum(ok))} patients, {int((~ok).sum())} without a group)")
    for g in res["groups"]:
        med = g["median_survival_days"]
        s, lo, hi = g["survival_at_horizon"]
        print(f"  {g['group']:<24} n={g['n']:<4} events={g['events']:<4} median="
              + (f"{med / 365.25:.1f}y" if med else "not reached")
              + f"  S({args.horizon:g} d)={s:.2f} ({lo:.2f}-{hi:.2f})")
    if res["logrank_p"] is not None:
        print(f"log-rank chi2={res['logrank_statistic']:.2f}, df={res['logrank_df']}, p={res['logrank_p']:.3g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prognode", description="prognode survival models and cohort tools")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
