"""The reconcile job and the guarded moves under it, on both databases; the scheduler that runs it."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.domain.errors import InvalidTransition
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.fleet.replicas import ReplicaSpec, VmSpec
from orchestrator.platform.settings import Settings
from orchestrator.runtime.compose import Runtime
from orchestrator.runtime.container import Deps

S = ReplicaStatus


async def _external(deps: Deps, endpoint: str = "http://127.0.0.1:99/v1") -> int:
    model = await deps.models.create(f"m-{endpoint}")
    assert model.id is not None
    return await deps.replicas.create(model.id, ReplicaSpec(endpoint=endpoint))


async def _status(deps: Deps, replica_id: int) -> str:
    replica = await deps.store.replica(replica_id)
    assert replica is not None
    return replica.status


async def test_external_replica_moves_pending_to_starting_once(deps: Deps) -> None:
    replica_id = await _external(deps)
    assert await _status(deps, replica_id) == S.PENDING
    await reconcile(deps.store)
    assert await _status(deps, replica_id) == S.STARTING
    await reconcile(deps.store)  # nothing more to do for it in this issue
    detail = await deps.replicas.detail(replica_id)
    assert [(e.from_status, e.to_status) for e in detail.events] == [(None, S.PENDING), (S.PENDING, S.STARTING)]


async def test_managed_replica_waits_in_pending_for_a_backend(deps: Deps) -> None:
    model = await deps.models.create("m")
    assert model.id is not None
    vm = VmSpec(
        name="vm",
        environment_name="e",
        image_name="i",
        flavor_name="f",
        key_name="k",
        port=8000,
        run_command="vllm serve m",
    )
    replica_id = await deps.replicas.create(model.id, ReplicaSpec(vm=vm))
    await reconcile(deps.store)
    assert await _status(deps, replica_id) == S.PENDING


async def test_guarded_move_loses_to_a_concurrent_mover(deps: Deps) -> None:
    replica_id = await _external(deps)
    results = await asyncio.gather(
        deps.store.move(replica_id, S.PENDING, S.STARTING, "a"),
        deps.store.move(replica_id, S.PENDING, S.DRAINING, "b"),
    )
    assert sorted(results) == [False, True]
    detail = await deps.replicas.detail(replica_id)
    assert len(detail.events) == 2  # the creation and the one winning move, nothing for the loser
    assert detail.replica.status == detail.events[-1].to_status


async def test_move_from_a_stale_status_changes_nothing(deps: Deps) -> None:
    replica_id = await _external(deps)
    assert not await deps.store.move(replica_id, S.STARTING, S.READY, "stale")
    assert await _status(deps, replica_id) == S.PENDING


async def test_forbidden_move_is_refused_before_any_sql(deps: Deps) -> None:
    replica_id = await _external(deps)
    with pytest.raises(InvalidTransition):
        await deps.store.move(replica_id, S.PENDING, S.READY, "skip")
    assert await _status(deps, replica_id) == S.PENDING


async def test_one_bad_replica_does_not_stop_the_pass(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await _external(deps, "http://127.0.0.1:91/v1")
    second = await _external(deps, "http://127.0.0.1:92/v1")
    real_move = deps.store.move

    async def flaky_move(replica_id: int, *args: object, **kwargs: object) -> bool:
        if replica_id == first:
            raise RuntimeError("database hiccup")
        return await real_move(replica_id, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deps.store, "move", flaky_move)
    await reconcile(deps.store)
    assert await _status(deps, first) == S.PENDING
    assert await _status(deps, second) == S.STARTING


async def _wait_for(deps: Deps, replica_id: int, status: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while await _status(deps, replica_id) != status:
        assert time.monotonic() < deadline, f"replica {replica_id} never reached {status}"
        await asyncio.sleep(0.02)


async def test_scheduler_runs_reconcile_and_a_nudge_runs_it_at_once(settings: Settings) -> None:
    from orchestrator.runtime.compose import build_deps

    # A tick far in the future: only the start-up run and the nudge can move the replica.
    deps = build_deps(settings.model_copy(update={"scheduler": True, "reconcile_interval_s": 3600}))
    runtime = Runtime(deps)
    await runtime.start()
    try:
        replica_id = await _external(deps)
        await _wait_for(deps, replica_id, S.STARTING)
    finally:
        await runtime.stop()


async def test_one_call_walks_every_cheap_step(deps: Deps) -> None:
    replica_id = await _external(deps)
    await reconcile(deps.store)
    await deps.replicas.delete(replica_id)
    await reconcile(deps.store)  # DRAINING -> TERMINATING -> TERMINATED in one call
    assert await _status(deps, replica_id) == S.TERMINATED


async def test_deleting_a_failed_replica_keeps_why_it_failed(deps: Deps) -> None:
    replica_id = await _external(deps)
    await deps.store.move(replica_id, S.PENDING, S.TERMINATING, "never_ready")
    await reconcile(deps.store)
    await deps.replicas.delete(replica_id)
    detail = await deps.replicas.detail(replica_id)
    assert (detail.replica.status, detail.replica.termination_reason) == (S.TERMINATED, "never_ready")
    assert detail.replica.delete_requested_at is not None


async def test_a_nudge_during_a_run_is_not_lost(deps: Deps) -> None:
    from orchestrator.runtime.jobs import reconcile_job

    replica_id = await _external(deps)
    deps.nudge()  # as if an admin acted while the job ran
    assert deps.nudge.take()
    deps.nudge()
    await reconcile_job(deps)
    assert not deps.nudge.take()
    assert await _status(deps, replica_id) == S.STARTING
