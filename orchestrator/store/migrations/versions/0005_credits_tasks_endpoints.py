"""LlmEndpoint and Moonshot surfaces: per-key IP allowlists, credit rates (seeded with LlmEndpoint's table),
the durable completion task queue, and external llm_endpoints

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence
from decimal import Decimal

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STR = sqlmodel.sql.sqltypes.AutoString
_TIME = sqlmodel.sql.sqltypes.UTCDateTime

# LlmEndpoint's published rates, in cents per input character and per output token.
RATES_CENTS = {
    "llama3.1": ("0.01", "0.02"),
    "llama3": ("0.015", "0.025"),
    "llama2": ("0.02", "0.03"),
    "mistral": ("0.012", "0.022"),
    "qwen": ("0.018", "0.028"),
    "gemma2": ("0.016", "0.026"),
    "llama3.2": ("0.014", "0.024"),
    "qwen2": ("0.017", "0.027"),
    "zephyr": ("0.019", "0.029"),
    "gemma": ("0.013", "0.023"),
    "llava": ("0.015", "0.025"),
    "mistral-nemo": ("0.011", "0.021"),
    "phi3": ("0.02", "0.03"),
    "wizardlm2": ("0.018", "0.028"),
    "orca-mini": ("0.019", "0.029"),
    "codellama": ("0.017", "0.027"),
    "llama2-uncensored": ("0.015", "0.025"),
    "owl_t-lite": ("0.014", "0.024"),
}
_UNITS_PER_CENT = 10**10  # orchestrator.domain.money.UNIT / 100, written out: migrations do not import the app


def _units(cents: str) -> int:
    return int(Decimal(cents) * _UNITS_PER_CENT)


def upgrade() -> None:
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.add_column(sa.Column("allowed_ips", sa.Text(), server_default="", nullable=False))
    rates = op.create_table(
        "credit_rate",
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("input_rate", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("output_rate", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    op.bulk_insert(
        rates,
        [{"model": m, "input_rate": _units(i), "output_rate": _units(o)} for m, (i, o) in RATES_CENTS.items()],
    )
    op.create_table(
        "completion_task",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("model", _STR(length=255), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", _TIME(), nullable=False),
        sa.Column("started_at", _TIME(), nullable=True),
        sa.Column("completed_at", _TIME(), nullable=True),
        sa.ForeignKeyConstraint(["key_id"], ["api_key.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_completion_task_key_id"), "completion_task", ["key_id"], unique=False)
    op.create_index("ix_completion_task_status_created", "completion_task", ["status", "created_at"], unique=False)
    op.create_table(
        "llm_endpoint",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("connector_type", sa.String(length=64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("token_sealed", sa.Text(), server_default="", nullable=False),
        sa.Column("max_calls_per_second", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_concurrency", sa.Integer(), server_default="0", nullable=False),
        sa.Column("params", sa.Text(), server_default="{}", nullable=False),
        sa.Column("created_at", _TIME(), nullable=False),
        sa.Column("updated_at", _TIME(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("llm_endpoint")
    op.drop_index("ix_completion_task_status_created", table_name="completion_task")
    op.drop_index(op.f("ix_completion_task_key_id"), table_name="completion_task")
    op.drop_table("completion_task")
    op.drop_table("credit_rate")
    with op.batch_alter_table("api_key", schema=None) as batch_op:
        batch_op.drop_column("allowed_ips")
