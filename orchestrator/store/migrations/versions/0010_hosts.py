"""hosts (GPU servers an admin registers, with their login sealed) and host_placements (which host, GPUs and
engine port each replica placed on one holds until it is TERMINATED)

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("pool", sa.String(length=255), nullable=False),
        sa.Column("address", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("ssh_port", sa.Integer(), nullable=False),
        sa.Column("ssh_user", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("ssh_key_sealed", sa.Text(), nullable=False),
        sa.Column("host_key", sa.Text(), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("disabled", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hosts_pool"), ["pool"], unique=False)

    op.create_table(
        "host_placements",
        sa.Column("replica_id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("gpus", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("engine_port", sa.Integer(), nullable=False),
        sa.Column("placed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_id"],
            ["hosts.id"],
        ),
        sa.ForeignKeyConstraint(
            ["replica_id"],
            ["replicas.id"],
        ),
        sa.PrimaryKeyConstraint("replica_id"),
        sa.UniqueConstraint("host_id", "engine_port", name="uq_host_placements_port"),
    )
    with op.batch_alter_table("host_placements", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_host_placements_host_id"), ["host_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("host_placements", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_host_placements_host_id"))

    op.drop_table("host_placements")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_hosts_pool"))

    op.drop_table("hosts")
