"""Chat bots: the admin routes (`/admin/bot/feishu/*`, alias `/admin/bot-connector/*`) and the Feishu event
receiver. An event is taken once (its id is stored), answered at once (Feishu resends what is not answered
within 3 s), then chatted through this gateway as the bot's key and replied to through Feishu's open API."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import structlog
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_400_BAD_REQUEST, HTTP_403_FORBIDDEN, HTTP_404_NOT_FOUND

from api.brconnector import schemas as s
from api.brconnector.admin import Limit, Offset, PathId, Text
from api.brconnector.envelope import failure, ok, page
from orchestrator.platform.secrets import same_secret
from orchestrator.runtime.container import Deps
from orchestrator.surfaces.feishu.bots import BotView, FeishuBot
from orchestrator.surfaces.feishu.client import FeishuError, Signed, check_signed, decrypt_event, open_unsigned

log = structlog.get_logger(__name__)

_MENTION = re.compile(r"@_user_\d+\s*")
MAX_EVENT_ID = 128


def _out(b: BotView) -> dict[str, Any]:
    return {
        "id": b.id,
        "name": b.name,
        "provider": b.provider,
        "config": b.config,
        "created_at": b.created_at,
        "updated_at": b.updated_at,
    }


class _Bots(Controller):
    tags = ["connector: bots"]

    @get("/list")
    async def listing(
        self, deps: NamedDependency[Deps], *, q: Text = None, limit: Limit = 20, offset: Offset = 0
    ) -> dict[str, Any]:
        p = await deps.bots.page(q=q, limit=limit, offset=offset)
        return page(p, [_out(b) for b in p.items])

    @get("/detail/{bot_id:int}")
    async def detail(self, deps: NamedDependency[Deps], bot_id: PathId) -> dict[str, Any]:
        return ok(_out(await deps.bots.get(bot_id)))

    @post("/save", status_code=HTTP_200_OK)
    async def save(self, deps: NamedDependency[Deps], data: JSONBody[s.BotSaveIn]) -> dict[str, Any]:
        config = None if data.config is None else s.json_object("config", data.config)
        return ok(_out(await deps.bots.save(data.id, data.name, data.provider, config)))

    @post("/delete", status_code=HTTP_200_OK)
    async def remove(self, deps: NamedDependency[Deps], data: JSONBody[s.IdIn]) -> dict[str, Any]:
        await deps.bots.delete(data.id)
        return ok(True)


class FeishuBots(_Bots):
    path = "/admin/bot/feishu"


class BotConnectors(_Bots):
    path = "/admin/bot-connector"


class FeishuReceiver:
    """Takes Feishu's events for the bots; answers run as tasks the receiver owns and cancels on close."""

    def __init__(self, deps: Deps, gateway: httpx.AsyncClient) -> None:
        self._deps = deps
        self._gateway = gateway
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._gateway.aclose()

    async def receive(self, name: str, headers: dict[str, str], raw: bytes) -> Response[Any]:
        # No bot's name holds a NUL (names are refused with one), and PostgreSQL cannot compare one.
        bot = None if "\x00" in name else await self._deps.bots.feishu(name)
        if bot is None:
            return failure(f"bot {name} is not found", HTTP_404_NOT_FOUND)
        try:
            doc = _event(bot, headers, raw)
        except FeishuError as e:
            return failure(str(e), HTTP_400_BAD_REQUEST)
        if doc.get("type") == "url_verification":
            return Response({"challenge": doc.get("challenge")})
        header: dict[str, Any] = doc["header"] if isinstance(doc.get("header"), dict) else {}
        if not same_secret(str(header.get("app_id", "")), bot.app_id):
            return failure("the event is not for this bot's app", HTTP_403_FORBIDDEN)
        event_id = str(header.get("event_id", ""))
        is_message = header.get("event_type") == "im.message.receive_v1" and 0 < len(event_id) <= MAX_EVENT_ID
        if not is_message or not await self._deps.bots.take_event(bot.id, event_id):
            # Other events are acknowledged and ignored; a message seen before was answered already.
            log.info("feishu.event_skipped", bot=bot.name, event_id=event_id, message=is_message)
            return Response({})
        task = asyncio.get_running_loop().create_task(self._answer(bot, doc.get("event") or {}, event_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Response({})

    async def _answer(self, bot: FeishuBot, event: dict[str, Any], event_id: str) -> None:
        message = event.get("message") or {}
        message_id, chat_id = str(message.get("message_id", "")), str(message.get("chat_id", ""))
        text = _text(message)
        try:
            reply = await self._chat(bot, chat_id, text) if text else "Only text messages are supported."
            await self._deps.feishu.reply_text(bot.app_id, bot.app_secret, message_id, reply)
            log.info("feishu.answered", bot=bot.name, event_id=event_id)
        except (FeishuError, httpx.HTTPError) as e:
            log.warning("feishu.answer_failed", bot=bot.name, event_id=event_id, error=str(e))

    async def _chat(self, bot: FeishuBot, chat_id: str, text: str) -> str:
        """One call through this gateway as the bot's key: billed, recorded, in the chat's session."""
        headers = {"Authorization": f"Bearer {bot.api_key}"}
        if chat_id:
            headers["Session-Id"] = chat_id
        body = {"model": bot.model, "messages": [{"role": "user", "content": text}]}
        r = await self._gateway.post("/v1/chat/completions", json=body, headers=headers, timeout=300)
        try:  # the gateway relays an engine's own error body, whatever its shape
            answer = r.json()
            if r.status_code != HTTP_200_OK:
                error = answer.get("error") if isinstance(answer, dict) else None
                return f"Error: {error.get('message') if isinstance(error, dict) else error or r.status_code}"
            return str(answer["choices"][0]["message"].get("content") or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return f"Error: HTTP {r.status_code}"


def _event(bot: FeishuBot, headers: dict[str, str], raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
        raise FeishuError("the event is not JSON") from e
    if not isinstance(doc, dict):
        raise FeishuError("the event is not a JSON object")
    if bot.encrypt_key is None:
        if "encrypt" in doc:
            raise FeishuError("the event is encrypted but the bot has no encryptKey")
        return doc
    if not isinstance(doc.get("encrypt"), str):
        raise FeishuError("the bot has an encryptKey: events must be encrypted")
    sent = headers.get("x-lark-signature")
    if sent is None:
        return open_unsigned(bot.encrypt_key, doc["encrypt"])  # a URL verification, or refused
    timestamp, nonce = headers.get("x-lark-request-timestamp", ""), headers.get("x-lark-request-nonce", "")
    check_signed(bot.encrypt_key, raw, Signed(timestamp, nonce, sent), now=time.time())
    return decrypt_event(bot.encrypt_key, doc["encrypt"])


def _text(message: dict[str, Any]) -> str:
    if message.get("message_type") != "text":
        return ""
    try:
        content = json.loads(message.get("content") or "{}")
    except json.JSONDecodeError:
        return ""
    return _MENTION.sub("", str(content.get("text", ""))).strip() if isinstance(content, dict) else ""


@post("/bot/feishu/{name:str}/webhook/event", status_code=HTTP_200_OK, tags=["connector: bots"])
async def feishu_event(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[Any]:
    receiver: FeishuReceiver = request.app.state.feishu_receiver
    return await receiver.receive(name, dict(request.headers), await request.body())
