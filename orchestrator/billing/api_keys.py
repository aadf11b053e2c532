"""Client API keys: issue (the plain key is returned once, only its HMAC is kept) and revoke."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from orchestrator.platform.secrets import hash_api_key, key_hint, new_api_key
from orchestrator.store.api_keys import ApiKeyStore, KeyRemoval
from orchestrator.store.tables import ApiKey

log = structlog.get_logger(__name__)

DEFAULT_RPM = 160


@dataclass(frozen=True)
class IssuedKey:
    id: int
    api_key: str
    enabled: bool
    allowed_rpm: int


class ApiKeyService:
    def __init__(
        self,
        store: ApiKeyStore,
        secret_key: str,
        on_change: Callable[[], Awaitable[None]],
        in_use: Callable[[int], Awaitable[bool]] | None = None,
    ) -> None:
        self._store = store
        self._secret = secret_key
        self._on_change = on_change
        self._in_use = in_use
        """Whether a key has calls in flight or not yet written, here (it writes what it can first) or, with
        Redis, on another instance."""

    async def issue(
        self, user_id: str, *, allowed_rpm: int | None = None, name: str | None = None, allowed_ips: str = ""
    ) -> IssuedKey:
        plain = new_api_key()
        row = ApiKey(
            user_id=user_id,
            name=name,
            key_hash=hash_api_key(self._secret, plain),
            key_hint=key_hint(plain),
            allowed_rpm=allowed_rpm if allowed_rpm is not None else DEFAULT_RPM,
            allowed_ips=allowed_ips,
        )
        row = await self._store.create_api_key(row)
        await self._on_change()
        assert row.id is not None
        log.info("api_key.issued", api_key_id=row.id, user_id=user_id, allowed_rpm=row.allowed_rpm)
        return IssuedKey(row.id, plain, row.enabled, row.allowed_rpm)

    async def remove(self, user_id: str, key_id: int) -> KeyRemoval:
        # A call answered a moment ago may not be written yet: the key is then only disabled, as a used key is,
        # so its usage stays its own.
        try:
            in_use = self._in_use is not None and await self._in_use(key_id)
            outcome = await self._store.remove_api_key(user_id, key_id, in_use=in_use)
        finally:
            await self._on_change()  # a disabled key is refused from the next request on (and a kept one served)
        log.info("api_key.removed", api_key_id=key_id, user_id=user_id, outcome=outcome.value)
        return outcome
