"""The loop guard: every request this instance sends upstream names it (and the instances the call came through), so
a call that comes back to an instance, directly or around a ring of them, is refused before it goes out again.

An endpoint may point, through a proxy or a load balancer that no URL check can see through, at a gateway: this one
(each call would call itself until something times out) or another instance whose endpoint points back here.
"""

from __future__ import annotations

import contextvars
import re
import secrets

HEADER = "x-orchestrator-hop"
"""Sent on every request to an engine, an llm_endpoint or a probe: the ids of the instances the call went through,
comma-separated, this instance's last."""
MAX_HOPS = 8
"""Longer chains are refused as loops too: a real chain of gateways is a few long."""
_ID = re.compile(r"[0-9a-f]{16}")

# The chain of the request being served, set by the api for the request's duration (it is per task: every request
# is served in its own task); empty outside a request (the prober, the task queue's workers).
_incoming: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("incoming_hops", default=())


class LoopDetected(Exception):
    pass


class Hops:
    def __init__(self, instance: str | None = None) -> None:
        self.instance = instance or secrets.token_hex(8)
        """Made at start: a restarted instance is a new one (no call of the old one is still in flight)."""

    def chain(self, header: bytes | None) -> tuple[str, ...]:
        """The instances an incoming request came through (ids of ours only: anything else in the header is
        dropped rather than sent on); raises LoopDetected when this instance is one of them."""
        if not header:
            return ()
        ids = tuple(p for p in (s.strip() for s in header.decode("latin-1").lower().split(",")) if _ID.fullmatch(p))
        if self.instance in ids:
            raise LoopDetected("Loop detected: this request came back to the gateway that sent it.")
        if len(ids) >= MAX_HOPS:
            raise LoopDetected(f"Loop detected: this request went through {len(ids)} gateways.")
        return ids

    def serving(self, chain: tuple[str, ...]) -> contextvars.Token[tuple[str, ...]]:
        """Mark the current task as serving a request that came through `chain`; give the token to `served`."""
        return _incoming.set(chain)

    def served(self, token: contextvars.Token[tuple[str, ...]]) -> None:
        _incoming.reset(token)

    def outgoing(self) -> str:
        """The header value of a request sent now."""
        chain = _incoming.get()
        return ",".join((*chain, self.instance)) if chain else self.instance
