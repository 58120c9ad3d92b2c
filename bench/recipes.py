"""Run the seed-study recipes (docs/studies/) on the test inputs and print what they give and how long.

    PYTHONPATH=$PWD python bench/recipes.py                       # every recipe, 1000 bootstrap resamples
    PYTHONPATH=$PWD python bench/recipes.py hnscc --n-boot 1000   # the HNSCC comparison table only

For each recipe: each ``prognode`` command's wall time, the total, and the ``model compare`` table
(the models on the held-out split).  The HNSCC recipe models the shared MD Anderson table (215
patients); the others model synthetic cohorts with a known signal (tests/recipe_data.py), so their
numbers check the machinery, not the studies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.recipe_data import RECIPES, make_inputs, recipe_variables
from tests.recipes import run_recipe


def _ci(v: Any) -> str:
    return f"({v[0]:.3f}-{v[1]:.3f})" if isinstance(v, list | tuple) and len(v) == 2 and None not in v else ""


def table(compare: dict[str, Any]) -> str:
    binary = compare.get("endpoint") == "binary"
    lines = [f"endpoint {compare.get('endpoint')}, {compare['n']} test patients, {compare.get('events')} events, "
             f"{compare.get('n_boot')} bootstrap resamples",
             "| model | kind | Harrell's C (95% CI) | AUC (DeLong 95% CI) |" if not binary
             else "| model | kind | AUC (bootstrap 95% CI) | AUC (DeLong 95% CI) |", "|---|---|---|---|"]
    key = "auc" if binary else "horizon_auc"  # compare.py's key of the classifier block
    for m in compare["models"]:
        if binary:
            first = f"{m['auc']:.3f} {_ci(m.get('horizon_auc_ci') or m.get('auc_ci'))}"
        else:
            first = f"{m['c_index']:.3f} {_ci(m.get('c_index_ci'))}"
        auc = m.get("auc") if binary else m.get("horizon_auc")
        second = f"{auc:.3f} {_ci(m.get(f'{key}_delong_ci'))}" if auc is not None else "-"
        lines.append(f"| {m['label']} | {m['kind']} | {first} | {second} |")
    for p in compare.get("pairs", []):
        d = p.get("c_index_difference") if not binary else p.get(f"{key}_difference")
        dl = p.get(f"{key}_delong") or {}
        if d is not None:
            lines.append(f"  {p['a']} - {p['b']}: difference {d:.3f} "
                         f"{_ci(p.get('c_index_difference_ci') if not binary else p.get(f'{key}_difference_bootstrap_ci'))}"
                         + (f", DeLong p={dl['p']:.2f}" if dl.get("p") is not None else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--n-boot", default="1000")
    ap.add_argument("--work", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    args = ap.parse_args(argv)
    root = args.work or Path(tempfile.mkdtemp(prefix="prognode-recipes-"))
    inputs = make_inputs(root / "inputs")
    failed = 0
    for name in args.recipes:
        variables = recipe_variables(name, inputs, root / name / "scratch", nboot=args.n_boot)
        run = run_recipe(name, root / name / "work", variables, timeout=1200)
        print(f"\n## {name}: exit {run.returncode}, {run.seconds:.1f} s in all (outputs: {root / name / 'work'})")
        for line in run.times.splitlines():
            ms, command = line.split("\t", 1)
            print(f"  {int(ms) / 1000:6.1f} s  {command}")
        if run.returncode:
            failed += 1
            print(run.stderr[-3000:], file=sys.stderr)
            continue
        print(table(json.loads((root / name / "work" / "compare.json").read_text())))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
