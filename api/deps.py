"""What a route is handed: each of the runtime's services as a Litestar named dependency (`models`, `replicas`,
`accounts`, ...), taken from the container in the app's state, so a route names only the services it uses. Guards
get no dependencies (only the connection): `server_keys` and `gateway_of` are what they read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide

from orchestrator.gateway.flow import Gateway
from orchestrator.platform.state_dir import ServerKeys
from orchestrator.runtime.container import Deps

CONTAINER = "deps"
"""The app state's key of the runtime's container."""


def app_state(deps: Deps) -> dict[str, Any]:
    """The app's state: the container the dependencies below are taken from."""
    return {CONTAINER: deps}


def _container(state: State) -> Deps:
    deps: Deps = state[CONTAINER]
    return deps


def _service(pick: Callable[[Deps], Any]) -> Provide:
    def provide(state: State) -> Any:
        return pick(_container(state))

    return Provide(provide, sync_to_thread=False)


SERVICES = {
    "models": _service(lambda d: d.models),
    "replicas": _service(lambda d: d.replicas),
    "deployments": _service(lambda d: d.deployments),
    "api_keys": _service(lambda d: d.api_keys),
    "tables": _service(lambda d: d.tables),
    "accounts": _service(lambda d: d.accounts),
    "call_records": _service(lambda d: d.call_records),
    "bots": _service(lambda d: d.bots),
    "feishu_receiver": _service(lambda d: d.feishu_receiver),
    "endpoints": _service(lambda d: d.external_endpoints),
    "tasks": _service(lambda d: d.tasks),
    "gateway": _service(lambda d: d.gateway),
    "token_counter": _service(lambda d: d.token_counter),
    "metrics": _service(lambda d: d.metrics),
    "hosts": _service(lambda d: d.hosts),
}
"""Every service a route may name, by the name it takes it as; a route is given only those it names."""


def server_keys(connection: ASGIConnection[Any, Any, Any, Any]) -> ServerKeys:
    """The server's own keys (the admin key), for a guard."""
    return _container(connection.app.state).keys


def gateway_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Gateway:
    """The gateway (which authenticates keys), for a guard."""
    return _container(connection.app.state).gateway
