"""Autoscaling on what real engines report: simulator processes that run two calls at once (the rest wait, as
vLLM's --max-num-seqs), ten clients through the gateway with the openai SDK; the leader's engine_load scrape and the
autoscaler's decision, applied as a deployment's keeper would (replicas added from idle engines, removed by a drain),
grow the model to three replicas until the calls waiting fall under the target, and back to one once the load ends,
with no failed call.

The deployments' reconcile is not what applies the decisions here: the test does, one decision per pass, so that
what is under test is the scrape, the load and the decision over real engines and the real gateway."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from orchestrator.domain.autoscale import AutoscalePolicy, Load
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.runtime.container import Deps
from tests.support.callers import call_until
from tests.support.engines import Engine, engine_process
from tests.support.gateway import issue_key, make_ready, openai_client

MODEL = "autoscaled"
POLICY = AutoscalePolicy(
    min_replicas=1, max_replicas=3, target_waiting=2.0, scale_up_delay_s=0.5, scale_down_delay_s=1.0
)
CLIENTS = 10
"""Three replicas run six at once and leave about four waiting (1.3 each, under the target of 2); two leave six (3
each), one eight."""
PASS_S = 0.1
"""The pace of the keeper's passes (the scrape job's and the reconcile's interval, shortened)."""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}"  # the engines' load is the subject, not the store


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Three engine simulator processes, each running at most two calls at once, 10 tokens in about 0.2 s."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(engine_process(MODEL, "--max-num-seqs", "2", "--tokens-per-s", "50"))[0]
            for _ in range(3)
        ]


class Keeper:
    """What a deployment's keeper does with the autoscaler's count: READY replicas made on idle engines, the
    newest drained first."""

    def __init__(self, client: httpx.AsyncClient, deps: Deps, model_id: int, first: int, engines: list[Engine]) -> None:
        self.client, self.deps, self.model_id = client, deps, model_id
        self.serving: list[tuple[int, Engine]] = [(first, engines[0])]
        self.idle = engines[1:]
        self.removed: list[int] = []
        self.drain = Drain(deps.catalog, deps.settings.drain_timeout_s)

    async def apply(self, desired: int) -> None:
        while len(self.serving) < desired:
            engine = self.idle.pop(0)
            r = await self.client.post(f"/api/v1/models/{self.model_id}/replicas", json={"endpoint": engine.chat_url})
            assert r.status_code == 201, r.text
            rid = r.json()["replica_id"]
            await reconcile(self.deps.store)
            await until(lambda rid=rid: self.ready(rid), f"replica {rid} never READY")
            self.serving.append((rid, engine))
        while len(self.serving) > desired:
            rid, engine = self.serving.pop()
            assert (await self.client.delete(f"/api/v1/replicas/{rid}")).status_code == 204
            await until(lambda rid=rid: self.drained(rid), f"replica {rid} never drained")
            self.idle.append(engine)
            self.removed.append(rid)

    async def ready(self, rid: int) -> bool:
        await self.deps.health.run()
        replica = await self.deps.store.replica(rid)
        return replica is not None and replica.status == ReplicaStatus.READY

    async def drained(self, rid: int) -> bool:
        await reconcile(self.deps.store, None, self.drain)
        replica = await self.deps.store.replica(rid)
        return replica is not None and replica.status == ReplicaStatus.TERMINATED


async def until(check: Callable[[], Awaitable[bool]], what: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_replicas_follow_the_engines_queue_up_and_back_down(
    client: httpx.AsyncClient, transport: httpx.ASGITransport, deps: Deps, engines: list[Engine]
) -> None:
    [first] = await make_ready(client, deps, MODEL, engines[0].chat_url)
    model_id = (await client.get(f"/api/v1/models/{MODEL}")).json()["id"]
    keeper = Keeper(client, deps, model_id, first, engines)
    _, key = await issue_key(client)
    stop = asyncio.Event()
    load_run = asyncio.create_task(call_until(openai_client(transport, key), MODEL, stop, callers=CLIENTS))

    counts: list[int] = []
    under_at_three: list[Load] = []
    deadline = time.monotonic() + 90  # far past the ~10 s it takes: only a hang fails here
    try:
        while True:
            assert time.monotonic() < deadline, f"counts so far: {counts}"
            await deps.engine_load.scrape()  # the leader's engine_load job
            load = deps.engine_load.load_of(model_id)
            current = len(keeper.serving)
            decision = deps.autoscaler.decide(model_id, POLICY, current, load, time.monotonic())
            await keeper.apply(decision.desired)
            counts.append(len(keeper.serving))
            if not stop.is_set() and current == 3 and load is not None and load.ready == 3:
                if load.waiting / load.ready < POLICY.target_waiting:
                    under_at_three.append(load)
                if len(under_at_three) == 3:  # the waiting calls stayed under the target: the load ends
                    stop.set()
            if stop.is_set() and load_run.done() and counts[-1] == POLICY.min_replicas:
                break
            await asyncio.sleep(PASS_S)
    finally:  # a failed wait must not leave the callers running into the runtime's stop
        stop.set()
        await asyncio.wait({load_run}, timeout=30)

    answered, failed = load_run.result()
    assert failed == []
    assert answered > CLIENTS
    # Up to three, held there while loaded, back to one after: never down while the load ran, never up after.
    moves = [b for a, b in itertools.pairwise(counts) if a != b]
    assert moves == [2, 3, 2, 1], counts
    assert all(load.waiting / load.ready < POLICY.target_waiting for load in under_at_three)
    assert len(keeper.removed) == 2
    metrics = (await client.get("/metrics")).text
    assert f'orchestrator_autoscale_decisions_total{{deployment_id="{model_id}",direction="up"}} 2.0' in metrics
    assert f'orchestrator_autoscale_decisions_total{{deployment_id="{model_id}",direction="down"}} 2.0' in metrics
