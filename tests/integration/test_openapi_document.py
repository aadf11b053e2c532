"""The OpenAPI document at /schema names every route the server answers: the Litestar routes, and the ones served as
raw ASGI in front of Litestar (the gateway's route table, LlmEndpoint's completions), each with its body, its keys
and its answers; what it says of an answer is what the route answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from litestar.routes import HTTPRoute

from api.app import create_admin_app
from api.gateway import routes as gateway_routes
from api.llmendpoint.completions import COMPLETIONS_PATH
from orchestrator.runtime.compose import Runtime
from tests.support.fuzz import resolve

JSON = "application/json"


@pytest.fixture
async def document(anon_client: httpx.AsyncClient) -> dict[str, Any]:
    r = await anon_client.get("/schema/openapi.json")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def raw_operations() -> list[tuple[str, str]]:
    """(method, path) of every route the gateway's table and LlmEndpoint's completions serve, as OpenAPI paths."""
    ops = [("get" if route.kind is None else "post", path) for path, route in gateway_routes.EXACT_ROUTES.items()]
    for prefix in gateway_routes.MODEL_PREFIXES:
        ops += [("post", f"{prefix}{{model}}{tail}") for tail, _ in gateway_routes.MODEL_TAILS]
    return [*ops, ("post", COMPLETIONS_PATH)]


def litestar_operations(runtime: Runtime) -> list[tuple[str, str]]:
    app = create_admin_app(runtime)
    return [
        (method.lower(), route.path_format or "/")
        for route in app.routes
        if isinstance(route, HTTPRoute)
        for handler in route.route_handlers
        if handler.resolve_include_in_schema()
        for method in handler.http_methods
        if method not in {"HEAD", "OPTIONS"}
    ]


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = doc["paths"][path][method]
    return op


def schema_of(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = resolve(node, doc.get("components", {}).get("schemas", {}))
    return resolved


async def test_every_route_the_server_answers_is_in_the_document(
    document: dict[str, Any], anon_client: httpx.AsyncClient, runtime: Runtime
) -> None:
    expected = raw_operations() + litestar_operations(runtime)
    assert len(expected) > 60
    missing = [(m, p) for m, p in expected if m not in document["paths"].get(p, {})]
    assert not missing, missing
    r = await anon_client.get("/schema/openapi.yaml")
    assert r.status_code == 200
    assert yaml.safe_load(r.text)["paths"].keys() == document["paths"].keys()


def test_every_raw_path_of_the_document_is_served_by_its_route() -> None:
    """A path in the document is one the route table answers, for the kind of call documented (no invented path)."""
    for method, path in raw_operations():
        if path == COMPLETIONS_PATH:
            continue
        route = gateway_routes.match(path.replace("{model}", "meta-llama/Llama-3.1-8B"))
        assert route is not None, path
        assert (route.kind is None) == (method == "get"), path


async def test_the_chat_routes_document_their_body_keys_and_answers(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    for method, path in raw_operations():
        op = operation(document, method, path)
        assert op["security"], path
        assert all(set(requirement) <= set(schemes) for requirement in op["security"]), path
        assert "401" in op["responses"], path
        assert "200" in op["responses"], path
    assert {"type": "http", "scheme": "bearer"}.items() <= next(iter(schemes.values())).items()
    assert any(s.get("in") == "header" and s.get("name") == "x-api-key" for s in schemes.values())

    chat = operation(document, "post", "/v1/chat/completions")
    body = schema_of(document, chat["requestBody"]["content"][JSON]["schema"])
    assert {"model", "messages", "stream", "stream_options", "temperature", "max_tokens", "tools"} <= set(
        body["properties"]
    )
    assert "raw_stream_response" not in body["properties"]
    assert {JSON, "text/event-stream"} <= set(chat["responses"]["200"]["content"])
    assert {"400", "401", "402", "403", "413", "429", "502", "503"} <= set(chat["responses"])

    toolkit = operation(document, "post", "/api/v1/chat/completions")
    body = schema_of(document, toolkit["requestBody"]["content"][JSON]["schema"])
    assert body["properties"]["raw_stream_response"]["type"] == "boolean"
    assert body["properties"]["messages"]["items"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert {JSON, "text/event-stream"} <= set(toolkit["responses"]["200"]["content"])
    example = toolkit["responses"]["400"]["content"][JSON]["examples"]
    assert any(e["value"].get("errors", {}).get("messages") for e in example.values()), example

    queued = operation(document, "post", "/queue/chat/completions")
    body = schema_of(document, queued["requestBody"]["content"][JSON]["schema"])
    assert {"priority", "timeout"} <= set(body["properties"])
    assert "408" in queued["responses"]

    engines = operation(document, "post", "/engines/{model}/completions")
    assert [p["name"] for p in engines["parameters"] if p["in"] == "path"] == ["model"]
    body = schema_of(document, engines["requestBody"]["content"][JSON]["schema"])
    assert "prompt" in body["properties"]

    models = operation(document, "get", "/v1/models")
    listed = schema_of(document, models["responses"]["200"]["content"][JSON]["schema"])
    assert listed["properties"]["data"]["type"] == "array"


def _validate(document: dict[str, Any], op: dict[str, Any], r: httpx.Response) -> None:
    answer = op["responses"].get(str(r.status_code))
    assert answer is not None, (r.status_code, r.text)
    schema = schema_of(document, answer["content"][JSON]["schema"])
    jsonschema.validate(r.json(), schema)


async def test_each_raw_route_answers_as_documented(
    document: dict[str, Any], client: httpx.AsyncClient, anon_client: httpx.AsyncClient
) -> None:
    """Without a key, with a bad one, and with a good key and a bad body: each answer's status is documented, and
    its body is in the documented shape (the OpenAI envelope, the toolkit's, LlmEndpoint's)."""
    r = await client.post("/api/v1/generate_api_key", json={"user_id": "doc"})
    key = r.json()["api_key"]
    for method, path in raw_operations():
        op = operation(document, method, path)
        concrete = path.replace("{model}", "nothing-here")
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": key}):
            r = await anon_client.request(method, concrete, headers=headers, content=b'{"model": 1}')
            _validate(document, op, r)
        if method == "get":
            assert r.status_code == 200
        else:
            assert r.status_code in {400, 404}, (path, r.text)


def test_the_documented_bodies_name_what_the_gateway_reads() -> None:
    """The gateway reads a few fields of a body (api/gateway/bodies.py) and leaves the values to the engine: each is
    documented, with the type the gateway insists on for `model` and `stream`, and no role is refused."""
    from api.gateway import bodies
    from api.openapi.components import schemas

    documented = schemas()
    chat, completion = documented["ChatCompletionRequest"], documented["CompletionRequest"]
    read = set(bodies._Body.__struct_fields__)
    assert read <= set(chat["properties"]) | set(completion["properties"])
    for request in (chat, completion):
        assert request["properties"]["model"]["type"] == "string"
        assert request["properties"]["stream"]["type"] == "boolean"
        assert request["additionalProperties"] is True
    assert documented["ChatRequestMessage"]["properties"]["role"]["type"] == "string"


def test_the_toolkit_roles_documented_are_the_ones_it_takes() -> None:
    from api.gateway.toolkit_schema import Invalid, load_chat
    from api.openapi.components import TOOLKIT_ROLES

    for role in [*TOOLKIT_ROLES, "tool", "developer"]:
        body = {"model": "m", "messages": [{"role": role, "content": "x"}]}
        try:
            load_chat(body)
        except Invalid:
            assert role not in TOOLKIT_ROLES
        else:
            assert role in TOOLKIT_ROLES


def test_the_toolkit_body_is_documented_field_for_field() -> None:
    """The toolkit's route refuses a field it does not know: the document names exactly the fields it checks, and
    says that no other is taken."""
    from api.gateway import toolkit_schema
    from api.openapi.components import schemas

    documented = schemas()
    request, message = documented["ToolkitChatCompletionRequest"], documented["ToolkitChatRequestMessage"]
    assert set(request["properties"]) == set(toolkit_schema.CHAT_REQUEST.fields)
    assert set(message["properties"]) == set(toolkit_schema._MESSAGE.fields)
    for schema, checked in ((request, toolkit_schema.CHAT_REQUEST), (message, toolkit_schema._MESSAGE)):
        assert schema["additionalProperties"] is False
        assert set(schema["required"]) == {name for name, field in checked.fields.items() if field.required}


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


async def test_no_schema_contradicts_its_type(document: dict[str, Any]) -> None:
    """A map's constraints once came out as an array's (`type: array`, `maxLength`, a default of {}): each keyword
    fits the schema's type, and a default is of that type."""
    by_type = {"array": {"maxLength", "minLength", "maxProperties"}, "object": {"maxLength", "maxItems"}}
    python_type = {"array": list, "object": dict, "string": str}
    for node in _nodes(document["components"]["schemas"]):
        kind = node.get("type")
        if not isinstance(kind, str):
            continue
        assert not by_type.get(kind, set()) & set(node), node
        if "default" in node and kind in python_type:
            assert isinstance(node["default"], python_type[kind]), node
    env = document["components"]["schemas"]["EngineSpecIn"]["properties"]["env"]
    assert (env["type"], env["additionalProperties"]) == ("object", {"type": "string"})
