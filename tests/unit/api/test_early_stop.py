"""A stop held while the app is built: sent again, once, to whoever handles it at the release."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from api.early_stop import EarlyStop


@pytest.fixture
def handlers() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def _recorder(got: list[str], name: str) -> signal.Handlers | object:
    def handler(signum: int, _frame: FrameType | None) -> None:
        got.append(f"{name}:{signal.Signals(signum).name}")

    return handler


def test_a_stop_during_the_hold_goes_to_the_handler_installed_since(handlers: None) -> None:
    got: list[str] = []
    signal.signal(signal.SIGTERM, _recorder(got, "inherited"))  # type: ignore[arg-type]
    interrupt = signal.getsignal(signal.SIGINT)  # Python's, or ignored (a run in the background)
    early = EarlyStop()
    early.hold()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert got == []  # kept, not handled by the inherited handler
    signal.signal(signal.SIGTERM, _recorder(got, "server"))  # type: ignore[arg-type]  # the server's, installed since
    early.release()
    assert got == ["server:SIGTERM"]  # the first one kept, once
    assert not early.held
    assert signal.getsignal(signal.SIGINT) == interrupt  # where nobody took over: as before


def test_with_nothing_held_the_release_sends_nothing_and_restores_the_handler(handlers: None) -> None:
    got: list[str] = []
    server = _recorder(got, "server")
    signal.signal(signal.SIGTERM, server)  # type: ignore[arg-type]  # a server that installed its own first
    early = EarlyStop()
    early.hold()
    early.release()
    assert got == []
    assert signal.getsignal(signal.SIGTERM) is server
    os.kill(os.getpid(), signal.SIGTERM)
    assert got == ["server:SIGTERM"]
