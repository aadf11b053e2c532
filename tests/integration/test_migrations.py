"""The migrations build exactly the schema the tables declare, on both databases, and go down cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from orchestrator.runtime.container import Deps
from orchestrator.store.db import downgrade, make_engine, upgrade


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), SQLModel.metadata))


async def test_migrated_schema_matches_the_tables(deps: Deps) -> None:
    await upgrade(deps.engine)  # a no-op at head, and must stay one
    async with deps.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_downgrade_to_base_and_back(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        await downgrade(engine, "base")
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
        assert set(tables) <= {"alembic_version"}
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


@pytest.mark.parametrize("start", ["0004", "0005"])
async def test_ids_become_never_reused_on_sqlite_with_every_row_kept(tmp_path: Path, start: str) -> None:
    """0006 copies each SQLite table into one with AUTOINCREMENT: rows and the children a cascade would delete
    stay (also when older migrations run before it in the same upgrade), and the highest id, once deleted, is not
    given again."""
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        await upgrade(engine, start)
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO api_key (id, user_id, key_hash, key_hint, enabled, allowed_rpm, created_at, kind, role,"
                " month_quota, balance, month_fee, fee_month, total_fee, updated_at) VALUES"
                " (1, 'a', 'h1', 'k', 1, 1, '2026-01-01', 'connector', 'user', 0, 0, 0, 0, 0, '2026-01-01'),"
                " (2, 'b', 'h2', 'k', 1, 1, '2026-01-01', 'connector', 'user', 0, 0, 0, 0, 0, '2026-01-01')"
            )
            await conn.exec_driver_sql(
                "INSERT INTO llm_models (id, name, created_at, provider, multiple, config, price_in, price_out)"
                " VALUES (1, 'm', '2026-01-01', 'vllm', 0, '{}', 0, 0)"
            )
            await conn.exec_driver_sql(  # ON DELETE CASCADE from api_key
                "INSERT INTO key_model (key_id, model_id, created_at) VALUES (2, 1, '2026-01-01')"
            )
        await upgrade(engine)
        async with engine.begin() as conn:
            assert (await conn.exec_driver_sql("SELECT key_id FROM key_model")).all() == [(2,)]
            await conn.exec_driver_sql("DELETE FROM key_model")
            await conn.exec_driver_sql("DELETE FROM api_key WHERE id = 2")
            await conn.exec_driver_sql(
                "INSERT INTO api_key (user_id, key_hash, key_hint, enabled, allowed_rpm, created_at, kind, role,"
                " month_quota, balance, month_fee, fee_month, total_fee, updated_at) VALUES"
                " ('c', 'h3', 'k', 1, 1, '2026-01-01', 'connector', 'user', 0, 0, 0, 0, 0, '2026-01-01')"
            )
            assert (await conn.exec_driver_sql("SELECT id FROM api_key ORDER BY id")).all() == [(1,), (3,)]
    finally:
        await engine.dispose()
