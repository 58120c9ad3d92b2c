"""Run the recipes of docs/studies/ : their ```sh recipe blocks, in order, in one bash, with small inputs.

A recipe's ```sh site block sets the site's inputs (``STUDIES``, ``OUTCOMES``, ...); the runner
drops it and sets the same variables to the test's inputs instead.  ``prognode`` is this checkout's
command line (``python -m`` in the test's interpreter, with the repository first on the path).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES_DOCS = ROOT / "docs" / "studies"
BLOCK = re.compile(r"^```sh (recipe|site)\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class RecipeRun:
    script: str
    seconds: float
    stdout: str
    stderr: str
    returncode: int
    times: str  # one line per prognode command: milliseconds, sub-command


def blocks(markdown: str, kind: str = "recipe") -> list[str]:
    return [body for k, body in BLOCK.findall(markdown) if k == kind]


def site_variables(markdown: str) -> list[str]:
    """The variable names a recipe's site block sets."""
    names: list[str] = []
    for body in blocks(markdown, "site"):
        names += re.findall(r"^([A-Z_][A-Z0-9_]*)=", body, re.MULTILINE)
    return names


def script(markdown: str) -> str:
    prelude = (
        "set -euo pipefail\n"
        "prognode() {\n"
        "  local t0=${EPOCHREALTIME/./} rc=0\n"
        '  "$PROGNODE_PYTHON" -c "import sys; from node.cli import main; sys.exit(main())" "$@" || rc=$?\n'
        '  local t1=${EPOCHREALTIME/./}\n'
        '  printf "%d\\tprognode %s %s\\n" $(((t1 - t0) / 1000)) "$1" "$2" >> "$PROGNODE_TIMES"\n'
        "  return $rc\n"
        "}\n"
    )
    return prelude + "\n".join(blocks(markdown))


def run_recipe(name: str, work: Path, variables: Mapping[str, str], timeout: float = 300.0) -> RecipeRun:
    """Run docs/studies/<name>.md in ``work`` with the site variables set to ``variables``."""
    markdown = (STUDIES_DOCS / f"{name}.md").read_text(encoding="utf-8")
    missing = sorted(set(site_variables(markdown)) - set(variables))
    if missing:
        raise AssertionError(f"{name}: the test gives no value for the site variables {missing}")
    text = script(markdown)
    env = {**os.environ, **variables, "PROGNODE_PYTHON": sys.executable, "PROGNODE_TIMES": str(work / "times.tsv"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.sh").write_text(text, encoding="utf-8")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(work / "recipe.sh")], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    times = (work / "times.tsv").read_text(encoding="utf-8") if (work / "times.tsv").exists() else ""
    return RecipeRun(text, time.perf_counter() - t0, proc.stdout, proc.stderr, proc.returncode, times)
