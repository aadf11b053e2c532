"""A deployment with an autoscaling policy, end to end on the local sandbox backend: engines (the simulator in sshd
sandboxes) that run two calls at once and queue the rest, ten openai SDK clients through the gateway (half of them
streaming), and the leader's jobs run pass by pass as the scheduler runs them (engine_load, the deployments' keeper
in the reconcile, the managed replicas' steps, the probes). The deployment grows to three replicas until the calls
waiting fall under the target, and shrinks back to one after the load ends, with no failed call."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.sandbox import SandboxBackend
from orchestrator.domain.lifecycle import REASON_SCALED_DOWN, ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.platform.settings import Settings
from orchestrator.runtime.container import Deps
from tests.support.callers import ASK, call_until
from tests.support.engines import Engine
from tests.support.gateway import issue_key, openai_client
from tests.support.managed_sandbox import managed_sandbox, sandbox_settings, sqlite_url
from tests.support.toolkit import create_model, vm_details

S = ReplicaStatus
MODEL = "sim-autoscaled"
AUTOSCALE = {
    "min_replicas": 1,
    "max_replicas": 3,
    "target_waiting": 2,
    "scale_up_delay_s": 0.5,
    "scale_down_delay_s": 1.0,
}
CLIENTS = 10
"""Three replicas run six at once and leave about four waiting (1.3 each, under the target of 2); two leave six."""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return sandbox_settings(tmp_path, database_url)


@pytest.fixture
async def sandbox(deps: Deps) -> AsyncIterator[SandboxBackend]:
    async with managed_sandbox(deps) as backend:
        yield backend


class Leader:
    """The leader's jobs, one pass each, as the scheduler runs them; each engine made a queue once it is READY."""

    def __init__(self, deps: Deps, client: httpx.AsyncClient, model_id: int) -> None:
        self.deps, self.client, self.model_id = deps, client, model_id
        self.queued: set[int] = set()

    async def step(self) -> dict[str, Any]:
        deps = self.deps
        await deps.engine_load.scrape()
        await deps.keeper.keep()
        await reconcile(deps.store, deps.managed, Drain(deps.catalog, deps.settings.drain_timeout_s))
        await deps.managed.settle()
        await deps.health.run()
        for replica in await deps.store.replicas_in([S.READY]):
            if replica.id not in self.queued:  # as `--max-num-seqs 2`, with calls of about 0.2 s
                engine = Engine(f"http://{replica.vm_address}:{replica.port}", MODEL)
                await engine.set_faults(max_num_seqs=2, tokens_per_s=50)
                self.queued.add(replica.id or 0)
        r = await self.client.get(f"/api/v1/models/{self.model_id}/deployment")
        assert r.status_code == 200, r.text
        deployment: dict[str, Any] = r.json()
        return deployment


def ready(d: dict[str, Any]) -> int:
    return sum(m["status"] == "READY" for m in d["members"])


async def test_an_autoscaled_deployment_grows_on_the_engines_queue_and_shrinks_after(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps, sandbox: SandboxBackend
) -> None:
    model_id = await create_model(client, MODEL)
    template = {"create_vm": True, "vm_creation_details": vm_details(security_rules=[])}
    r = await client.put(f"/api/v1/models/{model_id}/deployment", json={"template": template, "autoscale": AUTOSCALE})
    assert r.status_code == 200, r.text
    leader = Leader(deps, client, model_id)
    deadline = time.monotonic() + 20
    while ready(d := await leader.step()) < 1:
        assert time.monotonic() < deadline, d
        await asyncio.sleep(0.05)

    _, key = await issue_key(client)
    stop = asyncio.Event()
    load_run = asyncio.create_task(call_until(openai_client(transport, key), MODEL, stop, callers=CLIENTS))
    desired: list[int] = []
    messages: list[str] = []
    under_at_three = 0
    deadline = time.monotonic() + 90  # far past the ~10 s it takes: only a hang fails here
    try:
        while True:
            assert time.monotonic() < deadline, f"desired so far: {desired}, last: {d}"
            d = await leader.step()
            desired.append(d["desired"])
            messages.append(d["message"] or "")
            load = deps.engine_load.load_of(model_id)
            if not stop.is_set() and ready(d) == 3 and load is not None and load.ready == 3:
                under_at_three += load.waiting / load.ready < AUTOSCALE["target_waiting"]
                if under_at_three == 3:  # the waiting calls stayed under the target: the load ends
                    stop.set()
            if load_run.done() and d["desired"] == 1 and ready(d) == 1 and d["status"] == "steady":
                break
            await asyncio.sleep(0.05)  # the jobs' pace; the calls run in this loop meanwhile
    finally:  # a failed wait must not leave the callers running into the runtime's stop
        stop.set()
        await asyncio.wait({load_run}, timeout=30)

    answered, failed = load_run.result()
    assert failed == []
    assert answered > CLIENTS
    # Up to three, held there while loaded, back to one after: never down while the load ran, never up after.
    assert [b for a, b in itertools.pairwise(desired) if a != b] == [2, 3, 2, 1], desired
    assert any(m.startswith("waiting ") and "ready for" in m for m in messages), messages  # the reason of a step up
    drained = [m for m in d["members"] if m["status"] == "TERMINATED"]
    assert [m["termination_reason"] for m in drained] == [REASON_SCALED_DOWN] * 2
    metrics = (await client.get("/metrics")).text
    deployment_id = d["id"]
    for direction in ("up", "down"):
        sample = (
            f'orchestrator_autoscale_decisions_total{{deployment_id="{deployment_id}",direction="{direction}"}} 2.0'
        )
        assert sample in metrics


async def test_a_deployment_at_zero_wakes_for_a_queued_call_and_goes_back_to_zero(
    client: httpx.AsyncClient, anon_client: httpx.AsyncClient, deps: Deps, sandbox: SandboxBackend
) -> None:
    model_id = await create_model(client, MODEL)
    template = {"create_vm": True, "vm_creation_details": vm_details(security_rules=[])}
    policy = {**AUTOSCALE, "min_replicas": 0, "max_replicas": 1}
    r = await client.put(f"/api/v1/models/{model_id}/deployment", json={"template": template, "autoscale": policy})
    assert r.status_code == 200, r.text
    leader = Leader(deps, client, model_id)
    d = await leader.step()
    assert (d["desired"], d["members"]) == (0, [])  # nothing runs while nothing is asked
    await deps.catalog.reload()  # what the change feed does on a server: the model is known to be at zero
    _, key = await issue_key(client)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5}

    refused = await anon_client.post("/v1/chat/completions", json=body, headers=headers)
    assert refused.status_code == 503, refused.text  # a call that cannot wait is told to come back
    assert refused.headers["retry-after"]

    queued = asyncio.create_task(
        anon_client.post("/queue/chat/completions", json={**body, "priority": 1}, headers=headers, timeout=60)
    )
    desired: list[int] = []
    deadline = time.monotonic() + 60
    while not queued.done():  # the leader's jobs run meanwhile; the queued call waits for the replica they start
        assert time.monotonic() < deadline, f"desired so far: {desired}"
        d = await leader.step()
        desired.append(d["desired"])
        await deps.catalog.reload()
        await asyncio.sleep(0.05)
    answer = queued.result()
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert 1 in desired

    while (d := await leader.step())["desired"] != 0 or d["members"][0]["status"] != "TERMINATED":
        assert time.monotonic() < deadline, d  # after the scale-down delay with nothing asked: back to zero
        await asyncio.sleep(0.05)
    assert [m["termination_reason"] for m in d["members"]] == [REASON_SCALED_DOWN]
