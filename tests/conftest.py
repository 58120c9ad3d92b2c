"""Shared pytest fixtures: real peers on per-test ports, shared data, temporary configs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import DATA, Orthanc, orthanc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with a clear message when it is missing."""
    if not DATA.is_dir():
        pytest.skip(f"shared data folder not found at {DATA}")
    return DATA


def need(*tools: str) -> None:
    """Skip unless every named executable is on PATH (installed by scripts/install-system.sh)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing peers {missing}: run `make setup`")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """A private Orthanc with DICOMweb on free loopback ports, stopped by PID afterwards."""
    need("Orthanc")
    with orthanc(tmp_path / "orthanc") as o:
        yield o
