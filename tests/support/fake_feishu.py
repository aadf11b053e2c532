"""A fake of the Feishu open API on a real socket: tenant tokens for known apps, message replies, failure codes.

Like Feishu, it answers errors with HTTP 400 and a JSON `code`: 10014 for a wrong app secret, 99991663 for a
bearer token it did not issue (or has forgotten, see `expire_tokens`), and whatever `fail_next` queued.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


@dataclass(frozen=True)
class Reply:
    message_id: str
    text: str
    token: str
    """The bearer token the reply came with."""


@dataclass
class FakeFeishu:
    apps: dict[str, str]
    """app_id -> app_secret."""
    base_url: str = ""
    replies: list[Reply] = field(default_factory=list)
    token_requests: int = 0
    """Every call of the token endpoint, refused ones included."""
    issued: dict[str, str] = field(default_factory=dict)
    """token -> app_id of every token the fake still accepts."""
    _failures: list[int] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def fail_next(self, code: int, times: int = 1) -> None:
        """The next `times` replies with a valid token answer `code` (HTTP 400) instead of being delivered."""
        self._failures.extend([code] * times)

    def expire_tokens(self) -> None:
        """Forget every issued token, as Feishu does when it revokes them early."""
        self.issued.clear()

    async def wait_for_replies(self, n: int, timeout_s: float = 10.0) -> list[Reply]:
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: len(self.replies) >= n)
        except TimeoutError:
            raise AssertionError(f"{len(self.replies)} of {n} replies arrived within {timeout_s}s") from None
        return list(self.replies)

    async def _tenant_token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        body = await _json_object(request)
        app_id = body.get("app_id")
        if not isinstance(app_id, str) or self.apps.get(app_id) != body.get("app_secret"):
            return _error(10014, "app secret invalid")
        token = f"t-{secrets.token_hex(16)}"
        self.issued[token] = app_id
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200})

    async def _reply(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.issued:
            return _error(
                99991663, "Invalid access token for authorization. Please make a request with token attached."
            )
        if self._failures:
            return _error(self._failures.pop(0), "failure asked for by the test")
        body = await _json_object(request)
        try:
            text = json.loads(body["content"])["text"]
        except (KeyError, TypeError, ValueError):
            return _error(230001, "invalid message content")
        if body.get("msg_type") != "text" or not isinstance(text, str):
            return _error(230001, "invalid message content")
        async with self._changed:
            self.replies.append(Reply(request.match_info["message_id"], text, token))
            self._changed.notify_all()
        return web.json_response({"code": 0, "msg": "success", "data": {"message_id": f"om_{secrets.token_hex(8)}"}})


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error(code: int, msg: str) -> web.Response:
    return web.json_response({"code": code, "msg": msg}, status=400)


@asynccontextmanager
async def fake_feishu(apps: dict[str, str]) -> AsyncIterator[FakeFeishu]:
    """Serve a fake for `apps` on 127.0.0.1 (a free port); `base_url` is where it answers."""
    fake = FakeFeishu(dict(apps))
    app = web.Application()
    app.router.add_post("/open-apis/auth/v3/tenant_access_token/internal", fake._tenant_token)
    app.router.add_post("/open-apis/im/v1/messages/{message_id}/reply", fake._reply)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        fake.base_url = f"http://127.0.0.1:{port}"
        yield fake
    finally:
        await runner.cleanup()


def encrypt_event(encrypt_key: str, event: dict[str, Any], *, iv: bytes | None = None) -> str:
    """The `encrypt` field Feishu would send for `event` (the inverse of `decrypt_event`); a random IV by default."""
    iv = os.urandom(16) if iv is None else iv
    key = hashlib.sha256(encrypt_key.encode()).digest()
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(json.dumps(event).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(padded) + encryptor.finalize()).decode()
