"""The database schema under Alembic (node.schema, node/migrations) on SQLite and PostgreSQL.

The migrations must make exactly the schema of the ORM models: a change to node/db.py without its
migration fails :func:`test_migrations_make_the_models_schema` (how to write one:
docs/architecture.md, "Schema changes")."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Column, Integer, MetaData, create_engine, inspect, text

from node import counters, schema
from node.db import Base, Database


def _triggers(db: Database) -> set[str]:
    with db.read() as s:
        if db.engine.dialect.name == "sqlite":
            rows = s.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).all()
        else:
            rows = s.execute(text("SELECT DISTINCT trigger_name FROM information_schema.triggers")).all()
    return {str(r[0]) for r in rows}


def test_migrations_make_the_models_schema(database_url: str) -> None:
    db = Database(database_url)
    with db.engine.connect() as c:
        assert schema.differences(c) == [], "a schema change in node/db.py needs its migration"
        assert schema.current(c) == schema.head()
    names = _triggers(db)
    assert all(any(n.startswith(f"prognode_count_{t}") for n in names) for t in counters.FIGURES), names
    db.dispose()


def test_a_missing_migration_is_caught(database_url: str) -> None:
    """The check above sees a column the migrations do not make (what another issue's change would be)."""
    db = Database(database_url)
    models = Base.metadata.tables["jobs"].to_metadata(MetaData())
    models.append_column(Column("lane", Integer, nullable=True))
    with db.engine.connect() as c:
        diff = schema.differences(c, models.metadata)
    assert any(d[0] == "add_column" and d[3].name == "lane" for d in diff if isinstance(d, tuple)), diff
    db.dispose()


def test_downgrade_and_upgrade_again(database_url: str) -> None:
    db = Database(database_url)
    with db.engine.begin() as c:
        command.downgrade(schema.alembic_config(c), "base")
        assert not inspect(c).has_table("jobs")
        command.upgrade(schema.alembic_config(c), "head")
        assert schema.differences(c) == []
    db.dispose()


def _old_database(url: str, without: tuple[str, ...] = ()) -> None:
    """What versions before Alembic made: the models' tables, the counters, no alembic_version
    (``without``: tables an even older version did not have yet)."""
    engine = create_engine(url)
    baseline = schema.baseline_reference()  # the tables of then (as the baseline made them), not today's models
    baseline.create_all(engine, tables=[t for t in baseline.sorted_tables if t.name not in without])
    counters.install(engine)
    engine.dispose()


def test_a_database_made_before_alembic_is_stamped(database_url: str) -> None:
    _old_database(database_url, without=("results",))  # made before the results ledger: made at adoption
    engine = create_engine(database_url)
    with engine.begin() as c:
        c.execute(text("INSERT INTO series (series_uid, study_uid, patient_id, modality, description, attributes, "
                       "state, generation, instances, first_received, last_received, completion_reason, source) "
                       "VALUES ('1.2.3', '1.2', 'P', 'CT', '', '{}', 'receiving', 0, 0, 0, 0, '', '')"))
    engine.dispose()
    db = Database(database_url)
    with db.engine.connect() as c:
        assert schema.current(c) == schema.head() and schema.differences(c) == []
        assert c.execute(text("SELECT COUNT(*) FROM series")).scalar() == 1  # kept, not made again
    db.dispose()


def test_a_database_that_does_not_match_is_refused(database_url: str) -> None:
    _old_database(database_url)
    engine = create_engine(database_url)
    with engine.begin() as c:
        c.execute(text("ALTER TABLE jobs ADD COLUMN mystery INTEGER"))
    engine.dispose()
    with pytest.raises(schema.SchemaError, match="mystery"):
        Database(database_url)


def _open_together(url: str, n: int = 4) -> tuple[list[Database], list[BaseException]]:
    """``n`` receivers opening the index at ``url`` at once (each in its own thread): the databases and the errors."""
    errors: list[BaseException] = []
    dbs: list[Database] = []

    def start() -> None:
        try:
            dbs.append(Database(url))
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return dbs, errors


def test_receivers_starting_together_migrate_once(database_url: str) -> None:
    dbs, errors = _open_together(database_url)
    assert not errors, errors
    with dbs[0].engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
        assert schema.differences(c) == []
    for db in dbs:
        db.dispose()


def test_sqlite_receivers_opening_a_new_index_together(tmp_path: Path) -> None:
    """Four receivers opening the same new SQLite index at once, again and again: none fails.  SQLite answers the
    switch of a new file to WAL with "database is locked" at once (its busy handler not asked) while another
    connection opens it; before the switch was retried, 7 rounds in 100 failed that way."""
    for i in range(25):
        dbs, errors = _open_together(f"sqlite:///{tmp_path / f'index{i}.db'}")
        for db in dbs:
            db.dispose()
        assert not errors, (i, errors)
        assert len(dbs) == 4


def test_migrations_ship_as_package_data() -> None:
    """The wheel carries node/migrations (packages found by setuptools, the template as package data)."""
    root = Path(schema.__file__).parent / "migrations"
    assert (root / "__init__.py").is_file() and (root / "versions" / "__init__.py").is_file()
    assert (root / "env.py").is_file() and (root / "script.py.mako").is_file()
    pyproject = (Path(schema.__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"*.mako"' in pyproject


def test_a_database_migrated_by_a_newer_version_is_refused(database_url: str) -> None:
    Database(database_url).dispose()
    engine = create_engine(database_url)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(schema.SchemaError, match="9999.*newer prognode"):
        Database(database_url)
