"""Chat bots (Feishu): saved with their app secrets, the key they chat as and the encryption key sealed at
rest; shown with those masked; opened only to answer an event."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from orchestrator.domain.errors import InvalidInput
from orchestrator.platform.secrets import MASK, SecretBox, hash_api_key
from orchestrator.store.bots import BotStore
from orchestrator.store.listing import Page
from orchestrator.store.tables import BotConnector, row_id

log = structlog.get_logger(__name__)

FEISHU = "feishu"
_PUBLIC = ("appId", "modelId")
_SECRET = ("appSecret", "apiKey", "encryptKey")
_REQUIRED = ("appId", "appSecret", "apiKey")
MAX_FIELD = 512


@dataclass(frozen=True)
class BotView:
    id: int
    name: str
    provider: str
    config: dict[str, str]
    """Public fields as saved; secret fields as MASK."""
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class FeishuBot:
    id: int
    name: str
    app_id: str
    app_secret: str
    api_key: str
    model: str
    encrypt_key: str | None


class BotService:
    def __init__(self, store: BotStore, box: SecretBox, secret_key: str) -> None:
        self._store = store
        self._box = box
        self._secret = secret_key

    async def page(self, *, q: str | None, limit: int, offset: int) -> Page[BotView]:
        page = await self._store.bots(q=q, limit=limit, offset=offset)
        return Page([self._view(b) for b in page.items], page.total, page.limit, page.offset)

    async def get(self, bot_id: int) -> BotView:
        return self._view(await self._store.bot(bot_id))

    async def save(
        self, bot_id: int | None, name: str | None, provider: str | None, config: dict[str, Any] | None
    ) -> BotView:
        if provider is not None and provider != FEISHU:
            raise InvalidInput("provider", f"provider must be {FEISHU}")
        if bot_id is None:
            bot = _new(name, provider, config)
            public: dict[str, str] = {}
            secrets: dict[str, str] = {}
        else:
            bot = await self._store.bot(bot_id)
            bot.name = name or bot.name
            public = json.loads(bot.config)
            secrets = json.loads(self._box.open(bot.secrets_sealed))
        for field, value in _fields(config or {}).items():
            if field in _SECRET:
                if value != MASK:  # the masked value shown back unchanged keeps the secret
                    secrets[field] = value
            else:
                public[field] = value
        for field in _REQUIRED:
            if not (public.get(field) or secrets.get(field)):
                raise InvalidInput("config", f"config.{field} is required")
        if not await self._store.key_exists(hash_api_key(self._secret, secrets["apiKey"])):
            raise InvalidInput("config", "config.apiKey is not a valid API key")
        bot.config = json.dumps(public)
        bot.secrets_sealed = self._box.seal(json.dumps(secrets))
        saved = await self._store.save(bot)
        log.info("bot.saved", bot_id=saved.id, name=saved.name)
        return self._view(saved)

    async def delete(self, bot_id: int) -> None:
        await self._store.delete(bot_id)
        log.info("bot.deleted", bot_id=bot_id)

    async def feishu(self, name: str) -> FeishuBot | None:
        bot = await self._store.bot_named(name, FEISHU)
        if bot is None:
            return None
        public = json.loads(bot.config)
        secrets = json.loads(self._box.open(bot.secrets_sealed))
        return FeishuBot(
            id=row_id(bot.id),
            name=bot.name,
            app_id=public["appId"],
            app_secret=secrets["appSecret"],
            api_key=secrets["apiKey"],
            model=public.get("modelId") or "default",
            encrypt_key=secrets.get("encryptKey") or None,
        )

    async def take_event(self, bot_id: int, event_id: str) -> bool:
        return await self._store.take_event(bot_id, event_id)

    def _view(self, bot: BotConnector) -> BotView:
        config = dict(json.loads(bot.config))
        config.update(dict.fromkeys(json.loads(self._box.open(bot.secrets_sealed)), MASK))
        return BotView(row_id(bot.id), bot.name, bot.provider, config, bot.created_at, bot.updated_at)


def _new(name: str | None, provider: str | None, config: dict[str, Any] | None) -> BotConnector:
    if not name:
        raise InvalidInput("name", "name is required")
    if provider is None:
        raise InvalidInput("provider", "provider is required")
    if config is None:
        raise InvalidInput("config", "config is required")
    return BotConnector(name=name, provider=provider, config="{}", secrets_sealed="")


def _fields(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for field, value in config.items():
        if field not in _PUBLIC and field not in _SECRET:
            raise InvalidInput("config", f"config.{field} is not a field of a Feishu bot")
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > MAX_FIELD:
            raise InvalidInput("config", f"config.{field} must be a string of at most {MAX_FIELD} characters")
        out[field] = value
    return out
