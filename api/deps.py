"""The dependency every route takes: the runtime's `Deps`, from the app's state."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from orchestrator.runtime.container import Deps


def _deps(state: State) -> Deps:
    deps: Deps = state.deps
    return deps


DEPS = {"deps": Provide(_deps, sync_to_thread=False)}
