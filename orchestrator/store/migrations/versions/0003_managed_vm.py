"""replicas: what a managed replica's VM needs (address, SSH port and user, pinned host key, sealed keys, recoveries)

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vm_address", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column("ssh_port", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("ssh_user", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column("host_key", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("host_key_sealed", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("ssh_key_sealed", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("recoveries", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        for column in ("recoveries", "ssh_key_sealed", "host_key_sealed", "host_key", "ssh_user", "ssh_port", "vm_address"):
            batch_op.drop_column(column)
