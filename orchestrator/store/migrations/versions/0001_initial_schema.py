"""initial schema

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "key_hint", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False
        ),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("allowed_rpm", sa.Integer(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_api_key_user_id"), ["user_id"], unique=False
        )

    op.create_table(
        "llm_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("deleted_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("llm_models", schema=None) as batch_op:
        batch_op.create_index(
            "uq_llm_models_live_name",
            ["name"],
            unique=True,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    op.create_table(
        "metric",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.Integer(), nullable=True),
        sa.Column("input", sa.Text(), nullable=True),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("choices", sa.Text(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("total_tokens", sa.Integer(), nullable=True),
        sa.Column("duration", sa.Float(), nullable=True),
        sa.Column("replica_id", sa.Integer(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_key.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("metric", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_metric_api_key_id"), ["api_key_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_metric_created"), ["created"], unique=False
        )

    op.create_table(
        "replicas",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("create_vm", sa.Boolean(), nullable=False),
        sa.Column(
            "endpoint", sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=True
        ),
        sa.Column("rate_limit", sa.Integer(), nullable=True),
        sa.Column(
            "status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False
        ),
        sa.Column(
            "status_changed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False
        ),
        sa.Column(
            "termination_reason",
            sqlmodel.sql.sqltypes.AutoString(length=64),
            nullable=True,
        ),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column(
            "environment_name",
            sqlmodel.sql.sqltypes.AutoString(length=255),
            nullable=True,
        ),
        sa.Column(
            "image_name", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True
        ),
        sa.Column(
            "flavor_name", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True
        ),
        sa.Column("assign_floating_ip", sa.Boolean(), nullable=True),
        sa.Column("run_command", sa.Text(), nullable=True),
        sa.Column(
            "key_name", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True
        ),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("vm_id", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column(
            "delete_requested_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["llm_models.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_replicas_model_id"), ["model_id"], unique=False
        )
        batch_op.create_index("ix_replicas_status", ["status"], unique=False)

    op.create_table(
        "replica_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("replica_id", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column(
            "from_status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True
        ),
        sa.Column(
            "to_status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False
        ),
        sa.Column(
            "reason", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False
        ),
        sa.Column("message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["replica_id"],
            ["replicas.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("replica_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_replica_events_replica_id"), ["replica_id"], unique=False
        )

    op.create_table(
        "replica_security_rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("replica_id", sa.Integer(), nullable=False),
        sa.Column(
            "origin", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False
        ),
        sa.Column(
            "direction", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False
        ),
        sa.Column(
            "protocol", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False
        ),
        sa.Column(
            "ethertype", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False
        ),
        sa.Column(
            "remote_ip_prefix",
            sqlmodel.sql.sqltypes.AutoString(length=64),
            nullable=False,
        ),
        sa.Column("port_range_min", sa.Integer(), nullable=False),
        sa.Column("port_range_max", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["replica_id"],
            ["replicas.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("replica_security_rules", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_replica_security_rules_replica_id"),
            ["replica_id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("replica_security_rules", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_replica_security_rules_replica_id"))

    op.drop_table("replica_security_rules")
    with op.batch_alter_table("replica_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_replica_events_replica_id"))

    op.drop_table("replica_events")
    with op.batch_alter_table("replicas", schema=None) as batch_op:
        batch_op.drop_index("ix_replicas_status")
        batch_op.drop_index(batch_op.f("ix_replicas_model_id"))

    op.drop_table("replicas")
    with op.batch_alter_table("metric", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_metric_created"))
        batch_op.drop_index(batch_op.f("ix_metric_api_key_id"))

    op.drop_table("metric")
    with op.batch_alter_table("llm_models", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_llm_models_live_name",
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    op.drop_table("llm_models")
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_key_user_id"))

    op.drop_table("api_key")
