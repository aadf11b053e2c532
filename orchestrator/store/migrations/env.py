"""Alembic environment: always driven from `orchestrator.store.db` with a live connection."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import orchestrator.store.tables  # noqa: F401  (registers the tables on the metadata)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `orchestrator db upgrade`, which passes a connection")

# Batch mode lets the same migration scripts ALTER tables on SQLite.
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
