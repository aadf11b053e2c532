"""replicas.engine_spec, engine_secrets_sealed, engine_log: a managed replica's engine spec, its sealed secret
environment, and the engine's last log lines

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("engine_spec", "engine_secrets_sealed", "engine_log")


def upgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
