"""The rule for admin-supplied URLs: every spelling of a refused address, our own listeners, the operator's ranges."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address, ip_network
from pathlib import Path

import pytest

from orchestrator.platform.outbound import OutboundPolicy, UnsafeUrl, allowed_ranges, kind_refused, literal_address
from orchestrator.platform.settings import Settings

METADATA = IPv4Address("169.254.169.254")


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "0xa9fea9fe",  # one hexadecimal number
        "0XA9FEA9FE",
        "2852039166",  # one decimal number
        "0251.0376.0251.0376",  # octal parts
        "0xa9.0xfe.0xa9.0xfe",
        "169.254.43518",  # a short form: the last part fills the rest
        "[::ffff:169.254.169.254]",  # IPv4-mapped, as yarl gives it and as written
        "::ffff:a9fe:a9fe",
    ],
)
def test_every_spelling_of_the_metadata_address_is_read_as_it(host: str) -> None:
    address = literal_address(host)
    assert address is not None
    assert kind_refused(address) is not None
    assert "link-local" in (kind_refused(address) or "")


@pytest.mark.parametrize("host", ["localhost", "engine.internal", "1.2.3.4x", "0x", "a9fea9fe"])
def test_a_name_is_no_literal(host: str) -> None:
    assert literal_address(host) is None


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("febf:ffff::1", "link-local"),  # the far end of fe80::/10
        ("::ffff:169.254.1.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("::a9fe:a9fe", "reserved"),  # IPv4-compatible (deprecated)
    ],
)
def test_refused_kinds(address: str, kind: str) -> None:
    assert kind in (kind_refused(literal_address(address) or ip_address(address)) or "")


@pytest.mark.parametrize("address", ["127.0.0.1", "127.77.0.5", "::1", "::ffff:127.0.0.1", "10.0.0.7", "8.8.8.8"])
def test_engines_may_live_on_loopback_private_and_public_addresses(address: str) -> None:
    assert kind_refused(ip_address(address)) is None


def test_an_allowed_range_lifts_only_what_it_covers() -> None:
    allowed = allowed_ranges(" 169.254.10.0/24 , fe80::/16")
    assert kind_refused(ip_address("169.254.10.9"), allowed) is None
    assert kind_refused(ip_address("::ffff:169.254.10.9"), allowed) is None  # the mapped form is the same host
    assert kind_refused(METADATA, allowed) is not None
    assert kind_refused(ip_address("fe80::1"), allowed) is None
    assert allowed_ranges("") == ()
    assert allowed_ranges("169.254.169.254") == (ip_network("169.254.169.254/32"),)


def test_a_bad_range_stops_the_start() -> None:
    with pytest.raises(ValueError, match="ORCH_OUTBOUND_ALLOW_CIDRS"):
        allowed_ranges("169.254.0.0/16,not-a-range")


def policy(tmp_path: Path, **fields: object) -> OutboundPolicy:
    return OutboundPolicy.from_settings(Settings(state_dir=tmp_path, **fields))  # type: ignore[arg-type]


async def refusal(p: OutboundPolicy, url: str) -> str | None:
    try:
        await p.check("endpoint", url)
    except UnsafeUrl as e:
        return e.message if e.field == "endpoint" else f"the wrong field: {e.field}"
    return None


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://2852039166/",
        "http://0251.0376.0251.0376/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]:8000/v1",
        "http://[fe80::1%25eth0]:8000/v1",
        "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/",  # full-width digits
        "http://0.0.0.0:9000/v1",
        "http://[::]:9000/v1",
        "http://224.0.0.1/",
        "https://240.0.0.1/",
    ],
)
async def test_urls_of_refused_addresses(tmp_path: Path, url: str) -> None:
    message = await refusal(policy(tmp_path), url)
    assert message is not None
    assert message.startswith("endpoint must not point there: ")


async def test_a_name_is_refused_for_what_it_resolves_to(tmp_path: Path) -> None:
    message = await refusal(policy(tmp_path, port=8000), "http://LOCALHOST:8000/v1")
    assert message is not None
    assert "localhost resolves to 127.0.0.1, which is this orchestrator" in message


async def test_a_name_that_does_not_resolve_is_refused(tmp_path: Path) -> None:
    message = await refusal(policy(tmp_path), "http://nowhere.invalid/v1")  # .invalid never resolves (RFC 6761)
    assert message == "endpoint must name a host that resolves: nowhere.invalid does not resolve"


async def test_this_server_on_its_address_and_port(tmp_path: Path) -> None:
    p = policy(tmp_path, host="127.0.0.1", port=8000)
    for url in (
        "http://127.0.0.1:8000/v1",
        "http://0x7f000001:8000",
        "http://[::ffff:127.0.0.1]:8000",
        "http://localhost:8000",
    ):
        assert "this orchestrator" in (await refusal(p, url) or ""), url
    for url in ("http://127.0.0.1:8001/v1", "http://127.0.0.2:8000/v1", "http://10.0.0.7:8000/v1", "http://127.0.0.1/"):
        assert await refusal(p, url) is None, url  # other ports and other addresses: engines


async def test_a_server_on_every_address_is_every_local_address_at_its_port(tmp_path: Path) -> None:
    p = policy(tmp_path, host="0.0.0.0", port=8000)
    for url in ("http://127.0.0.1:8000", "http://127.9.9.9:8000", "http://[::1]:8000"):
        assert "this orchestrator (at port 8000 on this machine)" in (await refusal(p, url) or ""), url
    assert await refusal(p, "http://127.0.0.1:8001") is None
    p = policy(tmp_path, host="::", port=8000)
    assert "this orchestrator (at port 8000 on this machine)" in (await refusal(p, "http://127.0.0.1:8000") or "")
    assert await refusal(p, "http://192.0.2.1:8000") is None  # TEST-NET-1: never an address of this machine


async def test_the_database_and_redis(tmp_path: Path) -> None:
    p = policy(
        tmp_path,
        database_url="postgresql+asyncpg://orch:pw@localhost:6543/orch",
        redis_url="redis://127.0.0.1/0",
        outbound_allow_cidrs="127.0.0.0/8",  # an operator's range never opens our own services
    )
    assert "the orchestrator's database" in (await refusal(p, "http://127.0.0.1:6543/v1") or "")
    assert "the orchestrator's database" in (await refusal(p, "http://127.0.0.2:6543/v1") or "")  # on this machine
    assert "the orchestrator's Redis" in (await refusal(p, "http://localhost:6379") or "")
    assert await refusal(p, "http://127.0.0.1:5432/v1") is None
    # A database on another machine is that address only; one behind a Unix socket (or SQLite) has none.
    p = policy(tmp_path, database_url="postgresql+asyncpg://orch@192.0.2.10/orch")
    assert "the orchestrator's database (at 192.0.2.10:5432)" in (await refusal(p, "http://192.0.2.10:5432") or "")
    assert await refusal(p, "http://127.0.0.1:5432/v1") is None
    p = policy(tmp_path, database_url="postgresql+asyncpg://orch@/orch?host=/run/postgresql")
    assert await refusal(p, "http://127.0.0.1:5432/v1") is None


async def test_an_allowed_range_in_settings(tmp_path: Path) -> None:
    p = policy(tmp_path, outbound_allow_cidrs="169.254.169.0/24")
    assert await refusal(p, "http://0xa9fea9fe/") is None
    assert await refusal(p, "http://169.254.1.1/") is not None
