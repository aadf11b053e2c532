"""Feishu (Lark) open API: decrypting and signing event callbacks, and replying to a message as an app.

Every failure is a `FeishuError` whose message names the step and Feishu's code, never a secret or a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import structlog
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = structlog.get_logger(__name__)
REFRESH_EARLY_S = 300.0
"""A cached tenant token is replaced this long before Feishu says it expires."""
TOKEN_INVALID_CODES = frozenset({99991663, 99991668})
"""Feishu's codes for an invalid or expired access token: worth one retry with a fresh token."""
EVENT_WINDOW_S = 300.0
"""How far a signed event's timestamp may be from this server's clock, either way (Feishu's own clock may differ
by a little; an event older than this is a replay)."""


class FeishuError(Exception):
    """A Feishu call, or an event from Feishu, failed."""


def decrypt_event(encrypt_key: str, encrypted: str) -> dict[str, Any]:
    """The event inside `{"encrypt": ...}`: AES-256-CBC under sha256(encrypt_key), IV first, PKCS7, JSON."""
    try:
        data = base64.b64decode(encrypted, validate=True)
        key = hashlib.sha256(encrypt_key.encode()).digest()
        decryptor = Cipher(algorithms.AES(key), modes.CBC(data[:16])).decryptor()
        unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
        padded = decryptor.update(data[16:]) + decryptor.finalize()
        event = json.loads(unpadder.update(padded) + unpadder.finalize())
    except ValueError as e:  # bad base64, IV or block length, padding, UTF-8 and JSON all raise ValueError
        raise FeishuError("cannot decrypt the event") from e
    if not isinstance(event, dict):
        raise FeishuError("cannot decrypt the event")
    return event


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """The `X-Lark-Signature` Feishu sends with an event: sha256 hex of timestamp, nonce, key and the raw body."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode() + body).hexdigest()


@dataclass(frozen=True)
class Signed:
    """An event's `X-Lark-Request-Timestamp`, `X-Lark-Request-Nonce` and `X-Lark-Signature` headers."""

    timestamp: str
    nonce: str
    signature: str


def check_signed(encrypt_key: str, body: bytes, signed: Signed, *, now: float) -> None:
    """The signature is this very body's under the key, and was made within EVENT_WINDOW_S of `now` (Unix
    seconds): a signed event captured once cannot be sent again later."""
    expected = signature(signed.timestamp, signed.nonce, encrypt_key, body)
    if not hmac.compare_digest(signed.signature.encode(), expected.encode()):
        raise FeishuError("the event's signature does not match")
    try:
        sent_at = int(signed.timestamp)
    except ValueError:
        raise FeishuError("the event's timestamp is not a number of seconds") from None
    if abs(now - sent_at) > EVENT_WINDOW_S:
        raise FeishuError(f"the event's timestamp is more than {EVENT_WINDOW_S:.0f} s from now")


def open_unsigned(encrypt_key: str, encrypted: str) -> dict[str, Any]:
    """An event that came without a signature to an app with an encrypt key. Feishu signs every event of such an
    app but one: the URL verification it sends when the request URL is set (its own SDK answers that challenge
    before looking for a signature). So only that is taken, and every other outcome, a body that does not even
    decrypt included, gets the same refusal: nothing tells a forger how far a made-up body got."""
    try:
        event = decrypt_event(encrypt_key, encrypted)
    except FeishuError:
        event = {}
    if event.get("type") != "url_verification":
        raise FeishuError("the event is not signed (X-Lark-Signature)")
    return event


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float
    """`time.monotonic()` after which the token is fetched again."""


class FeishuClient:
    """Calls the open API as any number of apps; tenant tokens are cached per app id."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        self._base = base_url.rstrip("/")
        self._http = httpx.AsyncClient(timeout=timeout_s)
        self._tokens: dict[str, _Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def reply_text(self, app_id: str, app_secret: str, message_id: str, text: str) -> None:
        try:
            await self._reply(app_id, app_secret, message_id, text)
        except FeishuError as e:
            log.warning("feishu.reply_failed", app_id=app_id, message_id=message_id, error=str(e))
            raise

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _reply(self, app_id: str, app_secret: str, message_id: str, text: str) -> None:
        url = f"{self._base}/open-apis/im/v1/messages/{quote(message_id, safe='')}/reply"
        body = {"msg_type": "text", "content": json.dumps({"text": text})}
        what = f"reply to message {message_id}"
        for attempt in (1, 2):
            token = await self._token(app_id, app_secret)
            status, answer = await self._post(what, url, body, {"Authorization": f"Bearer {token}"})
            if status == 200 and answer.get("code") == 0:
                return
            if answer.get("code") in TOKEN_INVALID_CODES and attempt == 1:
                # A token can stop working before its stated expiry (secret reset, clock skew): fetch one, once.
                cached = self._tokens.get(app_id)
                if cached is not None and cached.value == token:  # not one a concurrent call fetched since
                    del self._tokens[app_id]
                continue
            raise FeishuError(_failure(what, status, answer))

    async def _token(self, app_id: str, app_secret: str) -> str:
        # One fetch at a time per app: concurrent replies wait for it and share the token.
        async with self._locks.setdefault(app_id, asyncio.Lock()):
            cached = self._tokens.get(app_id)
            if cached is not None and time.monotonic() < cached.refresh_at:
                return cached.value
            url = f"{self._base}/open-apis/auth/v3/tenant_access_token/internal"
            what = f"tenant access token for app {app_id}"
            status, answer = await self._post(what, url, {"app_id": app_id, "app_secret": app_secret}, {})
            token, expire = answer.get("tenant_access_token"), answer.get("expire")
            if status != 200 or answer.get("code") != 0 or not isinstance(token, str) or not isinstance(expire, int):
                raise FeishuError(_failure(what, status, answer))
            early = min(REFRESH_EARLY_S, expire / 2)  # a short-lived token is still used for half its life
            self._tokens[app_id] = _Token(token, time.monotonic() + expire - early)
            log.info("feishu.token_fetched", app_id=app_id, expires_in=expire)
            return token

    async def _post(
        self, what: str, url: str, body: dict[str, str], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON object of the answer; Feishu answers errors with 4xx and a JSON code too."""
        try:
            response = await self._http.post(url, json=body, headers=headers)
        except httpx.HTTPError as e:
            raise FeishuError(f"{what} failed: {type(e).__name__} {e}".rstrip()) from e
        try:
            answer = response.json()
        except ValueError as e:
            raise FeishuError(f"{what} failed: HTTP {response.status_code}, the answer is not JSON") from e
        if not isinstance(answer, dict):
            raise FeishuError(f"{what} failed: HTTP {response.status_code}, the answer is not a JSON object")
        return response.status_code, answer


def _failure(what: str, status: int, answer: dict[str, Any]) -> str:
    msg = str(answer.get("msg", ""))[:200]
    return f"{what} failed: HTTP {status}, code {answer.get('code')}: {msg}"
