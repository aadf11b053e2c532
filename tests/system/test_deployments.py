"""Deployments end to end on the local sandbox backend: the keeper and the reconcile, probe and drain steps run as
the reconcile and probe jobs run them, real sshd sandboxes with the engine simulator, and the gateway in front
(the official `openai` client, whole answers and streams)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from infra.sandbox import SandboxBackend
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.engines import Engine
from tests.support.gateway import issue_key, openai_client
from tests.support.managed_sandbox import managed_sandbox, sandbox_settings, sqlite_url
from tests.support.toolkit import create_model, vm_details

S = ReplicaStatus
MODEL = "sim-llama"
PAUSE_S = 0.02
"""Between one call of a load worker and its next."""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return sandbox_settings(tmp_path, database_url).model_copy(
        update={
            "startup_grace_s": 4.0,  # an engine that never answers is given up after 4 s
            "unhealthy_after": 1,
            "max_recoveries": 0,  # a replica whose engine is killed is not restarted: it ends, to be replaced
            "deployment_max_failed_starts": 2,
            "drain_timeout_s": 30.0,
        }
    )


@pytest.fixture
async def sandbox(deps: Deps) -> AsyncIterator[SandboxBackend]:
    async with managed_sandbox(deps) as backend:
        yield backend


@dataclass
class Fleet:
    """Runs the leader's jobs as the scheduler would, and plays a broken engine for the replicas it is told to."""

    deps: Deps
    sandbox: SandboxBackend
    model_id: int
    broken: Callable[[int], bool] = lambda replica_id: False
    """Replicas whose engine dies as it starts (killed while STARTING): they never become READY."""
    killed: set[int] = field(default_factory=set)
    after_step: Callable[[], Awaitable[None]] | None = None

    async def step(self) -> None:
        drain = Drain(self.deps.catalog, self.deps.settings.drain_timeout_s)
        await self.deps.keeper.keep()
        await reconcile(self.deps.store, self.deps.managed, drain)
        await self.deps.managed.settle()
        for replica in await self.deps.store.replicas_in([S.STARTING]):
            if self.broken(replica.id or 0) and replica.id not in self.killed:
                self.kill_engine(replica.id or 0)
        await self.deps.health.run()
        if self.after_step is not None:
            await self.after_step()

    def kill_engine(self, replica_id: int) -> None:
        pid = int((self.sandbox.work_dir(replica_id) / "engine.pid").read_text())
        os.kill(pid, 9)
        self.killed.add(replica_id)

    async def deployment(self, client: httpx.AsyncClient) -> dict[str, Any]:
        r = await client.get(f"/api/v1/models/{self.model_id}/deployment")
        assert r.status_code == 200, r.text
        answer: dict[str, Any] = r.json()
        return answer

    async def until(
        self, client: httpx.AsyncClient, done: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Job rounds until the deployment, as the admin reads it, is `done`."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.step()
            got = await self.deployment(client)
            if done(got):
                return got
            assert time.monotonic() < deadline, f"not there after {timeout_s} s: {got}"
            await asyncio.sleep(0.02)  # the engines start in their own processes; calls under load run here


def alive(d: dict[str, Any], generation: int | None = None) -> list[dict[str, Any]]:
    return [
        m
        for m in d["members"]
        if m["status"] not in {"DRAINING", "TERMINATING", "TERMINATED"}
        and (generation is None or m["generation"] == generation)
    ]


def ready(d: dict[str, Any], generation: int | None = None) -> list[int]:
    return sorted(m["id"] for m in alive(d, generation) if m["status"] == "READY")


def steady(n: int, generation: int) -> Callable[[dict[str, Any]], bool]:
    def check(d: dict[str, Any]) -> bool:
        return d["status"] == "steady" and len(ready(d, generation)) == n and len(alive(d)) == n

    return check


def template(**overrides: Any) -> dict[str, Any]:
    return {"create_vm": True, "vm_creation_details": vm_details(security_rules=[], **overrides)}


async def put(client: httpx.AsyncClient, model_id: int, **body: Any) -> dict[str, Any]:
    r = await client.put(f"/api/v1/models/{model_id}/deployment", json=body)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def made(deps: Deps, model_id: int) -> list[int]:
    """Every replica the model's deployment ever made."""
    return [r.id or 0 for r, _ in await deps.store.replicas_with_model(list(S)) if r.deployment_id is not None]


async def test_a_deployment_is_kept_at_three_through_a_killed_replica_and_an_engine_that_never_gets_ready(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    model_id = await create_model(client, MODEL)
    fleet = Fleet(deps, sandbox, model_id)
    await put(client, model_id, template=template(), replicas=3)
    first = await fleet.until(client, steady(3, generation=1))
    assert first["message"] == "3 of 3 replicas READY"

    # Killed outright: its engine is gone (no restart here), it ends and another takes its place.
    victim = ready(first)[0]
    fleet.kill_engine(victim)
    again = await fleet.until(client, lambda d: steady(3, 1)(d) and victim not in ready(d))
    [ended] = [m for m in again["members"] if m["id"] == victim]
    assert (ended["status"], ended["termination_reason"]) == ("TERMINATED", "unrecoverable")
    assert len(await made(deps, model_id)) == 4

    # From now on every new engine dies as it starts: replaced once, then the deployment stops making them.
    before = set(await made(deps, model_id))
    fleet.broken = lambda replica_id: replica_id not in before
    fleet.kill_engine(ready(again)[0])
    failing = await fleet.until(client, lambda d: d["status"] == "failing")
    new = sorted(set(await made(deps, model_id)) - before)
    assert len(new) == 2  # deployment_max_failed_starts: the killed one's replacement, and its own
    assert failing["message"] == (
        f"2 replicas in a row ended without ever being READY (the last, replica {new[-1]}: never_ready); "
        "no more are made until the template changes or an admin retries"
    )
    assert len(ready(failing)) == 2  # the two that were fine keep serving
    for _ in range(5):  # no create loop: more job rounds make nothing
        await fleet.step()
    assert len(await made(deps, model_id)) == 6
    detail = (await client.get(f"/api/v1/replicas/{new[0]}")).json()
    assert [e["reason"] for e in detail["events"] if e["from_status"] != e["to_status"]][-2:] == [
        "never_ready",
        "destroyed",
    ]

    # An admin's retry (the same body again) lets it try once more.
    fleet.broken = lambda replica_id: False
    await put(client, model_id, template=template(), replicas=3)
    await fleet.until(client, steady(3, generation=1))
    assert len(await made(deps, model_id)) == 7


@dataclass
class Load:
    """Calls through the gateway, whole and streamed, one after another on each of a few workers, until stopped."""

    client: openai.AsyncOpenAI
    calls: int = 0
    streams: int = 0
    failures: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, stream: bool) -> None:
        messages: Any = [{"role": "user", "content": "hello"}]
        while not self.stopping.is_set():
            try:
                if stream:
                    chunks = await self.client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=8, stream=True
                    )
                    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
                    self.streams += 1
                else:
                    answer = await self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
                    text = answer.choices[0].message.content or ""
                    self.calls += 1
                if not text:
                    self.failures.append(f"an empty answer (stream={stream})")
            except openai.APIError as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            # A steady rate rather than calls back to back: on a small machine an unpaced loop in this process
            # would starve the engines' processes and the probes of CPU, which is not what is under test.
            await asyncio.sleep(PAUSE_S)

    @contextlib.asynccontextmanager
    async def running(self, workers: int = 2) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self.worker(stream=i % 2 == 1)) for i in range(workers * 2)]
        try:
            yield self
        finally:
            self.stopping.set()
            await asyncio.gather(*tasks)


async def pace_engines(deps: Deps, d: dict[str, Any], paced: set[int]) -> None:
    """READY engines answer at 100 tokens a second, so that calls are in flight when their replica drains."""
    for replica_id in ready(d):
        if replica_id not in paced:
            replica = await deps.store.replica(replica_id)
            assert replica is not None
            await Engine(f"http://{replica.vm_address}:{replica.port}", MODEL).set_faults(tokens_per_s=100)
            paced.add(replica_id)


async def test_a_rolling_replacement_under_load_fails_no_call_and_a_bad_template_leaves_the_old_ones_serving(
    deps: Deps, client: httpx.AsyncClient, transport: httpx.ASGITransport, sandbox: SandboxBackend
) -> None:
    model_id = await create_model(client, MODEL)
    fleet = Fleet(deps, sandbox, model_id)
    await put(client, model_id, template=template(), replicas=3)
    old = ready(await fleet.until(client, steady(3, generation=1)))
    _, key = await issue_key(client, rpm=1_000_000)  # the load is not to be limited here
    paced: set[int] = set()

    async with Load(openai_client(transport, key)).running() as load:
        await pace_engines(deps, await fleet.deployment(client), paced)
        rolling = await put(client, model_id, template=template(flavor_name="n3-H100x1"), replicas=3, max_surge=1)
        assert rolling["generation"] == 2
        seen: list[tuple[int, int]] = []

        def rolled(d: dict[str, Any]) -> bool:
            if d["roll"]:
                seen.append((d["roll"]["new"], d["roll"]["old"]))
            return steady(3, generation=2)(d)

        async def pace() -> None:
            await pace_engines(deps, await fleet.deployment(client), paced)

        fleet.after_step = pace
        done = await fleet.until(client, lambda d: rolled(d) and load.calls > 0 and load.streams > 0, 60)
    assert load.failures == []
    assert load.calls > 0
    assert load.streams > 0
    assert all(new + old_alive <= 3 + 1 for new, old_alive in seen)  # never more than the surge above the count
    for member in done["members"]:
        if member["id"] in old:
            assert (member["status"], member["termination_reason"]) in {
                ("TERMINATED", "rolled"),
                ("TERMINATING", "rolled"),
                ("DRAINING", "rolled"),  # the last one drained may still finish its calls as the new ones serve
            }
    new = ready(done, generation=2)

    # A template whose engines never get ready: the roll stops and the replicas of generation 2 keep serving.
    before = set(await made(deps, model_id))
    fleet.broken = lambda replica_id: replica_id not in before
    bad = await put(client, model_id, template=template(flavor_name="n3-B200x1"), replicas=3, max_surge=2)
    assert bad["generation"] == 3
    stopped = await fleet.until(client, lambda d: d["status"] == "rollout_failed" and not alive(d, 3))
    assert ready(stopped, generation=2) == new
    assert "the roll stopped, 3 replicas of the previous template keep serving" in stopped["message"]
    tried = set(await made(deps, model_id)) - before
    assert len(tried) == 2  # the surge, and no more
    for _ in range(5):
        await fleet.step()
    assert set(await made(deps, model_id)) - before == tried
    answer = await openai_client(transport, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "still there?"}], max_tokens=4
    )
    assert answer.choices[0].message.content
