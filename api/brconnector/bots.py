"""Chat bots: the admin routes (`/admin/bot/feishu/*`, alias `/admin/bot-connector/*`) and Feishu's event
callback, which opens and verifies an event (decrypted, signed, for the bot's app) and hands it to the receiver
(`orchestrator.surfaces.feishu.receiver`), answering Feishu at once."""

from __future__ import annotations

import json
import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_200_OK, HTTP_400_BAD_REQUEST, HTTP_403_FORBIDDEN, HTTP_404_NOT_FOUND

from api.brconnector import schemas as s
from api.brconnector.admin import Limit, Offset, PathId, Text
from api.brconnector.envelope import failure, ok, page
from orchestrator.platform.secrets import same_secret
from orchestrator.surfaces.feishu.bots import BotService, BotView, FeishuBot
from orchestrator.surfaces.feishu.client import FeishuError, Signed, check_signed, decrypt_event, open_unsigned
from orchestrator.surfaces.feishu.receiver import FeishuReceiver


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
        self, bots: NamedDependency[BotService], *, q: Text = None, limit: Limit = 20, offset: Offset = 0
    ) -> dict[str, Any]:
        p = await bots.page(q=q, limit=limit, offset=offset)
        return page(p, [_out(b) for b in p.items])

    @get("/detail/{bot_id:int}")
    async def detail(self, bots: NamedDependency[BotService], bot_id: PathId) -> dict[str, Any]:
        return ok(_out(await bots.get(bot_id)))

    @post("/save", status_code=HTTP_200_OK)
    async def save(self, bots: NamedDependency[BotService], data: JSONBody[s.BotSaveIn]) -> dict[str, Any]:
        config = None if data.config is None else s.json_object("config", data.config)
        return ok(_out(await bots.save(data.id, data.name, data.provider, config)))

    @post("/delete", status_code=HTTP_200_OK)
    async def remove(self, bots: NamedDependency[BotService], data: JSONBody[s.IdIn]) -> dict[str, Any]:
        await bots.delete(data.id)
        return ok(True)


class FeishuBots(_Bots):
    path = "/admin/bot/feishu"


class BotConnectors(_Bots):
    path = "/admin/bot-connector"


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


@post("/bot/feishu/{name:str}/webhook/event", status_code=HTTP_200_OK, tags=["connector: bots"])
async def feishu_event(
    request: Request[Any, Any, Any], feishu_receiver: NamedDependency[FeishuReceiver], name: FromPath[str]
) -> Response[Any]:
    """Feishu's callback for one bot: its event opened and verified here, then handed to the receiver (answered
    in the background), and acknowledged at once."""
    raw = await request.body()
    bot = await feishu_receiver.bot(name)
    if bot is None:
        return failure(f"bot {name} is not found", HTTP_404_NOT_FOUND)
    try:
        doc = _event(bot, dict(request.headers), raw)
    except FeishuError as e:
        return failure(str(e), HTTP_400_BAD_REQUEST)
    if doc.get("type") == "url_verification":
        return Response({"challenge": doc.get("challenge")})
    header: dict[str, Any] = doc["header"] if isinstance(doc.get("header"), dict) else {}
    if not same_secret(str(header.get("app_id", "")), bot.app_id):
        return failure("the event is not for this bot's app", HTTP_403_FORBIDDEN)
    await feishu_receiver.take(bot, header, doc.get("event") or {})
    return Response({})
