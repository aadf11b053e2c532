"""accounts, billing and chat records (the connector surface): key groups, model bindings, payments, sessions,
bots; prices on models; quota, balance and spend on keys; the connector's thread columns on `metric`

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString
_TIME = sqlmodel.sql.sqltypes.UTCDateTime


def _money(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)


def _stamps() -> list[sa.Column[object]]:
    return [sa.Column("created_at", _TIME(), nullable=False), sa.Column("updated_at", _TIME(), nullable=False)]


def upgrade() -> None:
    op.create_table(
        "key_group",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("key", _STR(length=255), nullable=True),
        *_stamps(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="toolkit", nullable=False))
        batch_op.add_column(sa.Column("role", sa.String(length=16), server_default="user", nullable=False))
        batch_op.add_column(sa.Column("group_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("email", _STR(length=255), nullable=True))
        for name in ("month_quota", "balance", "month_fee"):
            batch_op.add_column(_money(name))
        batch_op.add_column(sa.Column("fee_month", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(_money("total_fee"))
        # Existing keys were last changed when they were made.
        batch_op.add_column(
            sa.Column("updated_at", _TIME(), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False)
        )
        batch_op.create_index(batch_op.f("ix_api_key_group_id"), ["group_id"], unique=False)
        batch_op.create_foreign_key("fk_api_key_group_id", "key_group", ["group_id"], ["id"], ondelete="SET NULL")
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.alter_column("updated_at", server_default=None)

    with op.batch_alter_table("llm_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=64), server_default="vllm", nullable=False))
        batch_op.add_column(sa.Column("multiple", sa.Boolean(), server_default=sa.text("false"), nullable=False))
        batch_op.add_column(sa.Column("config", sa.Text(), server_default="{}", nullable=False))
        batch_op.add_column(_money("price_in"))
        batch_op.add_column(_money("price_out"))
        batch_op.add_column(sa.Column("updated_at", _TIME(), nullable=True))

    for owner, table in (("key", "api_key"), ("group", "key_group")):
        op.create_table(
            f"{owner}_model",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column(f"{owner}_id", sa.Integer(), nullable=False),
            sa.Column("model_id", sa.Integer(), nullable=False),
            sa.Column("created_at", _TIME(), nullable=False),
            sa.ForeignKeyConstraint([f"{owner}_id"], [f"{table}.id"], ondelete="CASCADE"),
            sa.ForeignKeyConstraint(["model_id"], ["llm_models.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint(f"{owner}_id", "model_id"),
        )
        op.create_index(op.f(f"ix_{owner}_model_model_id"), f"{owner}_model", ["model_id"], unique=False)

    op.create_table(
        "payment",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        _money("fee"),
        sa.Column("created_at", _TIME(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_key.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_payment_key_id"), "payment", ["key_id"], unique=False)

    op.create_table(
        "chat_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("key", _STR(length=128), nullable=False),
        sa.Column("title", _STR(length=64), nullable=True),
        sa.Column("total_in_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("total_out_tokens", sa.BigInteger(), server_default="0", nullable=False),
        _money("total_fee"),
        *_stamps(),
        sa.ForeignKeyConstraint(["key_id"], ["api_key.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_id", "key"),
    )

    op.create_table(
        "bot_connector",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("provider", _STR(length=64), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("secrets_sealed", sa.Text(), nullable=False),
        *_stamps(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "bot_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bot_id", sa.Integer(), nullable=False),
        sa.Column("event_id", _STR(length=128), nullable=False),
        sa.Column("created_at", _TIME(), nullable=False),
        sa.ForeignKeyConstraint(["bot_id"], ["bot_connector.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("bot_id", "event_id"),
    )

    with op.batch_alter_table("metric", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("prompt", sa.Text(), nullable=True))
        for name in ("price_in", "price_out", "fee"):
            batch_op.add_column(_money(name))
        batch_op.add_column(sa.Column("first_byte_latency", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("stream", sa.Boolean(), nullable=True))
        batch_op.create_index(batch_op.f("ix_metric_session_id"), ["session_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_metric_session_id", "chat_session", ["session_id"], ["id"], ondelete="CASCADE"
        )


def downgrade() -> None:
    with op.batch_alter_table("metric", schema=None) as batch_op:
        batch_op.drop_constraint("fk_metric_session_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_metric_session_id"))
        for name in ("stream", "first_byte_latency", "fee", "price_out", "price_in", "prompt", "session_id"):
            batch_op.drop_column(name)
    op.drop_table("bot_event")
    op.drop_table("bot_connector")
    op.drop_table("chat_session")
    op.drop_index(op.f("ix_payment_key_id"), table_name="payment")
    op.drop_table("payment")
    for owner in ("group", "key"):
        op.drop_index(op.f(f"ix_{owner}_model_model_id"), table_name=f"{owner}_model")
        op.drop_table(f"{owner}_model")
    with op.batch_alter_table("llm_models", schema=None) as batch_op:
        for name in ("updated_at", "price_out", "price_in", "config", "multiple", "provider"):
            batch_op.drop_column(name)
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_constraint("fk_api_key_group_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_api_key_group_id"))
        for name in (
            "updated_at", "total_fee", "fee_month", "month_fee", "balance", "month_quota", "email", "group_id",
            "role", "kind",
        ):
            batch_op.drop_column(name)
    op.drop_table("key_group")
