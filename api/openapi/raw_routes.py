"""The paths of the routes served as raw ASGI in front of Litestar (api/app.py `create_app`), for the document: every
path of the gateway's route table and LlmEndpoint's completions, each with its body, its keys and its answers.

The paths come from the route table itself (a route added to it is documented with no change here), and each error
answer from the envelope functions that write it: its status, its headers and an example are theirs.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec

from api.gateway import routes as gateway
from api.gateway.bodies import BadBody
from api.gateway.envelopes import Answer, TooLarge, openai_error, toolkit_error
from api.gateway.routes import MAX_BODY, MAX_SESSION_ID, Route
from api.llmendpoint.completions import COMPLETIONS_PATH, STATUS
from api.openapi.components import GATEWAY_SECURITY, Schema, ref
from orchestrator.gateway.flow import (
    Forbidden,
    IpRefused,
    NoReplica,
    PaymentRequired,
    RateLimited,
    Unauthorized,
    UnknownModel,
    UpstreamFailed,
)
from orchestrator.gateway.hops import LoopDetected
from orchestrator.gateway.priority import QueueTimeout

JSON = "application/json"
MODEL_IN_PATH = "{model}"

# Each refusal of a gateway call, with what it means; the envelope of the route gives its status and body.
_REFUSALS: list[tuple[Exception, str]] = [
    (Unauthorized(), "No key, or not a valid one"),
    (IpRefused(), "The key does not allow the caller's address"),
    (
        BadBody(
            "Must be one of: system, user, assistant.",
            "messages.0.role",
            errors={"messages": {"0": {"role": ["Must be one of: system, user, assistant."]}}},
        ),
        "The body is not a valid request",
    ),
    (UnknownModel("no-such-model"), "No such model, or none this key may list"),
    (PaymentRequired(), "The key's balance or month's quota is spent"),
    (Forbidden("llama-3.1-8b"), "The key may not call this model"),
    (RateLimited(60), "The key's requests per minute are spent"),
    (TooLarge(f"Request body larger than {MAX_BODY} bytes."), f"A body over {MAX_BODY} bytes"),
    (NoReplica("llama-3.1-8b"), "No replica of the model is ready"),
    (UpstreamFailed("The replica did not answer."), "The replica failed before answering"),
]
_QUEUED = (QueueTimeout("llama-3.1-8b", 30), "The call waited in the model's queue past its `timeout`")
_LOOP = (LoopDetected("This request already went through this server."), "The request came back to this server")
_AUTH_ONLY = {Unauthorized, IpRefused}


def raw_paths() -> dict[str, dict[str, Schema]]:
    """Path -> path item, for every path the raw routes answer."""
    paths: dict[str, dict[str, Schema]] = {}
    for path, route in gateway.EXACT_ROUTES.items():
        paths[path] = _gateway_item(path, route)
    for prefix in gateway.MODEL_PREFIXES:
        for tail, kind in gateway.MODEL_TAILS:
            path = f"{prefix}{MODEL_IN_PATH}{tail}"
            paths[path] = _gateway_item(path, Route(kind, path_model=MODEL_IN_PATH))
    paths[COMPLETIONS_PATH] = {"post": _llmendpoint_operation()}
    return paths


def _operation_id(method: str, path: str) -> str:
    words = "".join(c if c.isalnum() else " " for c in path).split()
    return "".join(word.capitalize() for word in [method, *words])


def _gateway_item(path: str, route: Route) -> dict[str, Schema]:
    if route.kind is None:
        op: Schema = {
            "summary": "The models the key may call",
            "responses": {"200": _json("The models", ref("ModelList")), **_errors(route, models=True)},
        }
        return {"get": _common("get", path, op)}
    chat = route.kind == "chat"
    if route.toolkit:
        body = "ToolkitChatCompletionRequest"
    elif route.queued:
        body = "QueuedChatCompletionRequest"
    else:
        body = ("ChatCompletionRequest" if chat else "CompletionRequest") + ("ModelInPath" if route.path_model else "")
    parameters = [_SESSION_ID]
    if route.path_model:
        parameters.insert(0, _PATH_MODEL)
    stream = (
        "server-sent events, or JSON lines (`raw_stream_response`), of the chunks with choices"
        if route.toolkit
        else "server-sent events (`data: {chunk}`, then `data: [DONE]`), the usage chunk last when"
        " `stream_options.include_usage` asks for it"
    )
    ok: Schema = {
        "description": f"The answer; with `stream`, {stream}",
        "content": {
            JSON: {"schema": ref("ChatCompletion" if chat else "Completion")},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    if route.queued:
        ok["headers"] = {"x-litellm-priority": {"description": "The call's priority", "schema": {"type": "integer"}}}
    op = {
        "summary": _summary(route),
        "parameters": parameters,
        "requestBody": {"required": True, "content": {JSON: {"schema": ref(body)}}},
        "responses": {"200": ok, **_errors(route)},
    }
    return {"post": _common("post", path, op)}


def _summary(route: Route) -> str:
    what = "A chat completion" if route.kind == "chat" else "A completion"
    if route.toolkit:
        return f"{what}, the Hyperstack toolkit's way (its fields, its error envelope, its stream shapes)"
    if route.queued:
        return f"{what}, after its turn in the model's priority queue"
    if route.path_model:
        return f"{what} of the model named in the path (it wins over the body's `model`)"
    return what


def _common(method: str, path: str, op: dict[str, Any]) -> dict[str, Any]:
    return {"tags": ["gateway"], "operationId": _operation_id(method, path), "security": GATEWAY_SECURITY, **op}


_PATH_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_SESSION_ID = {
    "name": "Session-Id",
    "in": "header",
    "required": False,
    "description": "The conversation the call belongs to (the connector records its calls by session).",
    "schema": {"type": "string", "maxLength": MAX_SESSION_ID},
}


def _errors(route: Route, *, models: bool = False) -> dict[str, Schema]:
    """Each status the route refuses with, from the route's envelope; several refusals may share one."""
    refusals = [(e, why) for e, why in _REFUSALS if not models or type(e) in _AUTH_ONLY]
    if route.queued:
        refusals.append(_QUEUED)
    envelope, component = (toolkit_error, "ToolkitErrorEnvelope") if route.toolkit else (openai_error, None)
    answers = [(envelope(e), why, component or "OpenAIErrorEnvelope") for e, why in refusals]
    answers.append((openai_error(_LOOP[0]), _LOOP[1], "OpenAIErrorEnvelope"))  # the loop guard's, on every path
    return _by_status(answers)


def _by_status(answers: list[tuple[Answer, str, str]]) -> dict[str, Schema]:
    grouped: dict[int, list[tuple[Answer, str, str]]] = defaultdict(list)
    for answer in answers:
        grouped[answer[0].status].append(answer)
    responses: dict[str, Schema] = {}
    for status, group in sorted(grouped.items()):
        components = sorted({component for _, _, component in group})
        schema = ref(components[0]) if len(components) == 1 else {"anyOf": [ref(c) for c in components]}
        examples = {
            f"e{i}": {"summary": why, "value": msgspec.json.decode(a.body)} for i, (a, why, _) in enumerate(group)
        }
        response: Schema = {
            "description": "; ".join(dict.fromkeys(why for _, why, _ in group)),
            "content": {JSON: {"schema": schema, "examples": examples}},
        }
        headers = {name.decode().title(): value.decode() for a, _, _ in group for name, value in a.headers}
        if headers:
            response["headers"] = {
                name: {"description": f"e.g. {value}", "schema": {"type": "string"}} for name, value in headers.items()
            }
        responses[str(status)] = response
    return responses


def _json(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _llmendpoint_operation() -> dict[str, Any]:
    statuses = sorted({*STATUS.values(), 413})
    failure_schema = {JSON: {"schema": ref("LlmEndpointFailure")}}
    refusals = {str(s): {"description": "LlmEndpoint's refusal", "content": failure_schema} for s in statuses}
    loop = openai_error(_LOOP[0])
    refusals[str(loop.status)] = _json(_LOOP[1], ref("OpenAIErrorEnvelope"))
    ok: Schema = {
        "description": "The answer's text; with `stream`, one `{role, content}` JSON document per line",
        "content": {
            JSON: {"schema": ref("LlmEndpointAnswer")},
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }
    return {
        "tags": ["llmendpoint"],
        "summary": "LlmEndpoint's completion, priced in credits off the key's balance",
        "operationId": _operation_id("post", COMPLETIONS_PATH),
        "security": GATEWAY_SECURITY,
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("LlmEndpointRequest")}}},
        "responses": {"200": ok, **refusals},
    }
