"""The loop guard's chain: what an instance refuses, and what it sends on while serving a request."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.gateway.hops import MAX_HOPS, Hops, LoopDetected

A, B, C = "a" * 16, "b" * 16, "c" * 16


def test_an_instance_sends_its_own_id_outside_any_request() -> None:
    assert Hops(A).outgoing() == A
    assert len(Hops().instance) == 16
    assert Hops().instance != Hops().instance  # made at start: each instance (and each restart) its own


def test_a_request_that_came_back_is_refused() -> None:
    with pytest.raises(LoopDetected, match="came back"):
        Hops(A).chain(f"{B}, {A}".encode())
    with pytest.raises(LoopDetected, match="came back"):
        Hops(A).chain(A.upper().encode())


def test_a_chain_too_long_is_a_loop_between_other_instances() -> None:
    long_chain = ",".join(f"{i:016x}" for i in range(MAX_HOPS)).encode()
    with pytest.raises(LoopDetected, match=f"through {MAX_HOPS} gateways"):
        Hops(A).chain(long_chain)


def test_what_is_not_an_id_is_dropped_not_sent_on() -> None:
    assert Hops(A).chain(f"{B},evil\r\nx: y,{'d' * 17}, {C} ".encode()) == (B, C)
    assert Hops(A).chain(None) == ()
    assert Hops(A).chain(b"") == ()


async def test_a_request_served_sends_its_chain_on_and_only_its_own() -> None:
    hops = Hops(A)

    async def serve(chain: tuple[str, ...]) -> str:
        token = hops.serving(chain)
        try:
            await asyncio.sleep(0)  # another request is served meanwhile
            return hops.outgoing()
        finally:
            hops.served(token)

    assert await asyncio.gather(serve((B,)), serve((C, B)), serve(())) == [f"{B},{A}", f"{C},{B},{A}", A]
    assert hops.outgoing() == A
