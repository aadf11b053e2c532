"""replicas.probe_error, probe_error_since, ready_deadline: what a replica's failing health probe found, since
when, and when its startup grace runs out

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("probe_error", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("probe_error_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("ready_deadline", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.drop_column("ready_deadline")
        batch_op.drop_column("probe_error_since")
        batch_op.drop_column("probe_error")
