"""Managed replicas end to end on the local sandbox backend: real sshd, real nftables, the engine simulator
started over SSH, the gateway in front, and the jobs called as the scheduler calls them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import httpx
import pytest

from infra import nft
from infra.sandbox import SandboxBackend
from infra.vm import BackendError, Rule, VmHandle, VmRequest
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.drain import Drain
from orchestrator.fleet.reconcile import reconcile
from orchestrator.fleet.security_rules import Phase, phase_rules, rows_of
from orchestrator.fleet.sweeps import orphan_sweep, rules_drift
from orchestrator.runtime.container import Deps
from orchestrator.store.tables import Replica
from provisioning.ssh_keys import generate_keypair
from tests.support.engines import Engine
from tests.support.gateway import issue_key, openai_client
from tests.support.managed_sandbox import managed_sandbox
from tests.support.sandbox import FOREIGN, connects, listening_on, sockets_on
from tests.support.toolkit import create_model, vm_details
from tests.support.vm import WrappedBackend, vm_request

S = ReplicaStatus
MODEL = "sim-llama"
GATEWAY, ORCHESTRATOR = "127.0.0.1", "127.0.0.2"
STRANGER = "127.0.0.3"
"""Where SECURING probes from on the sandbox (`ORCH_FOREIGN_SOURCE_ADDRESS`'s default there)."""
WALK = ["PENDING", "PROVISIONING", "BOOTSTRAPPING", "STARTING", "SECURING", "READY"]


@pytest.fixture(autouse=True)
def _root_and_nft() -> None:
    assert os.geteuid() == 0, "the sandbox system tests need root for nftables (CI runs as root)"


@pytest.fixture
async def sandbox(deps: Deps) -> AsyncIterator[SandboxBackend]:
    async with managed_sandbox(deps) as backend:
        assert backend.not_enforced_reason is None
        yield backend


async def step_jobs(deps: Deps) -> None:
    """One round of the scheduler's jobs, as they would run."""
    await reconcile(deps.store, deps.managed)
    await deps.managed.settle()
    await deps.health.run()


async def drive_to(deps: Deps, replica_id: int, status: ReplicaStatus, timeout_s: float = 30.0) -> Replica:
    deadline = time.monotonic() + timeout_s
    while True:
        await step_jobs(deps)
        replica = await deps.store.replica(replica_id)
        assert replica is not None
        if replica.status == status:
            return replica
        if replica.status == S.TERMINATED:
            detail = await deps.replicas.detail(replica_id)
            pytest.fail(f"ended {replica.termination_reason}: {[(e.to_status, e.message) for e in detail.events]}")
        assert time.monotonic() < deadline, f"still {replica.status} after {timeout_s} s"
        await asyncio.sleep(0.05)  # the engine starting in its own process


async def create_managed(client: httpx.AsyncClient, **overrides: object) -> int:
    model_id = await create_model(client, MODEL)
    details = vm_details(port=8000, **overrides)
    r = await client.post(
        f"/api/v1/models/{model_id}/replicas", json={"create_vm": True, "vm_creation_details": details}
    )
    assert r.status_code == 201, r.text
    return int(r.json()["replica_id"])


async def moves(deps: Deps, replica_id: int) -> list[str]:
    detail = await deps.replicas.detail(replica_id)
    return [e.to_status for e in detail.events if e.from_status != e.to_status]


async def test_a_managed_replica_walks_to_ready_serves_and_leaves_nothing(
    deps: Deps, client: httpx.AsyncClient, transport: httpx.ASGITransport, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.READY)
    address, port = replica.vm_address or "", replica.port or 0

    assert await moves(deps, replica_id) == WALK
    [listed] = (await client.get(f"/api/v1/models/{replica.model_id}/replicas")).json()
    assert (listed["vm_status"], listed["endpoint"]) == ("SUCCESS", f"http://{address}:{port}")
    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert {e["reason"] for e in detail["events"]} >= {"bootstrap_start", "secured"}
    [secured] = [e["message"] for e in detail["events"] if e["reason"] == "secured"]
    assert secured == (
        "engine port open to the gateway only, SSH closed; "
        f"verified from the gateway, the orchestrator and a foreign source ({STRANGER})"
    )
    assert {(r["origin"], r["port_range_min"], r["remote_ip_prefix"]) for r in detail["security_rules"]} == {
        ("user", 9400, "203.0.113.7/32"),
        ("serving", 8000, f"{GATEWAY}/32"),
    }

    _, key = await issue_key(client)
    answer = await openai_client(transport, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert answer.choices[0].message.content

    assert connects(address, port, GATEWAY)
    assert not connects(address, port, FOREIGN)
    assert not connects(address, 2222, FOREIGN)
    assert not connects(address, 2222, ORCHESTRATOR)  # closed once serving

    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204
    gone = await drive_to(deps, replica_id, S.TERMINATED)
    assert gone.termination_reason == "deleted"
    assert sockets_on(address) == []  # no listener, and no session left behind either
    assert address not in nft.sandbox_tables()
    assert not sandbox.work_dir(replica_id).parent.exists()
    assert sandbox.owned() == frozenset()


async def test_a_second_bootstrap_changes_nothing(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.READY)
    events: list[tuple[str, str]] = []
    await deps.managed.in_thread(
        sandbox.apply_rules, deps.managed.request(replica, ()), await _bootstrap_rules(deps, replica)
    )
    changed, total = await deps.managed.in_thread(
        deps.managed.access.bootstrap, replica, MODEL, 10.0, lambda reason, message: events.append((reason, message))
    )
    assert (changed, total) == (0, len(events))
    assert all(message.startswith("unchanged") for _, message in events)


async def _bootstrap_rules(deps: Deps, replica: Replica) -> list[Rule]:
    net = deps.managed.network
    return list(phase_rules(Phase.BOOTSTRAP, net, engine_port=replica.port or 0, ssh_port=replica.ssh_port or 0))


class _Failing(WrappedBackend):
    """Wraps the sandbox: `up` creates the VM, then fails, as a cloud API may after allocating."""

    def __init__(self, inner: SandboxBackend, *, host_key: tuple[str, str] | None = None) -> None:
        super().__init__(inner)
        self._host_key = host_key

    def up(self, request: VmRequest) -> VmHandle:
        if self._host_key is None:
            self.inner.up(request)
            raise BackendError("the cloud said ERROR after creating the VM")
        # A VM that answers with another host key than the one the orchestrator pinned (a man in the middle).
        private, public = self._host_key
        return self.inner.up(dataclasses.replace(request, host_private_key=private, host_public_key=public))


async def test_failed_provisioning_destroys_what_it_created(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    deps.managed.backend = _Failing(sandbox)
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.TERMINATED)
    assert (replica.termination_reason, replica.error_message) == (
        "provision_failed",
        "the cloud said ERROR after creating the VM",
    )
    [listed] = (await client.get(f"/api/v1/models/{replica.model_id}/replicas")).json()
    assert listed["vm_status"] == "FAILED"
    assert sandbox.owned() == frozenset()
    assert listening_on(sandbox.address(replica_id)) == []


async def test_a_wrong_host_key_is_refused_and_the_vm_destroyed(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    deps.managed.backend = _Failing(sandbox, host_key=generate_keypair())
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.TERMINATED)
    assert replica.termination_reason == "bootstrap_failed"
    assert (replica.error_message or "").startswith("HostKeyMismatch: ")
    assert sandbox.owned() == frozenset()


async def test_drifted_rules_are_reapplied(deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend) -> None:
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.READY)
    address = replica.vm_address or ""
    assert await rules_drift(deps.managed) == []

    nft.delete(address)  # someone flushed the firewall
    assert connects(address, 8000, FOREIGN)
    assert await rules_drift(deps.managed) == [replica_id]
    assert not connects(address, 8000, FOREIGN)
    assert connects(address, 8000, GATEWAY)
    detail = await deps.replicas.detail(replica_id)
    assert detail.events[-1].reason == "rules_drift"
    assert await rules_drift(deps.managed) == []


async def test_orphan_sweep_destroys_what_the_database_does_not_know(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    await drive_to(deps, replica_id, S.READY)
    sandbox.up(vm_request(77))
    assert sandbox.owned() == {replica_id, 77}

    assert await orphan_sweep(deps.managed) == [77]
    assert sandbox.owned() == {replica_id}
    assert listening_on(sandbox.address(77)) == []
    assert await orphan_sweep(deps.managed) == []


async def test_an_unhealthy_engine_is_restarted_then_given_up(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.READY)

    def kill_engine() -> None:
        pid = int((sandbox.work_dir(replica_id) / "engine.pid").read_text())
        os.kill(pid, 9)

    kill_engine()
    await drive_to(deps, replica_id, S.UNHEALTHY)
    recovered = await drive_to(deps, replica_id, S.READY)  # recovery 1: SSH reopened, engine restarted, secured
    assert recovered.recoveries == 1
    assert not connects(replica.vm_address or "", 2222, ORCHESTRATOR)  # SSH closed again

    for _ in range(deps.settings.max_recoveries - 1):
        kill_engine()
        await drive_to(deps, replica_id, S.UNHEALTHY)
        await drive_to(deps, replica_id, S.READY)
    kill_engine()
    ended = await drive_to(deps, replica_id, S.TERMINATED)
    assert ended.termination_reason == "unrecoverable"
    assert sandbox.owned() == frozenset()


@pytest.mark.parametrize(
    "rules",
    [
        [{"remote_ip_prefix": "0.0.0.0/0", "port_range_min": 2222, "port_range_max": 2223}],
        [
            {"remote_ip_prefix": "0.0.0.0/1", "port_range_min": 2222, "port_range_max": 2222},
            {"remote_ip_prefix": "128.0.0.0/1", "port_range_min": 1, "port_range_max": 65535},
        ],
    ],
    ids=["everyone-on-a-range", "two-halves"],
)
async def test_rules_opening_ssh_to_everyone_are_refused_and_nothing_is_made(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend, rules: list[dict[str, object]]
) -> None:
    model_id = await create_model(client, MODEL)
    body = {"create_vm": True, "vm_creation_details": vm_details(security_rules=rules)}
    r = await client.post(f"/api/v1/models/{model_id}/replicas", json=body)
    assert r.status_code == 400
    [message] = r.json()["errors"]["vm_creation_details"]["security_rules"]
    assert message.startswith("SSH (port 2222) would be open to 0.0.0.0/0 by security_rules[0]")
    assert (await client.get(f"/api/v1/models/{model_id}/replicas")).json() == []
    await step_jobs(deps)
    assert sandbox.owned() == frozenset()


async def test_the_toolkit_uis_world_open_rules_are_replaced_and_never_take_effect(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    """The toolkit UI's deploy form always sends SSH and the engine port open to 0.0.0.0/0."""
    everyone = [
        {"remote_ip_prefix": "0.0.0.0/0", "port_range_min": port, "port_range_max": port} for port in (2222, 8000)
    ]
    replica_id = await create_managed(client, security_rules=everyone)
    replica = await drive_to(deps, replica_id, S.READY)
    address = replica.vm_address or ""

    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert [e["reason"] for e in detail["events"]].count("rules_replaced") == 1
    assert {r["remote_ip_prefix"] for r in detail["security_rules"]} == {f"{GATEWAY}/32"}
    assert connects(address, 8000, GATEWAY)
    assert not connects(address, 8000, FOREIGN)
    assert not connects(address, 2222, FOREIGN)
    assert not connects(address, 2222, ORCHESTRATOR)  # closed once serving


class _LeavesEnginePortOpen(SandboxBackend):
    """A cloud that ignored the serving rules it was given: the engine port stays open to everyone."""

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        port = request.engine_port
        super().apply_rules(request, [*rules, Rule("ingress", "tcp", "IPv4", "0.0.0.0/0", port, port)])


async def test_securing_fails_a_replica_whose_engine_port_a_stranger_reaches(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    deps.managed.backend = _LeavesEnginePortOpen(sandbox.config)
    replica_id = await create_managed(client)
    await fails_securing(deps, sandbox, replica_id, "the engine port (8000)")


async def test_securing_fails_a_replica_whose_stored_rules_open_ssh_to_everyone(
    deps: Deps, client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    # As a replica created before rules were judged holds it (the API refuses it now).
    legacy = Rule("ingress", "tcp", "IPv4", "0.0.0.0/0", 2222, 2222)
    await deps.store.set_phase_rules(replica_id, rows_of(replica_id, Phase.USER, [legacy]))
    await fails_securing(deps, sandbox, replica_id, "SSH (port 2222)")


async def fails_securing(deps: Deps, sandbox: SandboxBackend, replica_id: int, port: str) -> None:
    """The replica ends `securing_failed` (never READY, its VM destroyed) because a foreign source reached `port`."""
    replica = await drive_to(deps, replica_id, S.TERMINATED)
    assert (replica.termination_reason, replica.error_message) == (
        "securing_failed",
        f"{port} accepted a connection from {STRANGER}, a foreign source, after securing",
    )
    assert "READY" not in await moves(deps, replica_id)
    assert sandbox.owned() == frozenset()


# -- draining ----------------------------------------------------------------------------------------


async def drain_to_the_end(
    deps: Deps, replica_id: int, timeout_s: float, *, while_draining: Callable[[], Awaitable[None]]
) -> Replica:
    """The reconcile job's passes (with its Drain) until the replica is TERMINATED; `while_draining()` is checked
    on each pass that leaves it DRAINING."""
    drain = Drain(deps.catalog, timeout_s)
    async with asyncio.timeout(timeout_s + 20):
        while True:
            await reconcile(deps.store, deps.managed, drain)
            await deps.managed.settle()
            replica = await deps.store.replica(replica_id)
            assert replica is not None
            if replica.status == S.TERMINATED:
                return replica
            if replica.status == S.DRAINING:
                await while_draining()
            await asyncio.sleep(0.02)  # the calls run in this loop: let them go on between passes


async def _running(engine: Engine) -> int:
    return len([c for c in await engine.chats() if c["finished"] is None])


async def _until_running(engine: Engine, n: int) -> None:
    async with asyncio.timeout(10):
        while await _running(engine) < n:  # noqa: ASYNC110 (the engine's log, read over HTTP)
            await asyncio.sleep(0.01)


async def test_deleting_a_managed_replica_lets_its_streams_finish_before_the_vm_goes(
    deps: Deps, client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.READY)
    engine = Engine(f"http://{replica.vm_address}:{replica.port}", MODEL)
    await engine.set_faults(tokens_per_s=20)  # 16 tokens: a stream of about 0.8 s
    _, key = await issue_key(client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}
    streams = [
        asyncio.create_task(
            anon_client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        )
        for _ in range(3)
    ]
    await _until_running(engine, 3)
    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204

    async def vm_still_up() -> None:
        assert sandbox.owned() == frozenset({replica_id})

    gone = await drain_to_the_end(deps, replica_id, 60.0, while_draining=vm_still_up)
    # The drain ends once each call is accounted for, which is just before its relay sends the last bytes.
    for answer in await asyncio.wait_for(asyncio.gather(*streams), timeout=10):
        assert answer.status_code == 200
        assert answer.text.rstrip().endswith("data: [DONE]"), answer.text[-300:]  # whole: the VM outlived it
    [drained] = [e for e in (await deps.replicas.detail(replica_id)).events if e.from_status == S.DRAINING]
    assert drained.reason == "drained"
    assert (drained.message or "").startswith("drained: 3 in-flight calls finished in "), drained.message
    assert gone.termination_reason == "deleted"
    assert sandbox.owned() == frozenset()


async def test_the_drain_timeout_cuts_a_hung_call_by_destroying_the_vm(
    deps: Deps, client: httpx.AsyncClient, anon_client: httpx.AsyncClient, sandbox: SandboxBackend
) -> None:
    replica_id = await create_managed(client)
    replica = await drive_to(deps, replica_id, S.READY)
    engine = Engine(f"http://{replica.vm_address}:{replica.port}", MODEL)
    await engine.set_faults(hang=True)
    _, key = await issue_key(client)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    call = asyncio.create_task(
        anon_client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    )
    await _until_running(engine, 1)
    deleted = time.monotonic()
    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204

    async def still_waiting() -> None:
        assert not call.done()
        assert await _running(engine) == 1  # the VM and its engine are still there, the call too

    await drain_to_the_end(deps, replica_id, 1.0, while_draining=still_waiting)
    assert time.monotonic() - deleted >= 1.0
    answer = await asyncio.wait_for(call, 10)
    assert answer.status_code == 502, answer.text  # the engine went with its VM
    [timed_out] = [e for e in (await deps.replicas.detail(replica_id)).events if e.from_status == S.DRAINING]
    assert (timed_out.reason, timed_out.message) == ("drain_timeout", "drain timeout after 1 s: 1 in-flight call cut")
    assert sandbox.owned() == frozenset()
