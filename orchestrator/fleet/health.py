"""Health of replicas' engines: probes STARTING replicas to READY and keeps READY <-> UNHEALTHY honest.

Readiness (STARTING, UNHEALTHY): `/health` is 200, `/v1/models` lists the model, a 1-token completion answers.
Liveness (READY): `/health` is 200. Consecutive results, kept in memory, decide the moves; the gateway's
connection failures count as failed probes and ask for a probe at once (passive ejection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import msgspec
import structlog

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.gateway.engine_urls import engine_urls
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica, row_id

log = structlog.get_logger(__name__)
S = ReplicaStatus
PROBED = (S.STARTING, S.READY, S.UNHEALTHY)
FIRST_RETRY_S = 0.05


@dataclass(frozen=True)
class HealthPolicy:
    starting_interval_s: float = 2.0
    ready_interval_s: float = 10.0
    unhealthy_after: int = 3
    """Consecutive failed liveness probes (or refused gateway connections) that take a replica out."""
    healthy_after: int = 2
    """Consecutive passed readiness probes that bring an UNHEALTHY replica back."""
    startup_grace_s: float = 600.0
    """How long a replica may stay STARTING before it is a configuration error (terminated, not retried)."""
    timeout_s: float = 5.0
    concurrency: int = 256


@dataclass
class _Track:
    failures: int = 0
    successes: int = 0
    due: float = 0.0


class _Models(msgspec.Struct):
    data: list[dict[str, object]] = []


class HealthMonitor:
    def __init__(
        self,
        store: FleetStore,
        upstream: Upstream,
        box: SecretBox,
        policy: HealthPolicy,
        *,
        on_change: Callable[[], Awaitable[None]],
        wake: Callable[[], None],
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._box = box
        self.policy = policy
        self._on_change = on_change
        self._tracks: dict[int, _Track] = {}
        self._wake = wake
        self._wake_at: float | None = None

    def report_unreachable(self, replica_id: int) -> None:
        """The gateway could not connect: a failed probe, and a real probe as soon as possible."""
        track = self._tracks.setdefault(replica_id, _Track())
        track.failures += 1
        track.successes = 0
        track.due = 0.0
        self._wake()

    async def run(self) -> bool:
        """Probe every replica that is due; apply the moves. Returns whether any replica moved."""
        now = time.monotonic()
        replicas = [(r, m) for r, m in await self._store.replicas_with_model(PROBED) if r.endpoint]
        live = {row_id(r.id) for r, _ in replicas}
        for gone in set(self._tracks) - live:
            del self._tracks[gone]
        due = [(r, m) for r, m in replicas if self._tracks.setdefault(row_id(r.id), _Track()).due <= now]
        if not due:
            return False
        outcomes = await self.probe_all(due)
        moved = False
        for (replica, _), error in zip(due, outcomes, strict=True):
            moved |= await self._apply(replica, error)
        if moved:
            await self._on_change()
        self._wake_for_next(now)
        return moved

    def _wake_for_next(self, now: float) -> None:
        """Ask for a run when the next replica is due, if that is before the job's own next tick."""
        soonest = min((t.due for t in self._tracks.values()), default=now + 60) - time.monotonic()
        if soonest >= 1.0 or (self._wake_at is not None and self._wake_at <= now + soonest):
            return
        self._wake_at = now + max(0.0, soonest)
        asyncio.get_running_loop().call_later(max(0.0, soonest), self._woken)

    def _woken(self) -> None:
        self._wake_at = None
        self._wake()

    async def probe_all(self, replicas: list[tuple[Replica, str]]) -> list[str | None]:
        """One probe per (replica, model), `policy.concurrency` at a time; None is a pass, a string what failed."""
        gate = asyncio.Semaphore(self.policy.concurrency)

        async def one(replica: Replica, model: str) -> str | None:
            async with gate:
                try:
                    return await self._probe(replica, model)
                except (aiohttp.ClientError, TimeoutError, ValueError, msgspec.DecodeError) as e:
                    return f"{type(e).__name__}: {e}"[:300]

        return await asyncio.gather(*(one(r, m) for r, m in replicas))

    async def _probe(self, replica: Replica, model: str) -> str | None:
        urls = engine_urls(replica.endpoint or "")
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_s)
        session = self._upstream.session
        async with session.get(f"{urls.origin}/health", timeout=timeout) as r:
            if r.status not in {200, 404}:  # 404: an OpenAI-compatible server without /health
                return f"/health answered {r.status}"
        if replica.status == S.READY:
            return None
        sealed = replica.engine_key_sealed
        headers = {"Authorization": f"Bearer {self._box.open(sealed)}"} if sealed else {}
        async with session.get(f"{urls.api_base}/models", headers=headers, timeout=timeout) as r:
            if r.status != 200:
                return f"/v1/models answered {r.status}"
            served = {str(m.get("id")) for m in msgspec.json.decode(await r.read(), type=_Models).data}
        if model not in served:
            return f"/v1/models does not list {model!r} (it lists {sorted(served)[:5]})"
        body = msgspec.json.encode({"model": model, "prompt": "ping", "max_tokens": 1})
        headers["Content-Type"] = "application/json"
        async with session.post(f"{urls.api_base}/completions", data=body, headers=headers, timeout=timeout) as r:
            if r.status != 200:
                return f"a 1-token completion answered {r.status}"
        return None

    async def _apply(self, replica: Replica, error: str | None) -> bool:
        rid, status, track = row_id(replica.id), S(replica.status), self._tracks[row_id(replica.id)]
        p = self.policy
        if error is None:
            track.failures, track.successes = 0, track.successes + 1
        else:
            track.failures, track.successes = track.failures + 1, 0
        if status is S.READY:
            track.due = time.monotonic() + p.ready_interval_s
        else:
            # An engine coming up is looked at soon and then less often: a fast start is READY at once,
            # a slow one (weights loading) costs a probe every `starting_interval_s`.
            track.due = time.monotonic() + min(p.starting_interval_s, FIRST_RETRY_S * 2 ** (track.failures - 1))
        if status is S.STARTING:
            if error is None:
                nxt = S.SECURING if replica.create_vm else S.READY
                return await self._store.move(rid, status, nxt, "probe_passed", "health, models and completion ok")
            age = (datetime.now(UTC) - replica.status_changed_at).total_seconds()
            if age > p.startup_grace_s:
                return await self._store.move(
                    rid,
                    status,
                    S.TERMINATING,
                    "never_ready",
                    f"not ready after {age:.0f} s: {error}",
                    error_message=error,
                )
            return False
        if status is S.READY and track.failures >= p.unhealthy_after:
            return await self._store.move(rid, status, S.UNHEALTHY, "probe_failed", error)
        if status is S.UNHEALTHY and track.successes >= p.healthy_after:
            return await self._store.move(rid, status, S.READY, "probe_passed", "recovered")
        return False
