"""LlmEndpoint's durable queue: `POST /api/v1/qcompletions` queues a completion (admitted at once, as the sync route
admits it) and `GET /api/v1/qcompletions/{task_id}` tells the key that queued it how it went.

A task's answer is `{"success": true, "status", "result", "created_at", "completed_at"}`: `result` is the engine's
text once `completed` (null before), times are ISO-8601 UTC (`completed_at` null until the task is done), and a
`failed` task also carries `"error"`: LlmEndpoint's message for why (its `result` stays null). Refusals are
LlmEndpoint's `{"success": false, "message"}`, with the same keys and words as `/api/v1/completions`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from litestar.params import FromPath
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from api.deps import SERVICES
from api.llmendpoint.completions import authenticate, failure, refused
from orchestrator.domain.errors import Unavailable
from orchestrator.gateway.catalog import KeyInfo
from orchestrator.gateway.flow import Gateway
from orchestrator.store.tables import CompletionTask
from orchestrator.surfaces.llmendpoint.completions import LlmEndpointError
from orchestrator.surfaces.llmendpoint.tasks import TaskRunner

QUEUED = "Request queued successfully"


class QueuedOut(msgspec.Struct):
    success: bool
    task_id: str
    message: str


class TaskOut(msgspec.Struct, omit_defaults=True):
    success: bool
    status: str
    """queued | processing | completed | failed"""
    result: str | None
    """The engine's text, once completed."""
    created_at: datetime
    completed_at: datetime | None
    error: str | None = None
    """Why a failed task failed (absent otherwise)."""


class FailureOut(msgspec.Struct, omit_defaults=True):
    success: bool
    message: str
    detail: str | None = None


def _refusals(**statuses: str) -> dict[int, ResponseSpec]:
    return {int(code[1:]): ResponseSpec(FailureOut, description=text) for code, text in statuses.items()}


_AUTH = {"s401": "No key, not a valid key, or not from an address the key allows"}


def _key(request: Request[Any, Any, Any], gateway: Gateway) -> KeyInfo:
    return authenticate(gateway, request.scope)


@post(
    "/",
    status_code=HTTP_200_OK,
    responses=_refusals(
        s400="Not a valid request, no pricing for the model, or no host",
        s402="Insufficient credits",
        s403="The admin key, or a model the key may not call",
        s429="The key's rate limit",
        **_AUTH,
    ),
)
async def submit(
    request: Request[Any, Any, Any], gateway: NamedDependency[Gateway], tasks: NamedDependency[TaskRunner]
) -> QueuedOut:
    """Queue a completion (the body of `/api/v1/completions`; `stream` is ignored)."""
    key = _key(request, gateway)  # before the body is read: no key, no work
    task_id = await tasks.submit(key, await request.body())
    return QueuedOut(success=True, task_id=task_id, message=QUEUED)


@get("/{task_id:str}", responses=_refusals(s403="Another key's task", s404="Task not found", **_AUTH))
async def look_up(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    tasks: NamedDependency[TaskRunner],
    task_id: FromPath[str],
) -> TaskOut:
    return _out(await tasks.task_of(_key(request, gateway), task_id))


def _out(task: CompletionTask) -> TaskOut:
    return TaskOut(
        success=True,
        status=task.status,
        result=task.result,
        created_at=task.created_at,
        completed_at=task.completed_at,
        error=task.error,
    )


def _on_refusal(_: Request[Any, Any, Any], exc: LlmEndpointError) -> Response[bytes]:
    return refused(exc).response()


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """Litestar's own refusals past routing (a body over the limit: 413) in the same envelope."""
    return failure(exc.status_code, str(exc.detail)).response()


def _on_unavailable(_: Request[Any, Any, Any], exc: Unavailable) -> Response[bytes]:
    response = failure(HTTP_503_SERVICE_UNAVAILABLE, str(exc)).response()
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def qcompletions_router() -> Router:
    """No admin guard: every call is authenticated by its client key, as LlmEndpoint's completions are."""
    return Router(
        path="/api/v1/qcompletions",
        route_handlers=[submit, look_up],
        dependencies=SERVICES,
        tags=["llmendpoint"],
        exception_handlers={LlmEndpointError: _on_refusal, HTTPException: _on_http, Unavailable: _on_unavailable},
    )
