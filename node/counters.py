"""Counters kept by the database as rows change: jobs, exports, series and sweep items by state,
instances and their bytes, export attempts, series completed.

Metrics, the dashboard and ``prognode status`` read these few rows (:func:`read_counters`)
instead of counting whole tables at every scrape.  The counts live in the table
``state_counts`` (one row per figure) and are updated by triggers in the same transaction as
the change of the counted row, so they hold whoever writes (the node, ``prognode`` commands,
another worker process), across restarts, and for writes added later without knowing of them.

:func:`install` runs at every :class:`node.db.Database` start: the first time (an existing
database included) it creates the triggers and fills the counts from the tables, in one write
transaction, then marks the table with :data:`VERSION`; later starts only check the mark.
SQLite and PostgreSQL (a PL/pgSQL function per table) are supported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

logger = logging.getLogger(__name__)

TABLE = "state_counts"
VERSION = 1  # bump when FIGURES change: the triggers are made again and the counts refilled
MARK = "_version"


@dataclass(frozen=True)
class Figure:
    """One counted figure of a table: the counter's name and the row's contribution, as SQL
    expressions over the row (``{r}`` stands for ``NEW`` or ``OLD``)."""

    name: str  # e.g. "'jobs.' || {r}.state": one counter per state
    value: str  # e.g. "1", "{r}.size"
    columns: tuple[str, ...]  # the columns an UPDATE must touch to change the figure


FIGURES: Mapping[str, tuple[Figure, ...]] = {
    "jobs": (Figure("'jobs.' || {r}.state", "1", ("state",)),),
    "exports": (Figure("'exports.' || {r}.state", "1", ("state",)),
                Figure("'exports:attempts'", "{r}.attempts", ("attempts",))),
    "series": (Figure("'series.' || {r}.state", "1", ("state",)),
               Figure("'series:completed'", "CASE WHEN {r}.completed_at IS NULL THEN 0 ELSE 1 END",
                      ("completed_at",))),
    "sweep_items": (Figure("'sweep_items.' || {r}.state", "1", ("state",)),),
    "instances": (Figure("'instances:count'", "1", ()),
                  Figure("'instances:bytes'", "{r}.size", ("size",))),
}

# The same counts from the tables themselves (the first fill, and tests).
FILL = {
    "jobs": "SELECT 'jobs.' || state, COUNT(*) FROM jobs GROUP BY state",
    "exports": "SELECT 'exports.' || state, COUNT(*) FROM exports GROUP BY state "
               "UNION ALL SELECT 'exports:attempts', COALESCE(SUM(attempts), 0) FROM exports",
    "series": "SELECT 'series.' || state, COUNT(*) FROM series GROUP BY state "
              "UNION ALL SELECT 'series:completed', COUNT(completed_at) FROM series",
    "sweep_items": "SELECT 'sweep_items.' || state, COUNT(*) FROM sweep_items GROUP BY state",
    "instances": "SELECT 'instances:count', COUNT(*) FROM instances "
                 "UNION ALL SELECT 'instances:bytes', COALESCE(SUM(size), 0) FROM instances",
}


def _add(name: str, value: str) -> str:
    return (f"INSERT INTO {TABLE} (name, value) VALUES ({name}, {value}) "
            f"ON CONFLICT (name) DO UPDATE SET value = {TABLE}.value + excluded.value;")


def _adds(table: str, row: str, sign: str) -> str:
    return " ".join(_add(f.name.format(r=row), f"{sign}({f.value.format(r=row)})") for f in FIGURES[table])


def _sqlite_ddl(table: str) -> list[str]:
    prefix = f"prognode_count_{table}"
    columns = sorted({c for f in FIGURES[table] for c in f.columns})
    out = [f"DROP TRIGGER IF EXISTS {prefix}_{op}" for op in ("insert", "update", "delete")]
    out.append(f"CREATE TRIGGER {prefix}_insert AFTER INSERT ON {table} BEGIN {_adds(table, 'NEW', '+')} END")
    out.append(f"CREATE TRIGGER {prefix}_delete AFTER DELETE ON {table} BEGIN {_adds(table, 'OLD', '-')} END")
    if columns:
        out.append(f"CREATE TRIGGER {prefix}_update AFTER UPDATE OF {', '.join(columns)} ON {table} "
                   f"BEGIN {_adds(table, 'OLD', '-')} {_adds(table, 'NEW', '+')} END")
    return out


def _postgresql_ddl(table: str) -> list[str]:
    name = f"prognode_count_{table}"
    columns = sorted({c for f in FIGURES[table] for c in f.columns})
    events = "INSERT OR DELETE" + (f" OR UPDATE OF {', '.join(columns)}" if columns else "")
    body = (f"BEGIN IF TG_OP IN ('UPDATE', 'DELETE') THEN {_adds(table, 'OLD', '-')} END IF; "
            f"IF TG_OP IN ('INSERT', 'UPDATE') THEN {_adds(table, 'NEW', '+')} END IF; RETURN NULL; END")
    return [f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ {body} $$",
            f"DROP TRIGGER IF EXISTS {name} ON {table}",
            f"CREATE TRIGGER {name} AFTER {events} ON {table} FOR EACH ROW EXECUTE FUNCTION {name}()"]


def ddl(dialect: str) -> list[str]:
    """The statements that (re)make every counting trigger, for ``sqlite`` or ``postgresql``."""
    make = _sqlite_ddl if dialect == "sqlite" else _postgresql_ddl
    return [stmt for table in FIGURES for stmt in make(table)]


def supported(dialect: str) -> bool:
    return dialect in ("sqlite", "postgresql")


def install(engine: Engine) -> bool:
    """Make the triggers and fill the counts once per database (and again when :data:`VERSION`
    changes); True when it did.  A database of another dialect gets none (:func:`read_counters`
    then counts from the tables)."""
    dialect = engine.dialect.name
    if not supported(dialect):
        return False
    with engine.connect() as c:  # a plain read first: no write lock at every start
        if _version(c) == VERSION:
            return False
    with engine.begin() as c:  # SQLite: BEGIN IMMEDIATE (node.db); PostgreSQL: the trigger DDL locks the tables
        if _version(c) == VERSION:
            return False
        for stmt in ddl(dialect):
            c.exec_driver_sql(stmt)
        refill(c)
        c.execute(text(f"INSERT INTO {TABLE} (name, value) VALUES (:n, :v)"), {"n": MARK, "v": VERSION})
    logger.info("counters: triggers installed and counts filled from the tables (version %d)", VERSION)
    return True


def refill(c: Connection) -> None:
    """Set every count from the tables (inside the caller's write transaction)."""
    c.execute(text(f"DELETE FROM {TABLE}"))
    for query in FILL.values():
        for name, value in c.execute(text(query)).all():
            c.execute(text(f"INSERT INTO {TABLE} (name, value) VALUES (:n, :v)"), {"n": name, "v": int(value or 0)})


def _version(c: Connection) -> int | None:
    value = c.execute(text(f"SELECT value FROM {TABLE} WHERE name = :n"), {"n": MARK}).scalar()
    return None if value is None else int(value)


def read_counters(c: Connection) -> dict[str, int]:
    """Every figure by name (``jobs.pending``, ``exports:attempts``, ``instances:bytes``, ...), from
    the counters when installed, else counted from the tables."""
    if _version(c) == VERSION:
        rows = c.execute(text(f"SELECT name, value FROM {TABLE} WHERE name <> :n"), {"n": MARK}).all()
    else:
        rows = [r for q in FILL.values() for r in c.execute(text(q)).all()]
    return {str(name): int(value or 0) for name, value in rows}


def by_state(counters: Mapping[str, int], table: str) -> dict[str, int]:
    """``{state: count}`` of ``table`` from :func:`read_counters` (states counted 0 left out)."""
    prefix = table + "."
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix) and v}
