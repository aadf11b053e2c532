"""Managed replicas: the VM side of the lifecycle (provision, bootstrap, secure, recover, destroy).

The reconcile job launches one task per replica that has VM work to do; the task walks the replica from
step to step (load -> act in a worker thread -> guarded move) until it reaches a status that waits for
something else (STARTING waits for the prober). Everything a step needs is in the replica's row, so a
server killed in the middle resumes each replica from its stored status; the backends are idempotent per
replica id, so resuming never makes a second VM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from infra.vm import BackendError, Rule, VmRequest
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.backend import VmBackend
from orchestrator.fleet.hosts import HostPlacer
from orchestrator.fleet.security_rules import ConnectionSources, Phase, phase_rules, rows_of, rule_of
from orchestrator.fleet.ssh_access import EngineAccess
from orchestrator.platform.secrets import SecretBox, new_api_key
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica, row_id
from provisioning.errors import SshError
from provisioning.ssh_keys import generate_keypair

log = structlog.get_logger(__name__)
S = ReplicaStatus
T = TypeVar("T")
MANAGED_STEPS = frozenset({S.PENDING, S.PROVISIONING, S.BOOTSTRAPPING, S.SECURING, S.UNHEALTHY, S.TERMINATING})
"""Statuses in which a managed replica has VM work to do."""


@dataclass(frozen=True)
class ManagedPolicy:
    boot_deadline_s: float = 600.0
    max_recoveries: int = 2
    recover_after_s: float = 30.0
    retry_max_s: float = 60.0
    """Longest pause before a step that failed without a decision (a destroy that errored) is tried again."""


class ManagedReplicas:
    def __init__(
        self,
        store: FleetStore,
        backend: VmBackend,
        *,
        box: SecretBox,
        network: ConnectionSources,
        access: EngineAccess,
        pool: ThreadPoolExecutor,
        policy: ManagedPolicy,
        on_moved: Callable[[], Awaitable[None]],
        placer: HostPlacer | None = None,
    ) -> None:
        self.store = store
        self.placer = placer
        """The `hosts` backend's: each replica is first placed on a registered host (see `_place`)."""
        self.backend = backend
        self._box = box
        self.network = network
        self.access = access
        self._pool = pool
        self.policy = policy
        self._on_moved = on_moved
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._retry: dict[int, tuple[int, float]] = {}  # replica id -> (failures, not before)
        self._steps: dict[ReplicaStatus, Callable[[Replica, str], Awaitable[bool]]] = {
            S.PENDING: self._pending,
            S.PROVISIONING: self._provisioning,
            S.BOOTSTRAPPING: self._bootstrapping,
            S.SECURING: self._securing,
            S.UNHEALTHY: self._unhealthy,
            S.TERMINATING: self._terminating,
        }

    def launch(self, replica: Replica) -> None:
        """Start the replica's task unless one runs already (or a failed step is still backing off)."""
        rid = row_id(replica.id)
        if rid in self._tasks or self._retry.get(rid, (0, 0.0))[1] > time.monotonic():
            return
        task = asyncio.create_task(self._drive(rid), name=f"replica-{rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._tasks.pop(rid, None))

    def busy(self, replica_id: int) -> bool:
        return replica_id in self._tasks

    async def settle(self) -> None:
        """Wait until no replica task runs (tests; a clean stop)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        """Stop all VM work; each replica resumes from its stored status at the next start."""
        for task in list(self._tasks.values()):
            task.cancel()
        await self.settle()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _drive(self, rid: int) -> None:
        moved = False
        try:
            while (row := await self.store.replica_with_model(rid)) is not None:
                replica, model = row
                step = self._steps.get(S(replica.status))
                if step is None or not await step(replica, model):
                    break
                moved = True
        except Exception:  # an unexpected failure: logged, and the next reconcile pass tries again after a pause
            log.exception("managed.step_failed", replica_id=rid)
            self._back_off(rid)
        finally:
            if moved:
                await self._on_moved()

    def _back_off(self, rid: int) -> None:
        failures = self._retry.get(rid, (0, 0.0))[0] + 1
        pause = min(self.policy.retry_max_s, 0.5 * 2**failures)
        self._retry[rid] = (failures, time.monotonic() + pause)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking VM work (a backend call, SSH) in the pool. On `hosts`, the backend's book is read from the
        database first (one query; the work is SSH), so it is never stale: not after a restart, nor after a host
        registered through another instance, and the jobs that call the backend directly (the sweeps) see it too."""
        if self.placer is not None:
            await self.placer.refresh()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _fail(self, replica: Replica, reason: str, message: str, *, src: ReplicaStatus | None = None) -> bool:
        """The replica cannot go on: terminate it, keeping why (toolkit vm_status FAILED).
        `src` is the status it is in now, when a step moved it since `replica` was read."""
        log.warning("managed.failed", replica_id=replica.id, reason=reason, error=message)
        src = src or S(replica.status)
        return await self.store.move(row_id(replica.id), src, S.TERMINATING, reason, message, error_message=message)

    # -- the steps ------------------------------------------------------------------------------

    async def _pending(self, replica: Replica, _model: str) -> bool:
        # Keys are made and stored before the VM exists: a retried `up` sends the very same request.
        rid = row_id(replica.id)
        ssh_private, _ = generate_keypair(f"orchestrator@replica-{rid}")
        keys = {"ssh_key_sealed": self._box.seal(ssh_private), "engine_key_sealed": self._box.seal(new_api_key())}
        if self.placer is not None:
            placed = await self._place(replica)
            if placed is None:
                return False
            message, changes = placed
            return await self.store.move(rid, S.PENDING, S.PROVISIONING, "placed", message, **keys, **changes)
        host_private, host_public = generate_keypair(f"replica-{rid}-host")
        return await self.store.move(
            rid,
            S.PENDING,
            S.PROVISIONING,
            "provisioning",
            f"creating the VM (backend {type(self.backend).__name__})",
            host_key=host_public,
            host_key_sealed=self._box.seal(host_private),
            **keys,
        )

    async def _place(self, replica: Replica) -> tuple[str, dict[str, Any]] | None:
        """A host, GPUs and engine port for the replica (the event's message and the row's changes: the host's
        own key is the one pinned, the engine's port is the placed one), or None while none has room: the
        replica waits in PENDING, saying why (an event and its probe_error, once per change), and is placed by a
        later pass once a replica on a host of its pool is TERMINATED."""
        assert self.placer is not None
        rid = row_id(replica.id)
        spot = await self.placer.place(replica)
        if isinstance(spot, str):
            if replica.probe_error != spot:
                log.info("replica.waiting_for_host", replica_id=rid, reason=spot)
                await self.store.record(rid, "waiting_for_host", spot)
                await self.store.note_probe(
                    rid, S.PENDING, probe_error=spot, probe_error_since=datetime.now(UTC), ready_deadline=None
                )
            return None
        gpus = ",".join(map(str, spot.gpus)) or "none"
        message = f"placed on host {spot.host_name}: GPUs {gpus}, engine port {spot.engine_port}"
        changes = {
            "host_key": await self.placer.host_key(rid),
            "host_key_sealed": None,
            "port": spot.engine_port,
            "probe_error": None,
            "probe_error_since": None,
        }
        return message, changes

    async def _provisioning(self, replica: Replica, _model: str) -> bool:
        rid = row_id(replica.id)
        rules = await self._set_phase(replica, Phase.BOOTSTRAP, self.backend.ssh_port)
        try:
            handle = await self.in_thread(self.backend.up, self.request(replica, rules))
        except BackendError as e:
            return await self._fail(replica, "provision_failed", str(e))
        host = f"[{handle.address}]" if ":" in handle.address else handle.address
        return await self.store.move(
            rid,
            S.PROVISIONING,
            S.BOOTSTRAPPING,
            "provisioned",
            f"VM {handle.vm_id} at {handle.address}; SSH on port {handle.ssh_port} open to the orchestrator only",
            vm_id=handle.vm_id,
            vm_address=handle.address,
            ssh_port=handle.ssh_port,
            ssh_user=handle.ssh_user,
            endpoint=f"http://{host}:{replica.port}",
        )

    async def _bootstrapping(self, replica: Replica, model: str) -> bool:
        rid = row_id(replica.id)
        elapsed = (datetime.now(UTC) - replica.status_changed_at).total_seconds()
        deadline = max(5.0, self.policy.boot_deadline_s - elapsed)  # the deadline survives a restart
        loop = asyncio.get_running_loop()

        def record(reason: str, message: str) -> None:  # called from the worker thread
            asyncio.run_coroutine_threadsafe(self.store.record(rid, reason, message), loop).result(timeout=30)

        try:
            changed, total = await self.in_thread(self.access.bootstrap, replica, model, deadline, record)
        except SshError as e:
            return await self._fail(replica, "bootstrap_failed", f"{type(e).__name__}: {e}")
        return await self.store.move(
            rid, S.BOOTSTRAPPING, S.STARTING, "bootstrapped", f"{changed} of {total} steps changed the VM"
        )

    async def _securing(self, replica: Replica, model: str) -> bool:
        # The last look inside while SSH is still open: the engine's log, kept on the replica.
        try:
            log_tail: str | None = await self.in_thread(self.access.engine_log, replica, model)
        except SshError as e:
            log_tail = None
            await self.store.record(row_id(replica.id), "engine_log_unavailable", f"{type(e).__name__}: {e}")
        # A host's SSH is the host's, shared by its replicas and its admin: a replica placed there never closes it.
        phase = Phase.SERVING if self.placer is None else Phase.BOOTSTRAP
        rules = await self._set_phase(replica, phase, replica.ssh_port or self.backend.ssh_port)
        try:
            await self.in_thread(self.backend.apply_rules, self.request(replica, ()), rules)
        except BackendError as e:
            return await self._fail(replica, "securing_failed", str(e))
        verdict = await self.access.verify_serving(replica, rules)
        if verdict.problem is not None:
            return await self._fail(replica, "securing_failed", verdict.problem)
        return await self.store.move(
            row_id(replica.id), S.SECURING, S.READY, "secured", verdict.secured, engine_log=log_tail
        )

    async def _unhealthy(self, replica: Replica, model: str) -> bool:
        rid = row_id(replica.id)
        if (datetime.now(UTC) - replica.status_changed_at).total_seconds() < self.policy.recover_after_s:
            return False  # it may come back by itself; a later pass looks again
        if replica.recoveries >= self.policy.max_recoveries:
            message = f"still unhealthy after {replica.recoveries} engine restarts"
            return await self.store.move(rid, S.UNHEALTHY, S.DRAINING, "unrecoverable", message, error_message=message)
        # Claim it first (out of the prober's UNHEALTHY -> READY path), then open SSH and restart the engine.
        n = replica.recoveries + 1
        claimed = await self.store.move(
            rid, S.UNHEALTHY, S.STARTING, "recovering", f"recovery {n} of {self.policy.max_recoveries}", recoveries=n
        )
        if not claimed:
            return False
        rules = await self._set_phase(replica, Phase.BOOTSTRAP, replica.ssh_port or self.backend.ssh_port)
        try:
            await self.in_thread(self.backend.apply_rules, self.request(replica, ()), rules)
            output = await self.in_thread(self.access.restart, replica, model)
        except (BackendError, SshError) as e:
            return await self._fail(replica, "recovery_failed", f"{type(e).__name__}: {e}", src=S.STARTING)
        await self.store.record(rid, "engine_restarted", output)
        return True

    async def _terminating(self, replica: Replica, _model: str) -> bool:
        rid = row_id(replica.id)
        try:
            await self.in_thread(self.backend.destroy, rid)
        except BackendError as e:
            await self.store.record(rid, "destroy_failed", str(e))
            self._back_off(rid)
            return False
        self._retry.pop(rid, None)
        return await self.store.move(rid, S.TERMINATING, S.TERMINATED, "destroyed", "the VM and its rules are gone")

    # -- helpers -------------------------------------------------------------------------------

    async def _set_phase(self, replica: Replica, phase: Phase, ssh_port: int) -> list[Rule]:
        """Store the phase's rules as the desired set and return the whole set (the admin's rules too)."""
        rid = row_id(replica.id)
        own = phase_rules(phase, self.network, engine_port=replica.port or 0, ssh_port=ssh_port)
        await self.store.set_phase_rules(rid, rows_of(rid, phase, own))
        return [rule_of(r) for r in await self.store.security_rules(rid)]

    def request(self, replica: Replica, rules: Sequence[Rule]) -> VmRequest:
        return VmRequest(
            replica_id=row_id(replica.id),
            name=replica.name or f"replica-{replica.id}",
            environment_name=replica.environment_name or "",
            image_name=replica.image_name or "",
            flavor_name=replica.flavor_name or "",
            key_name=replica.key_name or "",
            assign_floating_ip=bool(replica.assign_floating_ip),
            engine_port=replica.port or 0,
            ssh_public_key=self.access.client_public_key(replica),
            host_public_key=replica.host_key or "",
            host_private_key=self._box.open(replica.host_key_sealed) if replica.host_key_sealed else "",
            rules=tuple(rules),
        )
