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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

logger = logging.getLogger(__name__)

TABLE = "state_counts"
VERSION = 1  # bump when FIGURES change: the triggers are made again and the counts refilled
MARK = "_version"


@dataclass(frozen=True)
class Figure:
    """What a table's triggers count: one counter row per ``name`` holding the number of rows and
    the sum of ``total`` over them, as SQL expressions over the row (``{r}`` stands for ``NEW`` or
    ``OLD``).  One upsert per row change: the C-STORE index write pays for one statement."""

    name: str  # e.g. "'jobs.' || {r}.state": one counter per state
    total: str  # e.g. "{r}.size", "0"
    columns: tuple[str, ...]  # the columns an UPDATE must touch to change the figure


FIGURES: Mapping[str, Figure] = {
    "jobs": Figure("'jobs.' || {r}.state", "0", ("state",)),
    "exports": Figure("'exports.' || {r}.state", "{r}.attempts", ("attempts", "state")),
    "series": Figure("'series.' || {r}.state", "CASE WHEN {r}.completed_at IS NULL THEN 0 ELSE 1 END",
                     ("completed_at", "state")),
    "sweep_items": Figure("'sweep_items.' || {r}.state", "0", ("state",)),
    "instances": Figure("'instances'", "{r}.size", ("size",)),
}

# The same counts from the tables themselves (the first fill, and tests): (name, rows, total).
FILL = {
    "jobs": "SELECT 'jobs.' || state, COUNT(*), 0 FROM jobs GROUP BY state",
    "exports": "SELECT 'exports.' || state, COUNT(*), COALESCE(SUM(attempts), 0) FROM exports GROUP BY state",
    "series": "SELECT 'series.' || state, COUNT(*), COUNT(completed_at) FROM series GROUP BY state",
    "sweep_items": "SELECT 'sweep_items.' || state, COUNT(*), 0 FROM sweep_items GROUP BY state",
    "instances": "SELECT 'instances', COUNT(*), COALESCE(SUM(size), 0) FROM instances",
}


def _adds(table: str, row: str, sign: str) -> str:
    f = FIGURES[table]
    return (f"INSERT INTO {TABLE} (name, value, total) VALUES ({f.name.format(r=row)}, {sign}1, "
            f"{sign}({f.total.format(r=row)})) ON CONFLICT (name) DO UPDATE SET "
            f"value = {TABLE}.value + excluded.value, total = {TABLE}.total + excluded.total;")


def _sqlite_ddl(table: str) -> list[str]:
    prefix = f"prognode_count_{table}"
    columns = FIGURES[table].columns
    out = [f"DROP TRIGGER IF EXISTS {prefix}_{op}" for op in ("insert", "update", "delete")]
    out.append(f"CREATE TRIGGER {prefix}_insert AFTER INSERT ON {table} BEGIN {_adds(table, 'NEW', '+')} END")
    out.append(f"CREATE TRIGGER {prefix}_delete AFTER DELETE ON {table} BEGIN {_adds(table, 'OLD', '-')} END")
    if columns:
        out.append(f"CREATE TRIGGER {prefix}_update AFTER UPDATE OF {', '.join(columns)} ON {table} "
                   f"BEGIN {_adds(table, 'OLD', '-')} {_adds(table, 'NEW', '+')} END")
    return out


def _postgresql_ddl(table: str) -> list[str]:
    name = f"prognode_count_{table}"
    columns = FIGURES[table].columns
    events = "INSERT OR DELETE" + (f" OR UPDATE OF {', '.join(columns)}" if columns else "")
    f = FIGURES[table]
    # an UPDATE moves a row between two counters in one statement that locks them in name order:
    # two transactions moving rows opposite ways (claim pending -> running, lease expiry
    # running -> pending) by two processes must not deadlock on the counter rows
    move = (f"INSERT INTO {TABLE} (name, value, total) SELECT n, SUM(v), SUM(t) FROM (VALUES "
            f"({f.name.format(r='OLD')}, -1, -({f.total.format(r='OLD')})), "
            f"({f.name.format(r='NEW')}, 1, {f.total.format(r='NEW')})) AS d(n, v, t) GROUP BY n ORDER BY n "
            f"ON CONFLICT (name) DO UPDATE SET value = {TABLE}.value + excluded.value, "
            f"total = {TABLE}.total + excluded.total;")
    body = (f"BEGIN IF TG_OP = 'INSERT' THEN {_adds(table, 'NEW', '+')} "
            f"ELSIF TG_OP = 'DELETE' THEN {_adds(table, 'OLD', '-')} "
            f"ELSE {move} END IF; RETURN NULL; END")
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
    from node.schema import lock

    with engine.begin() as c:  # SQLite: BEGIN IMMEDIATE (node.db); PostgreSQL: the migrations' advisory lock
        lock(c)
        return install_on(c)


def install_on(c: Connection) -> bool:
    """:func:`install` inside the caller's write transaction (the baseline migration's)."""
    dialect = c.dialect.name
    if not supported(dialect) or _version(c) == VERSION:
        return False
    for stmt in ddl(dialect):
        c.exec_driver_sql(stmt)
    refill(c)
    c.execute(text(f"INSERT INTO {TABLE} (name, value, total) VALUES (:n, :v, 0)"), {"n": MARK, "v": VERSION})
    logger.info("counters: triggers installed and counts filled from the tables (version %d)", VERSION)
    return True


def refill(c: Connection) -> None:
    """Set every count from the tables (inside the caller's write transaction)."""
    c.execute(text(f"DELETE FROM {TABLE}"))
    for query in FILL.values():
        for name, value, total in c.execute(text(query)).all():
            c.execute(text(f"INSERT INTO {TABLE} (name, value, total) VALUES (:n, :v, :t)"),
                      {"n": name, "v": int(value or 0), "t": int(total or 0)})


def _version(c: Connection) -> int | None:
    value = c.execute(text(f"SELECT value FROM {TABLE} WHERE name = :n"), {"n": MARK}).scalar()
    return None if value is None else int(value)


def read_counters(c: Connection) -> dict[str, int]:
    """Every figure by name, from the counters when installed, else counted from the tables:
    ``<table>.<state>`` (rows of jobs, exports, series, sweep_items by state), ``exports:attempts``,
    ``series:completed``, ``instances:count`` and ``instances:bytes``."""
    if _version(c) != VERSION:
        return count_from_tables(c)
    rows = c.execute(text(f"SELECT name, value, total FROM {TABLE} WHERE name <> :n"), {"n": MARK}).all()
    return _figures(rows)


def count_from_tables(c: Connection) -> dict[str, int]:
    """The figures of :func:`read_counters` counted from the tables (scans: for checks and tests)."""
    return _figures([r for q in FILL.values() for r in c.execute(text(q)).all()])


def _figures(rows: Sequence[Any]) -> dict[str, int]:
    out = {"exports:attempts": 0, "series:completed": 0, "instances:count": 0, "instances:bytes": 0}
    for name, value, total in rows:
        name, value, total = str(name), int(value or 0), int(total or 0)
        if name == "instances":
            out["instances:count"], out["instances:bytes"] = value, total
            continue
        out[name] = value
        if name.startswith("exports."):
            out["exports:attempts"] += total
        elif name.startswith("series."):
            out["series:completed"] += total
    return out


def by_state(counters: Mapping[str, int], table: str) -> dict[str, int]:
    """``{state: count}`` of ``table`` from :func:`read_counters` (states counted 0 left out)."""
    prefix = table + "."
    return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix) and v}
