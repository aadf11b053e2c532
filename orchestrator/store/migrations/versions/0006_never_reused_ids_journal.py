"""ids never reused on SQLite (AUTOINCREMENT on every table with an integer id), and the journal's written
segments

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Parents before children, so that each copy finds the rows its foreign keys point at.
TABLES = (
    "llm_models",
    "replicas",
    "replica_events",
    "replica_security_rules",
    "key_group",
    "api_key",
    "key_model",
    "group_model",
    "payment",
    "chat_session",
    "bot_connector",
    "bot_event",
    "metric",
)


def _rebuild(autoincrement: bool) -> None:
    """SQLite takes AUTOINCREMENT only in CREATE TABLE: each table is copied into a new one, with foreign keys off
    (`orchestrator.store.db.upgrade` turns them off for every migration and checks them afterwards; a DROP TABLE with them
    on would run the children's ON DELETE CASCADE)."""
    if op.get_bind().exec_driver_sql("PRAGMA foreign_keys").scalar() != 0:
        raise RuntimeError("foreign keys are on: copying the tables would delete rows by cascade")
    for name in TABLES:
        with op.batch_alter_table(name, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}):
            pass


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(autoincrement=True)
    op.create_table(
        "journal_segment",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("written_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("journal_segment")
    if op.get_bind().dialect.name == "sqlite":
        _rebuild(autoincrement=False)
