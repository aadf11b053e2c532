"""Bodies of the connector's admin API (pydantic; extra fields are ignored, as the connector does), and the
shapes its answers give to rows."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from orchestrator.domain import money
from orchestrator.domain.errors import InvalidInput
from orchestrator.platform.secrets import allowlist
from orchestrator.store.accounts import Binding
from orchestrator.store.tables import ApiKey, ChatSession, KeyGroup, LlmModel, Metric, Payment, row_id

MAX_ID = 2**31 - 1
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
GroupId = Annotated[int, Field(ge=0, le=MAX_ID)]
"""0: no group, as the connector writes it."""
Name = Annotated[str, Field(min_length=1, max_length=255)]
Rpm = Annotated[int, Field(ge=1, le=10**9)]
Role = Literal["user", "admin"]
Amount = Decimal | None
AllowedIps = Annotated[list[str], AfterValidator(allowlist)]
"""Addresses or networks a key may be used from; [] means anywhere."""


NO_NUL = r"^[^\x00]*$"
"""A text query parameter without NUL: PostgreSQL's text cannot hold one, so it is refused at the edge."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    # PostgreSQL's text cannot hold NUL: refused at the edge, on every string field.
    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: object) -> object:
        if isinstance(v, str) and "\x00" in v:
            raise PydanticCustomError("no_nul", "must not contain NUL characters")
        return v


class ApplyKeyIn(_Body):
    name: Name
    group_id: GroupId = 0
    role: Role = "user"
    email: str | None = Field(default=None, max_length=255)
    month_quota: Amount = None
    balance: Amount = None
    allowed_rpm: Rpm | None = None
    allowed_ips: AllowedIps = []


class UpdateKeyIn(_Body):
    id: Id
    name: Name | None = None
    role: Role | None = None
    group_id: GroupId | None = None
    email: str | None = Field(default=None, max_length=255)
    month_quota: Amount = None
    allowed_rpm: Rpm | None = None
    allowed_ips: AllowedIps | None = None


class KeyRefIn(_Body):
    id: Id | None = None
    api_key: str | None = Field(default=None, max_length=255)


class RechargeIn(KeyRefIn):
    balance: Amount = None


class IdIn(_Body):
    id: Id


class ModelSaveIn(_Body):
    id: Id | None = None
    name: Name | None = None
    provider: str | None = Field(default=None, min_length=1, max_length=64)
    multiple: bool | None = None
    config: str | dict[str, Any] | None = None
    price_in: Amount = None
    price_out: Amount = None


class GroupSaveIn(_Body):
    id: Id | None = None
    name: Name | None = None
    key: str | None = Field(default=None, max_length=255)


class KeyBindIn(_Body):
    key_id: Id
    model_id: Id


class GroupBindIn(_Body):
    group_id: Id
    model_id: Id


class BotSaveIn(_Body):
    id: Id | None = None
    name: str | None = Field(default=None, min_length=1, max_length=64)
    provider: str | None = Field(default=None, max_length=64)
    config: str | dict[str, Any] | None = None


# -- inputs the schema cannot check alone --------------------------------------------------


def units(field: str, value: Decimal | None, convert: Callable[[Decimal], int] = money.units) -> int:
    """Dollars as entered -> money units (or whatever `convert` makes of them), with the field named in the error."""
    try:
        return convert(value if value is not None else Decimal(0))
    except money.BadAmount as e:
        raise InvalidInput(field, f"{field} {e}") from e


def per_token(field: str, value: Decimal | None) -> int:
    """A price entered in dollars per million tokens -> units per token."""
    return units(field, value, money.per_token)


def json_object(field: str, value: str | dict[str, Any] | None) -> dict[str, Any]:
    """A JSON object given as an object or as a string holding one (the connector takes both)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise InvalidInput(field, f"{field} is not valid JSON: {e.msg}") from e
    if not isinstance(value, dict):
        raise InvalidInput(field, f"{field} must be a JSON object")
    return value


# -- answers -------------------------------------------------------------------------------


def key_out(key: ApiKey, *, group_name: str | None = None, api_key: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row_id(key.id),
        "name": key.name,
        "email": key.email,
        "role": key.role,
        "kind": key.kind,
        "group_id": key.group_id or 0,
        "month_quota": money.usd(key.month_quota),
        "balance": money.usd(key.balance),
        "month_fee": money.usd(key.month_fee),
        "total_fee": money.usd(key.total_fee),
        "key_hint": key.key_hint,
        "enabled": key.enabled,
        "allowed_rpm": key.allowed_rpm,
        "allowed_ips": key.allowed_ips.split(",") if key.allowed_ips else [],
        "created_at": key.created_at,
        "updated_at": key.updated_at,
    }
    if group_name is not None:
        out["group_name"] = group_name
    if api_key is not None:
        out["api_key"] = api_key  # the plain key: shown once, when it is made
    return out


def payment_out(p: Payment) -> dict[str, Any]:
    return {"id": row_id(p.id), "key_id": p.key_id, "fee": money.usd(p.fee), "created_at": p.created_at}


def model_out(m: LlmModel) -> dict[str, Any]:
    return {
        "id": row_id(m.id),
        "name": m.name,
        "provider": m.provider,
        "multiple": m.multiple,
        "config": json.loads(m.config),
        "price_in": money.usd(m.price_in),  # per token, as the connector lists them
        "price_out": money.usd(m.price_out),
        "created_at": m.created_at,
        "updated_at": m.updated_at or m.created_at,
    }


def group_out(g: KeyGroup) -> dict[str, Any]:
    return {"id": row_id(g.id), "name": g.name, "key": g.key, "created_at": g.created_at, "updated_at": g.updated_at}


def binding_out(b: Binding, owner: Literal["key", "group"]) -> dict[str, Any]:
    return {
        "id": b.id,
        f"{owner}_id": b.owner_id,
        f"{owner}_name": b.owner_name,
        "model_id": b.model_id,
        "model_name": b.model_name,
        "created_at": b.created_at,
    }


def session_out(s: ChatSession) -> dict[str, Any]:
    return {
        "id": row_id(s.id),
        "key": s.key,
        "key_id": s.key_id,
        "title": s.title,
        "total_in_tokens": s.total_in_tokens,
        "total_out_tokens": s.total_out_tokens,
        "total_fee": money.usd(s.total_fee),
        "currency": "USD",
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    }


def thread_out(t: Metric, *, detail: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row_id(t.id),
        "prompt": t.prompt,
        "completion": t.choices,
        "session_id": t.session_id,
        "tokens_in": t.prompt_tokens,
        "tokens_out": t.completion_tokens,
        "fee": money.usd(t.fee),
    }
    if detail:
        out.update(
            {
                "whole_prompt": t.input,
                "key_id": t.api_key_id,
                "model": t.model,
                "price_in": money.usd(t.price_in),
                "price_out": money.usd(t.price_out),
                "currency": "USD",
                "invocation_latency": None if t.duration is None else round(t.duration * 1000),
                "first_byte_latency": t.first_byte_latency,
                "stream": t.stream,
                "thread_type": 0 if t.stream else 1,
                "status_code": t.status_code,
                "created": t.created,
            }
        )
    return out
