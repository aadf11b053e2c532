"""Feishu event crypto and the open-API client, the client against the fake Feishu on a real socket."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
import structlog

from orchestrator.surfaces.feishu.client import (
    EVENT_WINDOW_S,
    FeishuClient,
    FeishuError,
    Signed,
    check_signed,
    decrypt_event,
    open_unsigned,
    signature,
)
from tests.support.fake_feishu import FakeFeishu, encrypt_event, fake_feishu

APP_ID, APP_SECRET = "cli_test_app", "app-secret-0123456789"
EVENT = {"challenge": "ajls384kdjx98XX", "token": "xxxxxx", "type": "url_verification"}
# Both vectors were made and checked with `openssl enc -aes-256-cbc`, key sha256("test key"), IV the first 16
# bytes; the same recipe decrypts Feishu's documented example "P37w+VZ..." to "hello world".
GOLDEN = (
    "AAECAwQFBgcICQoLDA0OD2u9INIjQbkB77gO4nxBV4AlSbi3uU5Sb/wCiVtSTjlKSqBEOjsrK0J6HN2Ju+iRNGWbstNvEwJEN6Z2d0JcPkgL"
    "+nIfUrOXkxDYAd1Zp2A7"
)
JSON_LIST = "Dw4NDAsKCQgHBgUEAwIBABnHznkb5XwCnnW1abfmk3Y="  # "[1, 2]": valid JSON, not an object
FEISHU_DOCS_EXAMPLE = "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk="  # "hello world": not JSON


def test_decrypt_event_reads_a_known_vector() -> None:
    assert decrypt_event("test key", GOLDEN) == EVENT


def test_decrypt_event_inverts_encrypt_event() -> None:
    event = {"schema": "2.0", "event": {"message": {"message_id": "om_1", "content": '{"text":"你好 @bot"}'}}}
    first, second = encrypt_event("k3y", event), encrypt_event("k3y", event)
    assert first != second  # a random IV each time
    assert decrypt_event("k3y", first) == decrypt_event("k3y", second) == event


@pytest.mark.parametrize(
    ("key", "encrypted"),
    [
        ("wrong key", GOLDEN),
        ("test key", FEISHU_DOCS_EXAMPLE),
        ("test key", JSON_LIST),
        ("test key", "not base64 at all!"),
        ("test key", ""),
        ("test key", GOLDEN[:24]),  # the IV and half a block
        ("test key", GOLDEN[:-64]),  # whole blocks, the end (with the padding) cut off
    ],
    ids=["wrong-key", "not-json", "not-an-object", "bad-base64", "empty", "short", "truncated"],
)
def test_decrypt_event_refuses_what_is_not_an_event(key: str, encrypted: str) -> None:
    with pytest.raises(FeishuError, match=r"^cannot decrypt the event$"):
        decrypt_event(key, encrypted)


def test_signature_is_sha256_of_timestamp_nonce_key_and_body() -> None:
    body = '{"encrypt":"abc","text":"héllo"}'.encode()
    expected = hashlib.sha256(b"1700000000" + b"n0nce" + b"enc-key" + body).hexdigest()
    assert signature("1700000000", "n0nce", "enc-key", body) == expected
    assert signature("1700000000", "n0nce", "other-key", body) != expected


@pytest.fixture
async def feishu() -> AsyncIterator[FakeFeishu]:
    async with fake_feishu({APP_ID: APP_SECRET}) as fake:
        yield fake


@pytest.fixture
async def client(feishu: FakeFeishu) -> AsyncIterator[FeishuClient]:
    client = FeishuClient(feishu.base_url + "/", timeout_s=5.0)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_reply_arrives_with_its_text_and_message_id(feishu: FakeFeishu, client: FeishuClient) -> None:
    with structlog.testing.capture_logs() as logs:
        await client.reply_text(APP_ID, APP_SECRET, "om_a/b?c", 'ready: "llama" ✓')
    [reply] = await feishu.wait_for_replies(1)
    assert (reply.message_id, reply.text) == ("om_a/b?c", 'ready: "llama" ✓')
    assert feishu.issued[reply.token] == APP_ID
    assert [e for e in logs if e["event"] == "feishu.token_fetched"] == [
        {"event": "feishu.token_fetched", "app_id": APP_ID, "expires_in": 7200, "log_level": "info"}
    ]
    assert not any(APP_SECRET in str(e) or reply.token in str(e) for e in logs)


async def test_replies_share_one_token(feishu: FakeFeishu, client: FeishuClient) -> None:
    await client.reply_text(APP_ID, APP_SECRET, "om_1", "one")
    await client.reply_text(APP_ID, APP_SECRET, "om_2", "two")
    await asyncio.gather(*(client.reply_text(APP_ID, APP_SECRET, f"om_{i}", str(i)) for i in range(3, 9)))
    replies = await feishu.wait_for_replies(8)
    assert feishu.token_requests == 1
    assert len({r.token for r in replies}) == 1


async def test_concurrent_first_replies_fetch_one_token(feishu: FakeFeishu, client: FeishuClient) -> None:
    await asyncio.gather(*(client.reply_text(APP_ID, APP_SECRET, f"om_{i}", str(i)) for i in range(6)))
    assert sorted(r.text for r in await feishu.wait_for_replies(6)) == [str(i) for i in range(6)]
    assert feishu.token_requests == 1


async def test_a_wrong_secret_raises_without_the_secret(feishu: FakeFeishu, client: FeishuClient) -> None:
    wrong = "wrong-secret-9876543210"
    with structlog.testing.capture_logs() as logs, pytest.raises(FeishuError) as raised:
        await client.reply_text(APP_ID, wrong, "om_1", "hello")
    assert "10014" in str(raised.value)
    assert "app secret invalid" in str(raised.value)
    assert wrong not in str(raised.value)
    assert [e["event"] for e in logs] == ["feishu.reply_failed"]
    assert wrong not in str(logs)
    assert feishu.replies == []


@pytest.mark.parametrize("code", [99991663, 99991668])
async def test_an_invalid_token_is_replaced_once(feishu: FakeFeishu, client: FeishuClient, code: int) -> None:
    await client.reply_text(APP_ID, APP_SECRET, "om_1", "first")
    feishu.fail_next(code)
    await client.reply_text(APP_ID, APP_SECRET, "om_2", "second")
    first, second = await feishu.wait_for_replies(2)
    assert feishu.token_requests == 2
    assert first.token != second.token
    assert second.text == "second"


async def test_a_token_the_server_forgot_is_replaced(feishu: FakeFeishu, client: FeishuClient) -> None:
    await client.reply_text(APP_ID, APP_SECRET, "om_1", "first")
    feishu.expire_tokens()
    await client.reply_text(APP_ID, APP_SECRET, "om_2", "second")
    assert [r.text for r in await feishu.wait_for_replies(2)] == ["first", "second"]
    assert feishu.token_requests == 2


async def test_an_invalid_token_twice_raises(feishu: FakeFeishu, client: FeishuClient) -> None:
    feishu.fail_next(99991663, times=2)
    with pytest.raises(FeishuError, match="code 99991663") as raised:
        await client.reply_text(APP_ID, APP_SECRET, "om_1", "hello")
    assert feishu.token_requests == 2
    assert not any(token in str(raised.value) for token in feishu.issued)


async def test_another_code_raises_without_a_retry(feishu: FakeFeishu, client: FeishuClient) -> None:
    feishu.fail_next(230002)
    with pytest.raises(FeishuError, match=r"om_1 failed: HTTP 400, code 230002: failure asked for by the test"):
        await client.reply_text(APP_ID, APP_SECRET, "om_1", "hello")
    await client.reply_text(APP_ID, APP_SECRET, "om_2", "again")
    assert [r.message_id for r in await feishu.wait_for_replies(1)] == ["om_2"]
    assert feishu.token_requests == 1


async def test_an_answer_that_is_not_json_raises(feishu: FakeFeishu) -> None:
    client = FeishuClient(feishu.base_url + "/elsewhere")  # aiohttp answers an unknown path with a text 404
    try:
        with pytest.raises(FeishuError, match="HTTP 404, the answer is not JSON"):
            await client.reply_text(APP_ID, APP_SECRET, "om_1", "hello")
    finally:
        await client.aclose()


async def test_an_unreachable_server_raises() -> None:
    async with fake_feishu({APP_ID: APP_SECRET}) as gone:
        pass  # the port is closed again once the fake has stopped
    client = FeishuClient(gone.base_url, timeout_s=2.0)
    try:
        with pytest.raises(FeishuError, match=f"tenant access token for app {APP_ID} failed: ConnectError"):
            await client.reply_text(APP_ID, APP_SECRET, "om_1", "hello")
    finally:
        await client.aclose()


def _signed(body: bytes, at: float, key: str = "enc-key") -> Signed:
    timestamp = str(int(at))
    return Signed(timestamp, "n0nce", signature(timestamp, "n0nce", key, body))


@pytest.mark.parametrize("offset_s", [0, -EVENT_WINDOW_S, EVENT_WINDOW_S, -12.5])
def test_a_signed_event_within_the_window_passes(offset_s: float) -> None:
    now = 1_800_000_000.0
    check_signed("enc-key", b"{}", _signed(b"{}", now + offset_s), now=now)


@pytest.mark.parametrize(
    ("signed", "message"),
    [
        (_signed(b"{}", 1_800_000_000 - EVENT_WINDOW_S - 1), "the event's timestamp is more than 300 s from now"),
        (_signed(b"{}", 1_800_000_000 + EVENT_WINDOW_S + 1), "the event's timestamp is more than 300 s from now"),
        (_signed(b"{}", 1_800_000_000, key="other-key"), "the event's signature does not match"),
        (_signed(b"{ }", 1_800_000_000), "the event's signature does not match"),
        (Signed("1800000000", "n0nce", ""), "the event's signature does not match"),
        (Signed("1e9", "n0nce", signature("1e9", "n0nce", "enc-key", b"{}")), "not a number of seconds"),
    ],
    ids=["old", "future", "other-key", "other-body", "empty", "not-a-number"],
)
def test_a_bad_or_stale_signature_is_refused(signed: Signed, message: str) -> None:
    with pytest.raises(FeishuError, match=message):
        check_signed("enc-key", b"{}", signed, now=1_800_000_000)


def test_unsigned_only_the_url_verification_is_opened() -> None:
    assert open_unsigned("k3y", encrypt_event("k3y", EVENT)) == EVENT
    message = {"schema": "2.0", "header": {"event_type": "im.message.receive_v1"}}
    for encrypted in (encrypt_event("k3y", message), encrypt_event("other", EVENT), "not base64!", ""):
        with pytest.raises(FeishuError, match=r"^the event is not signed \(X-Lark-Signature\)$"):
            open_unsigned("k3y", encrypted)
