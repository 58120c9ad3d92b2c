"""Static checks as part of the suite: ruff on everything, mypy strict on the packages, import-linter contracts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_clean() -> None:
    r = _run("ruff", "check", "node", "pipelines", "dicom_templates", "tests", "bench", "scripts")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_clean() -> None:
    r = _run("mypy")  # packages and strictness come from pyproject.toml
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_import_contracts_kept() -> None:
    """node -> pipelines -> dicom_templates, and the receive path never imports torch or monai.

    The contracts live in pyproject.toml ([tool.importlinter]); ``make lint`` runs the same check.
    """
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout, r.stdout[-3000:]
