"""Health of replicas' engines: probes STARTING replicas to READY and keeps READY <-> UNHEALTHY honest.

Readiness (STARTING, UNHEALTHY): `/health` is 200 (or 404: an OpenAI-compatible server without it), `/v1/models`
lists the model, and a 1-token generation answers: a completion, or, where the engine does not serve completions
(404, 405 or 501 there: a chat-only API), a 1-token chat, which is then what this replica is probed with.
Liveness (READY): `/health` is 200. Consecutive results, kept in memory, decide the moves; the gateway's
connection failures count as failed probes and ask for a probe at once (passive ejection).

A failed probe's error is written on the replica (`probe_error`, since when, and for STARTING when its grace runs
out) and logged as `replica.probe_failed` each time it changes, not at every probe; a passed probe clears it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
import structlog

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.gateway.engine_urls import EngineUrls, engine_urls
from orchestrator.gateway.upstream import Upstream
from orchestrator.platform.secrets import SecretBox
from orchestrator.store.fleet import FleetStore
from orchestrator.store.tables import Replica, row_id

log = structlog.get_logger(__name__)
S = ReplicaStatus
PROBED = (S.STARTING, S.READY, S.UNHEALTHY)
FIRST_RETRY_S = 0.05
NOT_SERVED = frozenset({404, 405, 501})
"""What a server answers on a path it does not serve (a chat-only API at `/v1/completions`)."""
_EXCERPT_BYTES = 2048
"""How much of an engine's error answer is read: enough for its message, never a page of HTML."""
_ERROR_CHARS = 300


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


class ProbeFailed(Exception):
    """A step of a probe failed; the text says which request and what came back, as the admin is shown it."""


@dataclass
class _Track:
    failures: int = 0
    successes: int = 0
    due: float = 0.0
    chat_only: bool = False
    """Completions are not served here and a 1-token chat passed: probe with the chat from now on."""


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
                    await self._probe(replica, model, self._tracks.setdefault(row_id(replica.id), _Track()))
                except ProbeFailed as e:
                    return str(e)[:_ERROR_CHARS]
                except ValueError as e:  # an endpoint that does not parse
                    return f"{type(e).__name__}: {e}"[:_ERROR_CHARS]
                return None

        return await asyncio.gather(*(one(r, m) for r, m in replicas))

    async def _probe(self, replica: Replica, model: str, track: _Track) -> None:
        urls = engine_urls(replica.endpoint or "")
        call = _Call(self._upstream.session, aiohttp.ClientTimeout(total=self.policy.timeout_s))
        status, body = await call.send("GET", f"{urls.origin}/health")
        if status not in {200, 404}:  # 404: an OpenAI-compatible server without /health
            raise call.failed(status, body)
        if replica.status == S.READY:
            return
        sealed = replica.engine_key_sealed
        call.key = self._box.open(sealed) if sealed else None
        status, body = await call.send("GET", f"{urls.api_base}/models")
        if status != 200:
            raise call.failed(status, body)
        try:
            served = {str(m.get("id")) for m in msgspec.json.decode(body, type=_Models).data}
        except msgspec.DecodeError as e:
            raise ProbeFailed(f"{call.what} answered 200 with no model list: {e}") from e
        if model not in served:
            raise ProbeFailed(f"{call.what} does not list {model!r} (it lists {sorted(served)[:5]})")
        await self._generate(call, urls, model, track)

    async def _generate(self, call: _Call, urls: EngineUrls, model: str, track: _Track) -> None:
        """A 1-token completion, or a 1-token chat where completions are not served; remembers which works.

        Completions first: a base model without a chat template answers no chat, and vLLM serves completions
        for every model; the chat costs one more request only until it is known to be the one that works."""
        refused = ""
        if not track.chat_only:
            prompt = {"model": model, "prompt": "ping", "max_tokens": 1}
            status, body = await call.send("POST", f"{urls.api_base}/completions", prompt)
            if status == 200:
                return
            if status not in NOT_SERVED:
                raise call.failed(status, body)
            refused = f"{call.failed(status, body)}; "
        chat = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        status, body = await call.send("POST", f"{urls.api_base}/chat/completions", chat)
        if status == 200:
            track.chat_only = True
            return
        if status in NOT_SERVED:  # the chat is not served either: the next probe starts over
            track.chat_only = False
        raise ProbeFailed(f"{refused}{call.failed(status, body)}")

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
        noted = self._noted(replica, error)
        if error is not None and error != replica.probe_error:
            log.warning(
                "replica.probe_failed",
                replica_id=rid,
                status=status,
                error=error,
                failures=track.failures,
                ready_deadline=noted["ready_deadline"] and noted["ready_deadline"].isoformat(),
            )
        moved = await self._move(replica, error, track, noted)
        if not moved and (replica.probe_error, replica.ready_deadline) != (error, noted["ready_deadline"]):
            await self._store.note_probe(rid, status, **noted)
        return moved

    def _noted(self, replica: Replica, error: str | None) -> dict[str, Any]:
        """The replica's probe columns after this probe: the error, since when, and STARTING's deadline."""
        if error is None:
            return {"probe_error": None, "probe_error_since": None, "ready_deadline": None}
        same = error == replica.probe_error and replica.probe_error_since is not None
        grace = timedelta(seconds=self.policy.startup_grace_s)
        return {
            "probe_error": error,
            "probe_error_since": replica.probe_error_since if same else datetime.now(UTC),
            "ready_deadline": replica.status_changed_at + grace if replica.status == S.STARTING else None,
        }

    async def _move(self, replica: Replica, error: str | None, track: _Track, noted: Mapping[str, Any]) -> bool:
        """The move this probe's result calls for, if any, carrying the probe columns with it."""
        rid, status, p = row_id(replica.id), S(replica.status), self.policy
        if status is S.STARTING:
            if error is None:
                nxt = S.SECURING if replica.create_vm else S.READY
                return await self._store.move(
                    rid, status, nxt, "probe_passed", "health, models and generation ok", **noted
                )
            age = (datetime.now(UTC) - replica.status_changed_at).total_seconds()
            if age > p.startup_grace_s:
                return await self._store.move(
                    rid,
                    status,
                    S.TERMINATING,
                    "never_ready",
                    f"not ready after {age:.0f} s: {error}",
                    error_message=error,
                    **noted,
                )
            return False
        if status is S.READY and track.failures >= p.unhealthy_after:
            return await self._store.move(rid, status, S.UNHEALTHY, "probe_failed", error, **noted)
        if status is S.UNHEALTHY and track.successes >= p.healthy_after:
            return await self._store.move(rid, status, S.READY, "probe_passed", "recovered", **noted)
        return False


class _Call:
    """The requests of one probe: each one's status and body (the start of it, unless a 200), named for errors."""

    def __init__(self, session: aiohttp.ClientSession, timeout: aiohttp.ClientTimeout) -> None:
        self._session = session
        self._timeout = timeout
        self.key: str | None = None
        """The engine's key, sent once set, and never shown in an error."""
        self.what = ""
        """The latest request, as `GET /v1/models`."""

    async def send(self, method: str, url: str, body: object = None) -> tuple[int, bytes]:
        self.what = f"{method} {urlsplit(url).path}"
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        data = None if body is None else msgspec.json.encode(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(method, url, data=data, headers=headers, timeout=self._timeout) as r:
                return r.status, await (r.read() if r.status == 200 else r.content.read(_EXCERPT_BYTES))
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProbeFailed(f"{self.what}: {self._hidden(_described(e))}") from e

    def failed(self, status: int, body: bytes) -> ProbeFailed:
        """The latest request answered `status`: says so, with what the engine's answer says."""
        said = _message(body, self._hidden)
        return ProbeFailed(f"{self.what} answered {status}: {said}" if said else f"{self.what} answered {status}")

    def _hidden(self, text: str) -> str:
        return text.replace(self.key, "***") if self.key else text


def _described(e: BaseException) -> str:
    """A transport error as one line (a timeout's own text is empty)."""
    return f"{type(e).__name__}: {e}" if str(e) else f"{type(e).__name__} (no answer in time)"


def _message(body: bytes, hidden: Callable[[str], str]) -> str:
    """What an error answer says: OpenAI's and vLLM's `error.message`, `error`, `message` or `detail` when JSON,
    else its text; one line, short, with `hidden` applied before it is cut (so no part of a key is left)."""
    text = body.decode(errors="replace")
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        doc = None
    if isinstance(doc, dict):
        said = doc.get("error")
        if isinstance(said, dict):
            said = said.get("message")
        said = said or doc.get("message") or doc.get("detail")
        if isinstance(said, str):
            text = said
    printable = "".join(c if c.isprintable() else " " for c in text)  # NUL and controls: nothing a column refuses
    return hidden(" ".join(printable.split()))[:200]
