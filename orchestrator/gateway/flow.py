"""The gateway's domain flow: authenticate a key, admit it under its limits, resolve the model it may call,
open a call to a replica with failover, and account for the call (fee and record). Everything here is
served from memory.

    GatewayError
    ├── Unauthorized     no key, an unknown key, or a disabled one
    │   └── IpRefused    a key used from outside its IP allowlist
    ├── RateLimited      the key's requests-per-minute are used up
    ├── PaymentRequired  a metered key has spent its month's quota and its balance
    ├── UnknownModel     no live model of that name
    ├── Forbidden        the key is not bound to the model (directly or through its group)
    ├── NoReplica        the model has no READY replica with room
    ├── UpstreamFailed   every replica tried refused the connection
    └── QueueTimeout     (orchestrator.gateway.priority) waited too long in the model's priority queue
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog

from orchestrator.billing.records import CallKind, CallRecord, CallRecords, prompt_texts
from orchestrator.domain import money
from orchestrator.gateway.catalog import SERVER_ADMIN, Catalog, KeyInfo, ModelInfo, Target
from orchestrator.gateway.http1 import Answer
from orchestrator.gateway.limits import RpmLimiter
from orchestrator.gateway.tokens import encoding
from orchestrator.gateway.upstream import ConnectFailed, Redirected, Upstream
from orchestrator.platform.secrets import hash_api_key, same_secret

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3


class GatewayError(Exception):
    pass


class Unauthorized(GatewayError):
    pass


class IpRefused(Unauthorized):
    def __init__(self) -> None:
        super().__init__("Unauthorized IP address")


class RateLimited(GatewayError):
    def __init__(self, allowed_rpm: int) -> None:
        super().__init__(f"Rate limit exceeded: allowed {allowed_rpm} requests per minute.")
        self.allowed_rpm = allowed_rpm


class PaymentRequired(GatewayError):
    def __init__(self) -> None:
        super().__init__("Please recharge.")


class UnknownModel(GatewayError):
    def __init__(self, model: str, *, connector: bool = False) -> None:
        super().__init__(model)
        self.model = model
        self.connector = connector
        """Asked with a connector key: answered with the connector's message."""


class Forbidden(GatewayError):
    def __init__(self, model: str) -> None:
        super().__init__(f"You do not have permission to access the [{model}] model, please contact the administrator.")


class NoReplica(GatewayError):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class UpstreamFailed(GatewayError):
    pass


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class UsageDoc(msgspec.Struct):
    """What the gateway reads of an answer or a stream event: its usage, if any, and whether it has choices."""

    usage: Usage | None = None  # msgspec decodes straight into the dataclass
    choices: list[object] = []


USAGE_DECODER = msgspec.json.Decoder(UsageDoc)


def usage_of(payload: bytes) -> Usage | None:
    try:
        return USAGE_DECODER.decode(payload).usage
    except msgspec.DecodeError:
        return None


@dataclass(slots=True, frozen=True)
class Hold:
    """A call admitted under its key's spend: its worst case held until it ends (`Gateway.hold`)."""

    key_id: int | None
    """None: the server's admin key."""
    amount: int


@dataclass(slots=True)
class Call:
    target: Target
    response: Answer
    started: float
    hold: Hold | None = None
    """Its key's hold, ended by `finish`."""


@dataclass(slots=True)
class Outcome:
    """How a relayed call ended (filled in as the relay goes, so a relay cut short leaves what it relayed)."""

    status: int
    usage: Usage | None = None
    answer: bytes | list[bytes] = b""
    """What the client got: the whole body, or the stream's events."""
    first_byte: float | None = None
    """perf_counter() when the first byte of the answer went to the client."""


class Gateway:
    def __init__(
        self,
        catalog: Catalog,
        upstream: Upstream,
        records: CallRecords,
        *,
        secret_key: str,
        admin_key: str,
        on_unreachable: Callable[[int], None],
        on_released: Callable[[str], None] | None = None,
        hold_tokens: int = 4096,
        limiter: RpmLimiter | None = None,
    ) -> None:
        self.catalog = catalog
        self._upstream = upstream
        self._records = records
        self._secret = secret_key
        self._admin_key = admin_key
        self._on_unreachable = on_unreachable
        self.hold_tokens = hold_tokens
        """The completion tokens held for a call that names no max_tokens (the engine's context bounds it; the
        request is not changed, since a max_tokens the model's context cannot take would be refused)."""
        self._limiter = limiter or RpmLimiter()
        """Each key's requests-per-minute window: this process's, or every instance's (SharedRpmLimiter)."""
        self._calls_of: Counter[int] = Counter()
        """Calls in flight per key (admitted and not yet accounted for)."""
        self.on_released = on_released
        """Told the model of every call that gave its replica's slot back (the priority queue lets the next one in)."""

    def authenticate(self, raw_key: str | None, client: str | None) -> KeyInfo:
        """The key's record, if it is a key, enabled, and used from an address its allowlist has (`client`)."""
        if not raw_key:
            raise Unauthorized("missing API key")
        key = self.catalog.keys.get(hash_api_key(self._secret, raw_key))
        if key is None:
            if same_secret(raw_key, self._admin_key):
                return SERVER_ADMIN
            raise Unauthorized("invalid API key")
        if not key.enabled:
            raise Unauthorized("invalid API key")
        if key.allowed_ips and not key.allows(client):
            raise IpRefused
        return key

    async def admit(self, key: KeyInfo, *, spend: bool = True) -> None:
        """The key's rate limit, then (`spend`) its quota and balance: refused before anything is sent upstream."""
        if key is SERVER_ADMIN:
            return
        if not await self._limiter.allow_async(key.id, key.allowed_rpm):
            raise RateLimited(key.allowed_rpm)
        if spend and not self.catalog.ledger.may_spend(key.id, money.month_of()):
            raise PaymentRequired

    async def hold(
        self,
        key: KeyInfo,
        model: ModelInfo,
        *,
        prompt_bound: int,
        max_tokens: int | None,
        outputs: int = 1,
        media: int = 0,
    ) -> Hold:
        """Admit a call under the key's spend: its worst case is held until the call's `finish` (given to `open`;
        `let_go` for a call never opened), or PaymentRequired when it does not fit. Every call holds, so that the
        key's calls in flight are known (`busy`).

        The worst case, at the model's prices: `prompt_bound` prompt tokens plus `hold_tokens` for each of `media`
        parts (an image's tokens are not bounded by its bytes), and `outputs` times `max_tokens` (or `hold_tokens`
        when it names none) completion tokens."""
        if key is SERVER_ADMIN:
            return Hold(None, 0)
        prompt = prompt_bound + media * self.hold_tokens
        completion = (self.hold_tokens if max_tokens is None else max_tokens) * outputs
        worst = money.fee(prompt, completion, model.price_in, model.price_out)
        held = await self.catalog.ledger.reserve_async(key.id, worst, money.month_of())
        if held is None:
            raise PaymentRequired
        self._calls_of[key.id] += 1
        return Hold(key.id, held)

    def let_go(self, hold: Hold) -> None:
        """End a hold (the call ended, or never opened)."""
        if hold.key_id is None:
            return
        self.catalog.ledger.unreserve(hold.key_id, hold.amount)
        left = self._calls_of[hold.key_id] - 1
        if left > 0:
            self._calls_of[hold.key_id] = left
        else:
            del self._calls_of[hold.key_id]

    def busy(self, key_id: int) -> bool:
        """Whether a call of the key is in flight here (its record not yet made)."""
        return key_id in self._calls_of

    def resolve(self, key: KeyInfo, name: str, *, fallback: bool = True) -> ModelInfo:
        """The model a call goes to. A connector key falls back to a model named "default", as the connector does
        (on its own surfaces: `fallback`)."""
        models = self.catalog.models
        model = models.get(name)
        if model is None and key.connector and fallback:
            model = models.get("default")
        if model is None:
            raise UnknownModel(name, connector=key.connector)
        if key.models is not None and model.id not in key.models:
            raise Forbidden(model.name)
        return model

    def visible_models(self, key: KeyInfo) -> list[ModelInfo]:
        """What `/v1/models` lists for the key: its bound models, or every live model."""
        models = sorted(self.catalog.models.values(), key=lambda m: m.name)
        return models if key.models is None else [m for m in models if m.id in key.models]

    async def open(
        self,
        model: str,
        path: str,
        body: bytes,
        *,
        hold: Hold | None = None,
        on_picked: Callable[[], None] | None = None,
    ) -> Call:
        """Send `body` to `path` under a READY replica's API root (or an endpoint's, once its gate lets the call
        through); another replica on a failed connection. The call carries `hold` (its key's, from `hold`) to
        `finish`; a call that does not open lets go of it here. `on_picked` is called once, when the first replica
        is picked (it then counts the call in flight) or when none is."""
        try:
            call = await self._open(model, path, body, on_picked)
        except BaseException:
            if hold is not None:
                self.let_go(hold)
            raise
        call.hold = hold
        return call

    async def _open(self, model: str, path: str, body: bytes, on_picked: Callable[[], None] | None) -> Call:
        tried: set[Target] = set()
        failure = f"no replica of {model} could be reached"  # what the client is told: never an address of ours
        for _ in range(MAX_ATTEMPTS):
            target = self.catalog.pick(model, tried)
            if on_picked is not None:
                on_picked()
                on_picked = None
            if target is None:
                break
            started = time.perf_counter()
            try:
                response = await self._send(target, model, path, body)
            except ConnectFailed as e:
                tried.add(target)
                failure = self._failed(target, model, e) or failure
                continue
            return Call(target, response, started)
        if tried:
            raise UpstreamFailed(failure)
        self.catalog.unserved(model)
        raise NoReplica(model)

    async def _send(self, target: Target, model: str, path: str, body: bytes) -> Answer:
        """The call to one target (once its gate lets it through); its slot is given back if it does not open."""
        if target.gate is not None:
            try:
                await target.gate.enter()
            except BaseException:  # cancelled while waiting
                self.catalog.release(target)
                raise
        pending = _Pending()
        target.answers.add(pending)
        try:
            response = await self._upstream.post(target.api_base + path, _for(target, body), target.headers)
        except asyncio.CancelledError:
            self._release(target)
            if not pending.cut:
                raise
            pending.uncancel()
            raise UpstreamFailed(f"the replica of {model} was taken out of service before it answered") from None
        except BaseException:  # refused, broken, or cancelled while connecting
            self._release(target)
            raise
        finally:
            target.answers.discard(pending)
        target.answers.add(response)
        return response

    def _failed(self, target: Target, model: str, e: ConnectFailed) -> str | None:
        """Note a target that could not be reached; what to tell the client instead of "could not be reached"."""
        log.warning(
            "gateway.connect_failed",
            replica_id=target.replica_id,
            endpoint=target.endpoint_id,
            refused=e.refused,
            error=str(e),
        )
        if e.refused:
            self.catalog.eject(target)
            if target.replica_id is not None:
                self._on_unreachable(target.replica_id)
        if isinstance(e, Redirected):
            return f"a replica of {model} answered with a redirect, which is never followed"
        return None

    def _release(self, target: Target) -> None:
        self.catalog.release(target)
        if target.gate is not None:
            target.gate.leave()
        if self.on_released is not None:
            self.on_released(target.model)

    def finish(  # noqa: PLR0917  (one call site, in the order the call happened)
        self,
        call: Call,
        key: KeyInfo,
        model: ModelInfo,
        kind: CallKind,
        request: bytes,
        outcome: Outcome,
        *,
        stream: bool,
        session: str | None,
        credits: int | None = None,
    ) -> asyncio.Future[None] | None:
        """Give the replica's slot back, end the call's hold, charge the key and record the call. Called once per
        opened call; the future (None without a journal) is done once the call's record is on disk: await it before
        the answer completes.

        `credits`: the call is paid in LlmEndpoint credits, this many units off the key's balance (already
        reserved in the ledger by the caller), instead of by its tokens at the model's prices."""
        call.target.answers.discard(call.response)
        self._release(call.target)
        call.response.release()
        if call.hold is not None:
            self.let_go(call.hold)
        u = outcome.usage or Usage()
        on_balance = credits is not None
        fee = (
            credits
            if credits is not None
            else money.fee(u.prompt_tokens, u.completion_tokens, model.price_in, model.price_out)
        )
        client = None if key is SERVER_ADMIN else key.id
        if client is not None and not on_balance:  # credits were reserved by the caller before the call
            self.catalog.ledger.charge(client, fee)
        now = time.perf_counter()
        return self._records.add(
            CallRecord(
                key_id=client,
                model=model.name,
                kind=kind,
                request=request,
                answer=outcome.answer,
                stream=stream,
                session=session,
                created=time.time(),
                duration=now - call.started,
                first_byte=None if outcome.first_byte is None else outcome.first_byte - call.started,
                replica_id=call.target.replica_id,
                status=outcome.status,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
                price_in=model.price_in,
                price_out=model.price_out,
                fee=fee,
                on_balance=on_balance,
            )
        )


async def counted_prompt(kind: CallKind, request: bytes) -> int:
    """The prompt tokens of a call whose engine never reported its usage (the client left, or the engine broke off),
    counted by cl100k_base off the event loop: with `relayed_tokens`, what a stream cut short is charged."""
    return await asyncio.to_thread(_prompt_tokens, kind, request)


def _prompt_tokens(kind: CallKind, request: bytes) -> int:
    whole, _ = prompt_texts(kind, request)
    return len(encoding().encode_ordinary(whole)) if whole else 0


class _Pending:
    """A call waiting for its replica's answer to begin: cutting it (a drain that timed out) cancels the wait, which
    `Gateway.open` turns into an upstream failure."""

    __slots__ = ("_task", "cut")

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self.cut = False

    def close(self) -> None:
        if self._task is not None:
            self.cut = True
            self._task.cancel()

    def uncancel(self) -> None:
        if self._task is not None:
            self._task.uncancel()


def _for(target: Target, body: bytes) -> bytes:
    """The body as the target gets it: an endpoint's params merged in as defaults, its `model` replacing ours."""
    if not target.params:
        return body
    doc = msgspec.json.decode(body)
    for name, value in target.params.items():
        if name == "model" or name not in doc:
            doc[name] = value
    return msgspec.json.encode(doc)
