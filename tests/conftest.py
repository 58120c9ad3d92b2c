"""Shared pytest fixtures: real peers on per-test ports, shared data, temporary configs."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import pg
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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PgServer]:
    """One private PostgreSQL server for the session (tests/pg.py); each test makes its own database."""
    try:
        with pg.postgres() as server:
            yield server
    except pg.Unavailable as e:
        pytest.skip(f"PostgreSQL: {e}")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty node database on SQLite (a file) and on PostgreSQL (a new database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'prognode.db'}"
    server: pg.PgServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs a CLI in-process configures logging (node.logs: a plain StreamHandler on the
    sys.stderr of that moment, pytest's capture); remove such handlers after the test, so a server
    thread that logs after the test ended does not write to a closed capture file.  pytest's own
    handlers (subclasses, swapped per test phase) are left alone."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if type(h) is logging.StreamHandler and h not in before:
            root.removeHandler(h)
    root.setLevel(level)
