"""Alembic environment of the node's database.

Run by :func:`node.schema.migrate` with an open connection in ``config.attributes["connection"]``
(the node never runs Alembic against a URL of its own), or by the ``alembic`` command line with
``-x url=...`` when writing a new migration (docs/architecture.md, "Schema changes").
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from node import schema
from node.db import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      include_object=schema.include_object, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite: ALTER through table copies


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            schema.lock(connection)
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("alembic: pass the database with -x url=sqlite:///path/prognode.db")
    engine = create_engine(url)
    with engine.connect() as c:
        _configure(c)
        with context.begin_transaction():
            schema.lock(c)
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("alembic: offline (--sql) mode is not supported; run against a database")
run()
