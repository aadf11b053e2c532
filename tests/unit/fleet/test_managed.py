"""The parts of the managed replicas' step logic that decide without a VM or a database: the policy, which statuses
have VM work, the back-off after a failed step, what a replica's row asks of the backend, and an unhealthy replica
left alone until it had time to come back by itself. (The steps proper read and move rows in the store and call
the backend and SSH: the system tests drive them on sandbox VMs.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from infra.sandbox import SandboxBackend, SandboxConfig
from infra.vm import Rule
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.engine_plans import cloud_plans
from orchestrator.fleet.managed import MANAGED_STEPS, ManagedPolicy, ManagedReplicas
from orchestrator.fleet.security_rules import ConnectionSources
from orchestrator.fleet.ssh_access import AccessPolicy, EngineAccess
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.db import make_engine, make_sessions
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica
from provisioning.ssh_keys import generate_keypair, public_key_line

S = ReplicaStatus
NETWORK = ConnectionSources("10.0.0.0/24", "192.168.1.5/32")
POLICY = ManagedPolicy(recover_after_s=30.0, retry_max_s=60.0)


@dataclass
class Fleet:
    managed: ManagedReplicas
    box: SecretBox
    database: Path
    """The store's SQLite file: it exists only once something touched the store."""


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    database = tmp_path / "db" / "never-opened.db"
    engine = make_engine(f"sqlite+aiosqlite:///{database}")
    box = SecretBox("unit-test-secret")

    async def on_moved() -> None:
        raise AssertionError("no step moved a replica here")

    managed = ManagedReplicas(
        FleetStore(make_sessions(engine)),
        SandboxBackend(SandboxConfig(root=tmp_path / "sandbox", enforce_rules=False)),
        box=box,
        network=NETWORK,
        access=EngineAccess(box, NETWORK, Upstream(), cloud_plans(), AccessPolicy()),
        pool=ThreadPoolExecutor(1),
        policy=POLICY,
        on_moved=on_moved,
    )
    try:
        yield Fleet(managed, box, database)
    finally:
        await managed.close()
        await engine.dispose()


def test_the_default_policy() -> None:
    policy = ManagedPolicy()
    assert (policy.boot_deadline_s, policy.max_recoveries, policy.recover_after_s, policy.retry_max_s) == (
        600.0,
        2,
        30.0,
        60.0,
    )


def test_the_statuses_with_vm_work_are_those_with_a_step(fleet: Fleet) -> None:
    assert {S.PENDING, S.PROVISIONING, S.BOOTSTRAPPING, S.SECURING, S.UNHEALTHY, S.TERMINATING} == MANAGED_STEPS
    assert set(fleet.managed._steps) == MANAGED_STEPS
    # Waiting for something else (the prober, the drain, nothing at all): no VM work.
    for status in set(S) - MANAGED_STEPS:
        assert status in {S.STARTING, S.READY, S.DRAINING, S.TERMINATED}, status


@pytest.mark.parametrize("retry_max_s", [60.0, 5.0])
def test_a_failed_step_backs_off_doubling_up_to_the_policys_longest_pause(fleet: Fleet, retry_max_s: float) -> None:
    managed = fleet.managed
    managed.policy = ManagedPolicy(retry_max_s=retry_max_s)
    for failures, doubled in enumerate([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], start=1):
        before = time.monotonic()
        managed._back_off(7)
        after = time.monotonic()
        count, not_before = managed._retry[7]
        pause = min(doubled, retry_max_s)
        assert count == failures
        assert before + pause <= not_before <= after + pause
    assert set(managed._retry) == {7}  # per replica


async def test_a_replica_backing_off_is_not_launched(fleet: Fleet) -> None:
    fleet.managed._back_off(5)
    fleet.managed.launch(Replica(id=5, model_id=1, status="TERMINATING"))
    assert not fleet.managed.busy(5)
    assert not fleet.database.exists()  # no task started: nothing read the row


def sealed_replica(box: SecretBox) -> tuple[Replica, str, str]:
    host_private, host_public = generate_keypair("replica-9-host")
    ssh_private, _ = generate_keypair("orchestrator@replica-9")
    replica = Replica(
        id=9,
        model_id=1,
        host_key=host_public,
        host_key_sealed=box.seal(host_private),
        ssh_key_sealed=box.seal(ssh_private),
    )
    return replica, host_private, ssh_private


def test_the_vm_request_is_the_replicas_row_with_its_keys_opened(fleet: Fleet) -> None:
    replica, host_private, ssh_private = sealed_replica(fleet.box)
    replica.name, replica.environment_name, replica.image_name = "gpu-1", "env", "ubuntu"
    replica.flavor_name, replica.key_name, replica.assign_floating_ip, replica.port = (
        "n1-A100x1",
        "admin-key",
        True,
        8000,
    )
    rules = [Rule("ingress", "tcp", "IPv4", "10.0.0.0/24", 22, 22)]
    request = fleet.managed.request(replica, rules)
    assert (request.replica_id, request.name, request.environment_name, request.image_name) == (
        9,
        "gpu-1",
        "env",
        "ubuntu",
    )
    assert (request.flavor_name, request.key_name, request.assign_floating_ip, request.engine_port) == (
        "n1-A100x1",
        "admin-key",
        True,
        8000,
    )
    assert request.host_public_key == replica.host_key
    assert request.host_private_key == host_private  # opened from its sealed form
    assert request.ssh_public_key == public_key_line(ssh_private, "orchestrator@replica-9")
    assert request.rules == tuple(rules)


def test_a_request_fills_what_the_row_leaves_out(fleet: Fleet) -> None:
    replica, _, _ = sealed_replica(fleet.box)
    request = fleet.managed.request(replica, ())
    assert request.name == "replica-9"
    assert (request.environment_name, request.image_name, request.flavor_name, request.key_name) == ("", "", "", "")
    assert (request.assign_floating_ip, request.engine_port, request.rules) == (False, 0, ())


def test_a_request_for_keys_sealed_under_another_secret_is_refused(fleet: Fleet) -> None:
    replica, _, _ = sealed_replica(SecretBox("another-secret"))
    with pytest.raises(ValueError, match="could not be decrypted"):
        fleet.managed.request(replica, ())


async def test_an_unhealthy_replica_is_left_alone_until_recover_after(fleet: Fleet) -> None:
    replica = Replica(id=4, model_id=1, status="UNHEALTHY", recoveries=5)
    replica.status_changed_at = datetime.now(UTC) - timedelta(seconds=POLICY.recover_after_s / 2)
    assert await fleet.managed._unhealthy(replica, "m") is False
    assert not fleet.database.exists()  # decided on the row alone: the store was never asked
