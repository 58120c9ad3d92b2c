"""The database schema's versions: Alembic migrations run at every start, SQLite and PostgreSQL alike.

:func:`migrate` (called by :class:`node.db.Database`, so by ``node.db.connect``, ``prognode serve``
and every command) brings the database to the newest revision of ``node/migrations/versions``
(``alembic upgrade head``, programmatically) in one write transaction: on SQLite under ``BEGIN
IMMEDIATE``, on PostgreSQL under a transaction-level advisory lock, so receivers that start together
migrate once.  A database already at the head costs one read.

A database made before Alembic (the baseline's tables, no ``alembic_version``) is adopted
(:func:`adopt`): the baseline's tables and indexes it lacks (added by versions later than the one
that made it, e.g. ``state_counts``) are made, the columns of those it has are checked against the
baseline revision, and it is stamped at the baseline; a database whose columns differ is refused
with the differences.

How to add a migration: docs/architecture.md, "Schema changes".
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
BASELINE = "0001"
# tables in the node's database that belong to others (the sweep scheduler's job store)
FOREIGN_TABLES = frozenset({"apscheduler_jobs"})
ADVISORY_LOCK = 0x70726F67  # "prog": PostgreSQL advisory lock key held while migrating


class SchemaError(RuntimeError):
    """The database's schema is not one this version can migrate (names what differs)."""


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head() -> str:
    """The newest revision shipped with this version."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise SchemaError(f"migrations: expected one head revision, found {heads} (merge the branches)")
    return str(heads[0])


@functools.cache
def known_revisions() -> frozenset[str]:
    """Every revision shipped with this version."""
    return frozenset(str(r.revision) for r in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def current(c: Connection) -> str | None:
    """The database's revision (None: not under Alembic)."""
    return MigrationContext.configure(c).get_current_revision()


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """What Alembic compares: everything but the tables of others (:data:`FOREIGN_TABLES`)."""
    return not (type_ == "table" and name in FOREIGN_TABLES)


def lock(c: Connection) -> None:
    """Serialise migrations between processes (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already does)."""
    if c.dialect.name == "postgresql":
        c.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})


def migrate(engine: Engine) -> str | None:
    """Upgrade the database to :func:`head`; returns the revision it came from (None: new or adopted)."""
    target = head()
    with engine.execution_options(prognode_read_only=True).connect() as c:
        before = current(c)
        if before == target:
            return before
    if before is not None and before not in known_revisions():
        raise SchemaError(f"database ({engine.dialect.name}) schema is at revision {before}, which this version "
                          f"does not know (its newest is {target}): a newer prognode migrated it; run that version")
    with engine.connect() as c, _sqlite_foreign_keys_off(c), c.begin():
        lock(c)
        before = current(c)
        if before == target:  # another process migrated while this one waited
            return before
        if before is None and inspect(c).has_table("instances"):
            adopt(c)
        command.upgrade(alembic_config(c), "head")
        if c.dialect.name == "sqlite":
            broken = c.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise SchemaError(f"migration to {target} left rows whose foreign keys point nowhere: {broken[:5]}")
    logger.info("database schema %s -> %s (%s)", before or "none", target, engine.dialect.name)
    return before


@contextmanager
def _sqlite_foreign_keys_off(c: Connection) -> Iterator[None]:
    """SQLite: foreign keys off while migrating (node.db turns them on for every connection), so a
    batch migration that copies a table others refer to can drop the old one; checked after."""
    raw = c.connection.driver_connection if c.dialect.name == "sqlite" else None
    if raw is None:
        yield
        return
    raw.execute("PRAGMA foreign_keys=OFF")  # outside any transaction: inside one it does nothing
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


@functools.cache
def baseline_reference() -> MetaData:
    """The baseline revision's schema as made on a scratch in-memory SQLite database."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as c:
            command.upgrade(alembic_config(c), BASELINE)
            meta = MetaData()
            meta.reflect(c)
            meta.remove(meta.tables["alembic_version"])
        return meta
    finally:
        scratch.dispose()


def adopt(c: Connection) -> None:
    """Check a database made before Alembic against the baseline and stamp it there."""
    ref = baseline_reference()
    insp = inspect(c)
    problems: list[str] = []
    for name, table in ref.tables.items():
        if not insp.has_table(name):
            # a table the version that made the database did not have yet (state_counts came with the
            # counters): made here, as that version's successors did with create_all
            table.create(c)
            continue
        have = {col["name"] for col in insp.get_columns(name)}
        want = {col.name for col in table.columns}
        if have != want:
            problems.append(f"table {name}: columns {sorted(have - want)} not in the baseline, "
                            f"{sorted(want - have)} missing")
            continue
        indexes = {ix["name"] for ix in insp.get_indexes(name)}
        for ix in table.indexes:
            if ix.name not in indexes:  # the time-window indexes came after some databases were made
                ix.create(c)
    if problems:
        raise SchemaError(f"database ({c.dialect.name}) was made before Alembic but does not match the "
                          f"baseline revision {BASELINE}: " + "; ".join(problems))
    command.stamp(alembic_config(c), BASELINE)
    logger.info("database made before Alembic: checked against and stamped at revision %s", BASELINE)


def differences(c: Connection, metadata: MetaData | None = None) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match the ORM models
    (``node.db.Base.metadata``): empty when every model change shipped with its migration."""
    from alembic.autogenerate import compare_metadata

    if metadata is None:
        from node.db import Base

        metadata = Base.metadata
    ctx = MigrationContext.configure(c, opts={"compare_type": True, "include_object": include_object})
    return list(compare_metadata(ctx, metadata))


def new_revision(message: str, rev_id: str | None = None) -> list[Path]:
    """Write the migration of the models' changes since the newest revision (autogenerate against a
    scratch SQLite database at the head); returns the files written.  Read and adjust what it
    wrote (docs/architecture.md, "Schema changes"): autogenerate sees tables, columns, indexes
    and constraints, not triggers or data."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as c:
            command.upgrade(alembic_config(c), "head")
            if not differences(c):
                raise SchemaError("the models match the newest revision: nothing to migrate")
            number = rev_id or (f"{int(head()) + 1:04d}" if head().isdigit() else None)
            written = command.revision(alembic_config(c), message=message, autogenerate=True, rev_id=number)
        scripts = written if isinstance(written, list) else [written]
        return [Path(s.path) for s in scripts if s is not None]
    finally:
        scratch.dispose()
        head.cache_clear()


def main(argv: list[str] | None = None) -> int:
    """``python -m node.schema revision -m "what changed"`` | ``python -m node.schema check``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m node.schema")
    sub = parser.add_subparsers(dest="command", required=True)
    rev = sub.add_parser("revision", help="write the migration of the models' changes (autogenerate)")
    rev.add_argument("-m", "--message", required=True)
    sub.add_parser("check", help="exit 1 when the models differ from what the migrations make")
    args = parser.parse_args(argv)
    if args.command == "revision":
        for path in new_revision(args.message):
            print(path)
        return 0
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as c:
            command.upgrade(alembic_config(c), "head")
            diff = differences(c)
    finally:
        scratch.dispose()
    for d in diff:
        print(d)
    print("models and migrations agree" if not diff else f"{len(diff)} differences: write a migration")
    return 1 if diff else 0


if __name__ == "__main__":
    raise SystemExit(main())
