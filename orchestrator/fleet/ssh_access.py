"""How the orchestrator reaches a managed replica's engine: SSH for bootstrap and restarts (blocking, called
from worker threads), and the network checks that gate READY (async)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from infra.vm import Rule
from orchestrator.fleet.security_rules import ConnectionSources, allows, source_of
from orchestrator.gateway.engine_urls import engine_urls
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.tables import Replica
from provisioning.bootstrap import StepReport, bootstrap, engine_log, restart_engine
from provisioning.plan import EnginePlan
from provisioning.ssh import SshTarget, connect
from provisioning.ssh_keys import public_key_line

PlanMaker = Callable[[Replica, str, Mapping[str, str]], EnginePlan]
"""(replica, served model name, secret environment: the engine key as VLLM_API_KEY and the engine spec's sealed
variables) -> how the engine is installed and run on this backend's VMs."""
Record = Callable[[str, str], None]
BOOTSTRAP_EVENT = "bootstrap_"
"""Prefix of the reason of each bootstrap step's event (`bootstrap_gpu`, `bootstrap_start`, ...)."""


@dataclass(frozen=True)
class Verdict:
    """What the check of a just-secured replica found."""

    problem: str | None
    """What let in whom it should not have, or what could not reach; None when all held."""
    secured: str = ""
    """What holds and from where it was verified, for the replica's event (saying what was not probed)."""


@dataclass(frozen=True)
class AccessPolicy:
    restart_deadline_s: float = 60.0
    verify_deadline_s: float = 15.0
    """How long the gateway's path may take to reach a just-secured engine."""
    closed_timeout_s: float = 1.5
    """A connection attempt that neither connects nor is refused within this is a closed (dropped) port."""
    foreign_ssh: bool = True
    """Whether the foreign source probes SSH too. Not on `hosts`: a host's SSH is the server's (its admin's way
    in, often open to more than the orchestrator), which a replica's rules never close."""


class EngineAccess:
    def __init__(
        self, box: SecretBox, network: ConnectionSources, upstream: Upstream, plans: PlanMaker, policy: AccessPolicy
    ) -> None:
        self._box = box
        self._net = network
        self._upstream = upstream
        self._plans = plans
        self.policy = policy

    def client_public_key(self, replica: Replica) -> str:
        return public_key_line(self._box.open(replica.ssh_key_sealed or ""), f"orchestrator@replica-{replica.id}")

    def target(self, replica: Replica) -> SshTarget:
        return SshTarget(
            host=replica.vm_address or "",
            port=replica.ssh_port or 22,
            username=replica.ssh_user or "root",
            host_key=replica.host_key or "",
            client_key=self._box.open(replica.ssh_key_sealed or ""),
            source_address=self._net.ssh_source_address,
        )

    def _plan(self, replica: Replica, model: str) -> EnginePlan:
        secrets: dict[str, str] = {}
        if replica.engine_secrets_sealed:
            secrets = json.loads(self._box.open(replica.engine_secrets_sealed))
        secrets["VLLM_API_KEY"] = self._box.open(replica.engine_key_sealed or "")
        return self._plans(replica, model, secrets)

    def bootstrap(self, replica: Replica, model: str, deadline_s: float, record: Record) -> tuple[int, int]:
        """Blocking. Runs the idempotent bootstrap; each step becomes an event. Returns (changed, total)."""

        def on_step(report: StepReport) -> None:
            record(f"{BOOTSTRAP_EVENT}{report.name}", _describe(report))

        with connect(self.target(replica), deadline_s=deadline_s) as session:
            reports = bootstrap(session, self._plan(replica, model), on_step=on_step)
        return sum(r.changed for r in reports), len(reports)

    def restart(self, replica: Replica, model: str) -> str:
        """Blocking. Restarts the engine over SSH; returns the (redacted) output."""
        with connect(self.target(replica), deadline_s=self.policy.restart_deadline_s) as session:
            return _describe(restart_engine(session, self._plan(replica, model)))

    def engine_log(self, replica: Replica, model: str) -> str:
        """Blocking. The engine's last log lines over SSH (redacted)."""
        with connect(self.target(replica), deadline_s=self.policy.restart_deadline_s) as session:
            return engine_log(session, self._plan(replica, model))

    async def verify_serving(self, replica: Replica, rules: Sequence[Rule]) -> Verdict:
        """Whether the gateway reaches the engine, SSH is as closed to the orchestrator as `rules` say, and
        neither port lets a stranger in (probed from the foreign source, where this machine has one)."""
        problem = await self._gateway_reaches(replica)
        if problem is not None:
            return Verdict(problem)
        host, ssh_port, engine_port = replica.vm_address or "", replica.ssh_port or 22, replica.port or 0
        ssh_kept = allows(rules, source_of(self._net.orchestrator_cidr), ssh_port)  # an admin rule may keep it
        if not ssh_kept and await self._port_open(host, ssh_port, self._net.ssh_source_address):
            return Verdict(f"SSH (port {ssh_port}) still accepts connections from the orchestrator after securing")
        ssh_state = "SSH open to the orchestrator only" if ssh_kept else "SSH closed"
        if not self.policy.foreign_ssh:
            ssh_state = "SSH left as the host's own firewall has it"
        state = f"engine port open to the gateway only, {ssh_state}"
        stranger = self._net.foreign_source_address
        if stranger is None:
            return Verdict(
                None,
                f"{state}; verified from the gateway and the orchestrator, not probed from outside: "
                "no foreign source address on this backend",
            )
        ports = {ssh_port: f"SSH (port {ssh_port})"} if self.policy.foreign_ssh else {}
        ports[engine_port] = f"the engine port ({engine_port})"
        opened = await asyncio.gather(*(self._port_open(host, port, stranger) for port in ports))
        let_in = [what for what, is_open in zip(ports.values(), opened, strict=True) if is_open]
        if let_in:
            return Verdict(
                f"{' and '.join(let_in)} accepted a connection from {stranger}, a foreign source, after securing"
            )
        return Verdict(None, f"{state}; verified from the gateway, the orchestrator and a foreign source ({stranger})")

    async def _gateway_reaches(self, replica: Replica) -> str | None:
        # The gateway's own session: same pool, same source address as the traffic it will carry.
        url = f"{engine_urls(replica.endpoint or '').origin}/health"
        timeout = aiohttp.ClientTimeout(total=self.policy.closed_timeout_s * 2)
        deadline = time.monotonic() + self.policy.verify_deadline_s
        error = "not tried"
        while time.monotonic() < deadline:
            try:
                async with self._upstream.session.get(url, timeout=timeout) as r:
                    if r.status in {200, 404}:
                        return None
                    error = f"/health answered {r.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                error = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.2)
        return f"the gateway cannot reach the engine at {url}: {error}"

    async def _port_open(self, host: str, port: int, source: str | None) -> bool:
        local = (source, 0) if source else None
        try:
            async with asyncio.timeout(self.policy.closed_timeout_s):
                _, writer = await asyncio.open_connection(host, port, local_addr=local)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True


def _describe(report: StepReport) -> str:
    head = "changed" if report.changed else "unchanged"
    return f"{head}: {report.output.strip()[-2000:]}" if report.output.strip() else head
