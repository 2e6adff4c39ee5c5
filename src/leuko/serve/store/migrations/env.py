"""Alembic environment of the lab store: run programmatically by :mod:`leuko.serve.store.migrate`.

The caller hands over an open connection (``config.attributes["connection"]``);
there is no alembic.ini. SQLite gets batch mode, so a later migration that
alters a column works there too (SQLite rebuilds the table).
"""

from __future__ import annotations

from alembic import context

from leuko.serve.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only reached by running alembic by hand without our helper
    raise RuntimeError("run migrations through leuko.serve.store.migrate (it passes the connection)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
