"""deployments (a model's desired replicas, kept by the reconcile job), and replicas.deployment_id and
deployment_generation: which deployment made a replica, from which of its templates

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = sa.text("deleted_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("template", sa.Text(), nullable=False),
        sa.Column("template_secrets_sealed", sa.Text(), nullable=True),
        sa.Column("replicas", sa.Integer(), nullable=True),
        sa.Column("autoscale", sa.Text(), nullable=True),
        sa.Column("desired", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_surge", sa.Integer(), server_default="1", nullable=False),
        sa.Column("generation", sa.Integer(), server_default="1", nullable=False),
        sa.Column("spec_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("attempts_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("deleted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["llm_models.id"]),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_index(
            "uq_deployments_live_model", ["model_id"], unique=True, sqlite_where=LIVE, postgresql_where=LIVE
        )
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deployment_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("deployment_generation", sa.Integer(), nullable=True))
        batch_op.create_index("ix_replicas_deployment_id", ["deployment_id"], unique=False)
        batch_op.create_foreign_key("fk_replicas_deployment_id", "deployments", ["deployment_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.drop_constraint("fk_replicas_deployment_id", type_="foreignkey")
        batch_op.drop_index("ix_replicas_deployment_id")
        batch_op.drop_column("deployment_generation")
        batch_op.drop_column("deployment_id")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_index("uq_deployments_live_model", sqlite_where=LIVE, postgresql_where=LIVE)
    op.drop_table("deployments")
