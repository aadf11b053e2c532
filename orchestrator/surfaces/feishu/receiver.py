"""The Feishu bots' event workflow, once the api has verified and opened an event: a message is taken once (its
event id stored, so a resend is not answered twice), then answered in the background, since Feishu resends what it
does not get an answer to within 3 s. The answer is one chat call through the gateway, in process, as the bot's
key (authenticated, admitted, held, billed and recorded in the chat's session like any client's call), and its
text is replied to the message through Feishu's open API.

A refusal of the gateway is replied as `Error: <its words>`, in the words of its OpenAI envelope
(`api/gateway/envelopes.py`), as the bot's chat got them when it called the gateway over HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec
import structlog

from orchestrator.gateway.catalog import KeyInfo, ModelInfo
from orchestrator.gateway.flow import (
    Gateway,
    GatewayError,
    IpRefused,
    NoReplica,
    Outcome,
    Unauthorized,
    UnknownModel,
    UpstreamFailed,
    usage_of,
)
from orchestrator.gateway.http1 import BrokenOff
from orchestrator.surfaces.feishu.bots import BotService, FeishuBot
from orchestrator.surfaces.feishu.client import FeishuClient, FeishuError

log = structlog.get_logger(__name__)

MESSAGE_EVENT = "im.message.receive_v1"
MAX_EVENT_ID = 128
MAX_SESSION_ID = 128
"""The gateway's bound on a Session-Id (a chat's id is the session)."""
MAX_BODY = 4 * 1024 * 1024
"""The gateway's bound on a request body."""
OWN_ADDRESS = "127.0.0.1"
"""Where a bot's call comes from, for its key's IP allowlist: this server itself."""
NOT_TEXT = "Only text messages are supported."
_MENTION = re.compile(r"@_user_\d+\s*")
_SEE_MODELS = "Call `/v1/models` to view available models for your key."


class FeishuReceiver:
    """Takes Feishu's events for the bots; answers run as tasks the receiver owns and cancels on close."""

    def __init__(self, bots: BotService, gateway: Gateway, feishu: FeishuClient) -> None:
        self._bots = bots
        self._gw = gateway
        self._feishu = feishu
        self._tasks: set[asyncio.Task[None]] = set()

    async def bot(self, name: str) -> FeishuBot | None:
        """The Feishu bot of that name, with its secrets opened to verify and answer its events."""
        # No bot's name holds a NUL (names are refused with one), and PostgreSQL cannot compare one.
        return None if "\x00" in name else await self._bots.feishu(name)

    async def take(self, bot: FeishuBot, header: Mapping[str, Any], event: Mapping[str, Any]) -> None:
        """A verified event for `bot` (its `header` and `event`): a message not seen before is answered in the
        background; other events, and a message seen before, are only logged."""
        event_id = str(header.get("event_id", ""))
        is_message = header.get("event_type") == MESSAGE_EVENT and 0 < len(event_id) <= MAX_EVENT_ID
        if not is_message or not await self._bots.take_event(bot.id, event_id):
            # Other events are acknowledged and ignored; a message seen before was answered already.
            log.info("feishu.event_skipped", bot=bot.name, event_id=event_id, message=is_message)
            return
        task = asyncio.get_running_loop().create_task(self._answer(bot, event, event_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the answers under way, then close the Feishu client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._feishu.aclose()

    async def _answer(self, bot: FeishuBot, event: Mapping[str, Any], event_id: str) -> None:
        message = event.get("message") or {}
        message_id, chat_id = str(message.get("message_id", "")), str(message.get("chat_id", ""))
        text = _text(message)
        try:
            reply = await self._chat(bot, chat_id, text) if text else NOT_TEXT
            await self._feishu.reply_text(bot.app_id, bot.app_secret, message_id, reply)
            log.info("feishu.answered", bot=bot.name, event_id=event_id)
        except (FeishuError, httpx.HTTPError) as e:
            log.warning("feishu.answer_failed", bot=bot.name, event_id=event_id, error=str(e))

    async def _chat(self, bot: FeishuBot, chat_id: str, text: str) -> str:
        """One chat call through the gateway as the bot's key: billed, recorded, in the chat's session."""
        session = chat_id.strip() or None
        request = {"model": bot.model, "messages": [{"role": "user", "content": text}]}
        raw = json.dumps(request, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        gw = self._gw
        try:
            key = gw.authenticate(bot.api_key.strip(), OWN_ADDRESS)
            await gw.admit(key)
            if session is not None and len(session) > MAX_SESSION_ID:
                return f"Error: Session-Id must be at most {MAX_SESSION_ID} characters."
            if len(raw) > MAX_BODY:
                return f"Error: Request body larger than {MAX_BODY} bytes."
            model = gw.resolve(key, bot.model)  # a connector key falls back to its "default" model
            body = raw if model.name == bot.model else _with_model(raw, model.name)
            status, payload = await self._call(key, model, raw, body, session)
        except GatewayError as e:
            return f"Error: {_refusal(e)}"
        return _reply(status, payload)

    async def _call(
        self, key: KeyInfo, model: ModelInfo, raw: bytes, body: bytes, session: str | None
    ) -> tuple[int, bytes]:
        """The engine's status and answer to `body` (`raw` as asked, which is recorded); the call is accounted for
        once, however it ends."""
        gw = self._gw
        hold = await gw.hold(key, model, prompt_bound=len(body), max_tokens=None)
        call = await gw.open(model.name, "/chat/completions", body, hold=hold)
        outcome = Outcome(500)
        try:
            payload = await call.response.read()
            outcome.status = call.response.status
            outcome.usage = usage_of(payload) if outcome.status == 200 else None
            outcome.answer = payload
            outcome.first_byte = time.perf_counter()
        except (BrokenOff, TimeoutError) as e:
            outcome.status = 502
            raise UpstreamFailed(f"the replica broke off its answer: {type(e).__name__}") from e
        finally:
            durable = gw.finish(call, key, model, "chat", raw, outcome, stream=False, session=session)
        if durable is not None:
            await durable  # the answer is used only once the call is on disk
        return outcome.status, payload


def _with_model(raw: bytes, model: str) -> bytes:
    doc: dict[str, Any] = msgspec.json.decode(raw)
    doc["model"] = model
    return msgspec.json.encode(doc)


def _refusal(e: GatewayError) -> str:
    """The gateway's words for a refusal, as its OpenAI envelope has them."""
    match e:
        case IpRefused():
            return str(e)
        case Unauthorized():
            return "Invalid API key."
        case UnknownModel() if e.connector:
            return f"The model [{e.model}] is not found."
        case UnknownModel():
            return f"Invalid model name passed in model={e.model}. {_SEE_MODELS}"
        case NoReplica():
            return f"No replica of model {e.model} is ready; try again shortly."
    return str(e)  # rate limited, payment required, forbidden, upstream failed: in their own words


def _reply(status: int, payload: bytes) -> str:
    """The completion's text, or `Error: ...` with the engine's own error (whatever its shape)."""
    try:
        answer = json.loads(payload)
        if status != 200:
            error = answer.get("error") if isinstance(answer, dict) else None
            return f"Error: {error.get('message') if isinstance(error, dict) else error or status}"
        return str(answer["choices"][0]["message"].get("content") or "")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return f"Error: HTTP {status}"


def _text(message: Mapping[str, Any]) -> str:
    """A text message's text without its mentions; "" for any other message."""
    if message.get("message_type") != "text":
        return ""
    try:
        content = json.loads(message.get("content") or "{}")
    except json.JSONDecodeError:
        return ""
    return _MENTION.sub("", str(content.get("text", ""))).strip() if isinstance(content, dict) else ""
