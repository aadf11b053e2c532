"""The connector's accounts: keys (issued as `br-` keys, only their HMAC kept), recharges, groups, and which
models a key or a group may call. Every change reaches the gateway's memory before the call returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from orchestrator.billing.ledger import Ledger
from orchestrator.domain.errors import InvalidInput
from orchestrator.domain.money import month_of
from orchestrator.domain.spend import CONNECTOR, Account
from orchestrator.platform.secrets import hash_api_key, key_hint, new_connector_key
from orchestrator.store.accounts import AccountStore, Binding, Toggle, Totals
from orchestrator.store.listing import Page
from orchestrator.store.tables import ApiKey, KeyGroup, Payment

log = structlog.get_logger(__name__)

CONNECTOR_RPM = 1_000_000
"""The connector has no per-key rate limit: its keys get one this high unless `allowed_rpm` is given."""


@dataclass(frozen=True)
class KeyRef:
    """A key named by its id or by the key itself (the connector accepts either)."""

    id: int | None = None
    api_key: str | None = None


class AccountService:
    def __init__(
        self, store: AccountStore, ledger: Ledger, secret_key: str, on_change: Callable[[], Awaitable[None]]
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._secret = secret_key
        self._on_change = on_change

    async def _id(self, ref: KeyRef) -> int:
        if ref.id is not None:
            return ref.id
        if not ref.api_key:
            raise InvalidInput("id", "api_key or id is required")
        return await self._store.key_id_by_hash(hash_api_key(self._secret, ref.api_key))

    # -- keys -------------------------------------------------------------------------------

    async def apply(
        self,
        *,
        name: str,
        group_id: int | None,
        role: str,
        email: str | None,
        month_quota: int,
        balance: int,
        allowed_rpm: int | None = None,
        allowed_ips: str = "",
    ) -> tuple[ApiKey, str]:
        plain = new_connector_key()
        key = ApiKey(
            user_id=name,
            name=name,
            key_hash=hash_api_key(self._secret, plain),
            key_hint=key_hint(plain),
            allowed_rpm=allowed_rpm or CONNECTOR_RPM,
            kind=CONNECTOR,
            role=role,
            group_id=group_id,
            email=email,
            month_quota=month_quota,
            balance=balance,
            fee_month=month_of(),
            allowed_ips=allowed_ips,
        )
        key = await self._store.add_key(key)
        await self._on_change()
        log.info("account.key_issued", key_id=key.id, role=role, group_id=group_id)
        return key, plain

    async def update(self, key_id: int, changes: dict[str, Any]) -> ApiKey:
        key = await self._store.update_key(key_id, changes)
        await self._on_change()
        log.info("account.key_updated", key_id=key_id, fields=sorted(changes))
        return key

    async def recharge(self, ref: KeyRef, amount: int) -> ApiKey:
        key_id = await self._id(ref)
        key = await self._store.recharge(key_id, amount)
        await self._on_change()
        log.info("account.recharged", key_id=key_id, amount=amount)
        return key

    async def reset(self, ref: KeyRef) -> tuple[ApiKey, str]:
        """A new key in place of the old one, which stops working at once."""
        key_id = await self._id(ref)
        plain = new_connector_key()
        key = await self._store.update_key(
            key_id, {"key_hash": hash_api_key(self._secret, plain), "key_hint": key_hint(plain)}
        )
        await self._on_change()
        log.info("account.key_reset", key_id=key_id)
        return key, plain

    async def delete(self, ref: KeyRef) -> None:
        key_id = await self._id(ref)
        await self._store.delete_key(key_id)
        await self._on_change()
        log.info("account.key_deleted", key_id=key_id)

    async def key(self, key_id: int) -> ApiKey:
        return await self._store.key(key_id)

    def account_now(self, key_id: int) -> Account | None:
        """The key's account as the gateway holds it this month, with the fees not yet written; None for a key the
        gateway has not loaded."""
        return self._ledger.account(key_id, month_of())

    async def keys(self, **filters: Any) -> Page[tuple[ApiKey, str | None]]:
        return await self._store.keys(**filters)

    async def payments(self, *, key_id: int | None, limit: int, offset: int) -> Page[Payment]:
        return await self._store.payments(key_id=key_id, limit=limit, offset=offset)

    async def totals(self) -> Totals:
        now = datetime.now(UTC)
        return await self._store.totals(
            month_of(now.timestamp()), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        )

    # -- groups and bindings ----------------------------------------------------------------

    async def groups(self, *, q: str | None, limit: int, offset: int) -> Page[KeyGroup]:
        return await self._store.groups(q=q, limit=limit, offset=offset)

    async def group(self, group_id: int) -> KeyGroup:
        return await self._store.group(group_id)

    async def save_group(self, group_id: int | None, name: str | None, key: str | None) -> KeyGroup:
        if group_id is None and not name:
            raise InvalidInput("name", "name is required")
        group = await self._store.save_group(group_id, name, key)
        log.info("account.group_saved", group_id=group.id)
        return group

    async def delete_group(self, group_id: int) -> None:
        await self._store.delete_group(group_id)
        await self._on_change()
        log.info("account.group_deleted", group_id=group_id)

    async def toggle_key_model(self, key_id: int, model_id: int) -> Toggle:
        outcome = await self._store.toggle_key_model(key_id, model_id)
        await self._on_change()
        log.info("account.key_model", key_id=key_id, model_id=model_id, outcome=outcome)
        return outcome

    async def toggle_group_model(self, group_id: int, model_id: int) -> Toggle:
        outcome = await self._store.toggle_group_model(group_id, model_id)
        await self._on_change()
        log.info("account.group_model", group_id=group_id, model_id=model_id, outcome=outcome)
        return outcome

    async def key_models(self, *, key_id: int | None, q: str | None, limit: int, offset: int) -> Page[Binding]:
        return await self._store.key_models(key_id=key_id, q=q, limit=limit, offset=offset)

    async def group_models(self, *, group_id: int | None, q: str | None, limit: int, offset: int) -> Page[Binding]:
        return await self._store.group_models(group_id=group_id, q=q, limit=limit, offset=offset)
