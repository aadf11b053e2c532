"""Engine simulators for tests: in-process on a real socket, or as a real process that can be killed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from orchestrator.enginesim.server import SimConfig, build_app


@dataclass
class Engine:
    url: str  # http://127.0.0.1:PORT
    model: str

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    async def set_faults(self, **faults: object) -> None:
        async with httpx.AsyncClient() as c:
            (await c.post(f"{self.url}/sim/faults", json=faults)).raise_for_status()

    async def log(self) -> dict[str, Any]:
        """The simulator's request log: `{"requests": [{received, finished, path, body}], "peak_running"}`."""
        async with httpx.AsyncClient() as c:
            log: dict[str, Any] = (await c.get(f"{self.url}/sim/requests")).json()
        return log

    async def chats(self) -> list[dict[str, Any]]:
        """The chat requests the engine received, oldest first (the health probe's are completions)."""
        return [r for r in (await self.log())["requests"] if r["path"] == "/v1/chat/completions"]

    async def clear_log(self) -> None:
        async with httpx.AsyncClient() as c:
            (await c.delete(f"{self.url}/sim/requests")).raise_for_status()


@asynccontextmanager
async def app_in_process(app: web.Application) -> AsyncIterator[str]:
    """An aiohttp app served on a free local port, in the test's own loop; yields its origin."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def engine_in_process(model: str, **knobs: object) -> AsyncIterator[Engine]:
    async with app_in_process(build_app(SimConfig(model=model, port=0, **knobs))) as url:  # type: ignore[arg-type]
        yield Engine(url, model)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def engine_process(model: str, *args: str) -> Iterator[tuple[Engine, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.enginesim", "--model", model, "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    engine = Engine(f"http://127.0.0.1:{port}", model)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{engine.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "engine simulator exited at start"
            assert time.monotonic() < deadline, "engine simulator did not come up"
            time.sleep(0.02)
        yield engine, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


async def post_json(http: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    """A JSON body posted; the answer's status and JSON."""
    async with http.post(url, json=body) as r:
        return r.status, await r.json()
