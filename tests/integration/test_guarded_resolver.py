"""Names are judged again at every connect: a name whose DNS answer turned into a metadata address after its URL
was saved (DNS rebinding) is refused by the upstream session, while names of engines still connect. The DNS answers
come from a stand-in resolver (there is no DNS server here); the connections are real."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from ipaddress import ip_network

import pytest
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult

from orchestrator.gateway.upstream import ConnectFailed, Upstream
from orchestrator.platform.guarded_resolver import GuardedResolver
from tests.support.engines import Engine, engine_in_process


class Answers(AbstractResolver):
    """A DNS that answers each name with the given addresses."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.names[host]
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    async with engine_in_process("m") as e:
        yield e


async def test_a_name_that_turned_into_a_metadata_address_is_refused_at_connect(engine: Engine) -> None:
    port = int(engine.url.rsplit(":", 1)[1])
    dns = Answers(
        {
            "engine.test": ["127.0.0.1"],
            "rebound.test": ["169.254.169.254"],
            "both.test": ["169.254.169.254", "127.0.0.1"],
            "meta.test": ["169.254.169.254"],
        }
    )
    upstream = Upstream(resolver=GuardedResolver(inner=dns))
    try:
        ok = await upstream.post(f"http://engine.test:{port}/v1/models", b"", {})
        assert ok.status in (200, 405)
        ok.release()
        with structlog.testing.capture_logs() as logs, pytest.raises(ConnectFailed):
            await upstream.post(f"http://rebound.test:{port}/v1/chat/completions", b"{}", {})
        # refused by the guard (not merely unreachable: nothing listens there either)
        assert [e["host"] for e in logs if e["event"] == "upstream.name_refused"] == ["rebound.test"]
        with pytest.raises(OSError, match="link-local"):
            await GuardedResolver(inner=dns).resolve("meta.test", port)
        mixed = await upstream.post(f"http://both.test:{port}/v1/models", b"", {})  # only the engine's address is kept
        assert mixed.status in (200, 405)
        mixed.release()
    finally:
        await upstream.close()


async def test_an_allowed_range_is_kept() -> None:
    dns = Answers({"meta.test": ["169.254.10.5", "169.254.169.254"]})
    resolver = GuardedResolver(allowed=(ip_network("169.254.10.0/24"),), inner=dns)
    assert [a["host"] for a in await resolver.resolve("meta.test", 80)] == ["169.254.10.5"]
