"""Moonshot's connector routes through the whole app: connectors, llm_endpoints added, listed with
their tokens masked, overwritten by name, deleted by id or name; the admin key on every route; every bad body a
422 naming its field; tokens sealed at rest and never answered."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from api.gateway.routes import match
from orchestrator.domain.errors import NotFound
from orchestrator.platform.outbound import OutboundPolicy
from orchestrator.runtime.container import Deps
from orchestrator.store.db import make_sessions
from orchestrator.store.external_endpoints import ExternalEndpointStore
from orchestrator.store.tables import ExternalEndpoint
from orchestrator.surfaces.moonshot.endpoints import EndpointSpec, ExternalEndpointService
from tests.support.settings import ADMIN_KEY

Client = httpx.AsyncClient

ENDPOINTS = "/v1/llm_endpoints"
MASK = "********"
TOKEN = "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"
NEW_TOKEN = "sk-second-token-0123456789"
ADDED = {"message": "Endpoint added successfully"}
DELETED = {"message": "Endpoint deleted successfully"}
CONNECTORS = [
    "hf-llama2-13b-gptq",
    "openai-gpt4",
    "claude2",
    "openai-gpt35",
    "openai-gpt35-turbo-16k",
    "hf-gpt2",
    "vllm",
    "openai-compatible",
]
NOT_ADMIN = {"error": "Invalid Admin API key."}
NOT_AN_OBJECT = {"error": ["body must be a JSON object"]}


def doc_example(**overrides: Any) -> dict[str, Any]:
    """The body of the seed's own example, at a host that resolves offline (a URI is resolved when saved; the seed's
    api.openai.com needs a DNS the tests do not have)."""
    body: dict[str, Any] = {
        "name": "openaigpt35TurboTest2",
        "connector_type": "openai-gpt35-turbo-16k",
        "uri": "https://localhost/v1/chat/completions",
        "token": TOKEN,
        "max_calls_per_second": 10,
        "max_concurrency": 1,
        "params": {"temperature": 4},
    }
    body.update(overrides)
    return body


async def add(client: Client, body: dict[str, Any]) -> None:
    r = await client.post(ENDPOINTS, json=body)
    assert (r.status_code, r.json()) == (200, ADDED), r.text


async def listed(client: Client) -> list[dict[str, Any]]:
    r = await client.get(ENDPOINTS)
    assert r.status_code == 200, r.text
    endpoints: list[dict[str, Any]] = r.json()
    return endpoints


async def stored(deps: Deps) -> list[ExternalEndpoint]:
    async with make_sessions(deps.engine)() as s:
        return list((await s.exec(select(ExternalEndpoint).order_by(col(ExternalEndpoint.id)))).all())


# -- the routes ------------------------------------------------------------------------------


async def test_connectors_are_moonshots_then_ours(client: Client) -> None:
    r = await client.get("/v1/connectors")
    assert (r.status_code, r.json()) == (200, CONNECTORS)


async def test_no_endpoints_list_empty(client: Client) -> None:
    assert await listed(client) == []


async def test_an_added_endpoint_is_listed_with_its_token_masked(client: Client) -> None:
    await add(client, doc_example())
    await add(client, doc_example(name="My EP_1", connector_type="vllm", uri="http://10.0.0.7:8000/v1", token=""))
    assert await listed(client) == [
        {
            "id": "my-ep-1",
            "connector_type": "vllm",
            "name": "My EP_1",
            "uri": "http://10.0.0.7:8000/v1",
            "token": "",  # none set
            "max_calls_per_second": 10,
            "max_concurrency": 1,
            "params": {"temperature": 4},
        },
        {
            "id": "openaigpt35turbotest2",
            "connector_type": "openai-gpt35-turbo-16k",
            "name": "openaigpt35TurboTest2",
            "uri": "https://localhost/v1/chat/completions",
            "token": MASK,
            "max_calls_per_second": 10,
            "max_concurrency": 1,
            "params": {"temperature": 4},
        },
    ]


@pytest.mark.parametrize(
    ("name", "expected_id"),
    [
        ("My EP_1", "my-ep-1"),
        ("  --Café  au lait!!", "cafe-au-lait"),
        ("a...b___c", "a-b-c"),
        ("UPPER", "upper"),
    ],
)
async def test_the_id_is_the_lower_case_slug_of_the_name(client: Client, name: str, expected_id: str) -> None:
    await add(client, doc_example(name=name, params=None))
    [endpoint] = await listed(client)
    assert (endpoint["id"], endpoint["name"], endpoint["params"]) == (expected_id, name, {})


async def test_the_same_name_again_overwrites(client: Client, deps: Deps) -> None:
    await add(client, doc_example(name="My EP_1"))
    await add(
        client,
        doc_example(
            name="my ep 1",  # the same slug
            connector_type="openai-compatible",
            uri="https://127.0.0.2/v1",
            token=NEW_TOKEN,
            max_calls_per_second=0,
            max_concurrency=0,
            params={"top_p": 0.5},
        ),
    )
    assert await listed(client) == [
        {
            "id": "my-ep-1",
            "connector_type": "openai-compatible",
            "name": "my ep 1",
            "uri": "https://127.0.0.2/v1",
            "token": MASK,
            "max_calls_per_second": 0,
            "max_concurrency": 0,
            "params": {"top_p": 0.5},
        }
    ]
    [row] = await stored(deps)
    assert deps.box.open(row.token_sealed) == NEW_TOKEN


async def test_the_mask_sent_back_keeps_the_token_for_the_same_host_only(client: Client, deps: Deps) -> None:
    await add(client, doc_example())
    # What a client read (the mask) sent back unchanged, with another setting changed: the token stays.
    await add(client, doc_example(token=MASK, max_concurrency=5, uri="https://LOCALHOST/v1"))
    [row] = await stored(deps)
    assert (row.max_concurrency, deps.box.open(row.token_sealed)) == (5, TOKEN)

    # Never to another host: that would send the token somewhere it was not meant for.
    r = await client.post(ENDPOINTS, json=doc_example(token=MASK, uri="https://127.0.0.3/v1"))
    assert (r.status_code, r.json()) == (
        422,
        {"error": ["token must be sent again (not its mask) when the uri's host changes"]},
    )
    # Nor for an endpoint that has no token stored.
    r = await client.post(ENDPOINTS, json=doc_example(name="fresh", token=MASK))
    assert (r.status_code, r.json()) == (
        422,
        {"error": [f"token {MASK} is the mask of a stored token: send the token itself"]},
    )
    [row] = await stored(deps)
    assert (row.uri, deps.box.open(row.token_sealed)) == ("https://LOCALHOST/v1", TOKEN)


@pytest.mark.parametrize("path_id", ["openaigpt35TurboTest2", "openaigpt35turbotest2", "OPENAIGPT35TURBOTEST2"])
async def test_delete_matches_the_id_whatever_its_case(client: Client, path_id: str) -> None:
    await add(client, doc_example())
    await add(client, doc_example(name="kept"))
    r = await client.delete(f"{ENDPOINTS}/{path_id}")
    assert (r.status_code, r.json()) == (200, DELETED)
    assert [e["id"] for e in await listed(client)] == ["kept"]


async def test_delete_by_a_name_with_spaces(client: Client) -> None:
    await add(client, doc_example(name="My EP_1"))
    r = await client.delete(f"{ENDPOINTS}/My%20EP_1")
    assert (r.status_code, r.json()) == (200, DELETED)
    assert await listed(client) == []


@pytest.mark.parametrize(
    ("path_id", "detail"),
    [
        ("nothing-here", "Failed to delete endpoint: no endpoint with id 'nothing-here'"),
        ("Nothing_Here", "Failed to delete endpoint: no endpoint with id 'nothing-here'"),
        ("%21%21", "Failed to delete endpoint: no endpoint with id '!!'"),
        ("x" * 300, f"Failed to delete endpoint: no endpoint with id '{'x' * 300}'"),
    ],
)
async def test_deleting_an_unknown_endpoint_is_404(client: Client, path_id: str, detail: str) -> None:
    await add(client, doc_example())
    r = await client.delete(f"{ENDPOINTS}/{path_id}")
    assert (r.status_code, r.json()) == (404, {"detail": detail})
    assert len(await listed(client)) == 1


async def test_deleting_twice_is_404_the_second_time(client: Client) -> None:
    await add(client, doc_example())
    assert (await client.delete(f"{ENDPOINTS}/openaigpt35turbotest2")).status_code == 200
    r = await client.delete(f"{ENDPOINTS}/openaigpt35TurboTest2")
    assert (r.status_code, r.json()) == (
        404,
        {"detail": "Failed to delete endpoint: no endpoint with id 'openaigpt35turbotest2'"},
    )


# -- authentication --------------------------------------------------------------------------


ROUTES = [
    ("GET", "/v1/connectors", None),
    ("GET", ENDPOINTS, None),
    ("POST", ENDPOINTS, doc_example(name="intruder")),
    ("DELETE", f"{ENDPOINTS}/openaigpt35turbotest2", None),
]


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", ADMIN_KEY], ids=["none", "wrong", "no-bearer"])
async def test_every_route_needs_the_admin_key(
    client: Client, anon_client: Client, route: tuple[str, str, dict[str, Any] | None], authorization: str | None
) -> None:
    """No header, a wrong key, or the right key without `Bearer`: 401 in the app's shape, nothing changed."""
    method, path, body = route
    await add(client, doc_example())
    headers = {} if authorization is None else {"Authorization": authorization}
    r = await anon_client.request(method, path, json=body, headers=headers)
    assert (r.status_code, r.json()) == (401, NOT_ADMIN)
    assert [e["id"] for e in await listed(client)] == ["openaigpt35turbotest2"]


# -- bad bodies ------------------------------------------------------------------------------

TYPES = ", ".join(CONNECTORS)
BAD_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("name-empty", {"name": ""}, "name: String should have at least 1 character"),
    ("name-too-long", {"name": "n" * 256}, "name: String should have at most 255 characters"),
    ("name-not-a-string", {"name": 7}, "name: Input should be a valid string"),
    ("name-no-slug", {"name": "!!! ---"}, "name must contain a letter or a digit (the endpoint's id is its slug)"),
    ("name-no-ascii", {"name": "日本語"}, "name must contain a letter or a digit (the endpoint's id is its slug)"),
    ("name-control", {"name": "a\nb"}, "name must not contain control characters"),
    ("name-nul", {"name": "a\u0000b"}, "name must not contain control characters"),
    ("connector-unknown", {"connector_type": "gpt-5"}, f"connector_type must be one of: {TYPES}"),
    ("connector-case", {"connector_type": "VLLM"}, f"connector_type must be one of: {TYPES}"),
    ("connector-empty", {"connector_type": ""}, "connector_type: String should have at least 1 character"),
    ("uri-ftp", {"uri": "ftp://files.example/x"}, "uri must be an http:// or https:// URL with a host"),
    ("uri-no-host", {"uri": "https://"}, "uri must be an http:// or https:// URL with a host"),
    ("uri-relative", {"uri": "/v1/chat/completions"}, "uri must be an http:// or https:// URL with a host"),
    ("uri-bad-port", {"uri": "http://h:99999/v1"}, "uri must be an http:// or https:// URL with a host"),
    ("uri-space", {"uri": "http://h/a b"}, "uri must be an http:// or https:// URL with a host"),
    ("uri-bad-ipv6", {"uri": "http://[::1/v1"}, "uri must be an http:// or https:// URL with a host"),
    ("uri-too-long", {"uri": "https://h/" + "a" * 2040}, "uri: String should have at most 2048 characters"),
    ("token-too-long", {"token": "t" * 4097}, "token: String should have at most 4096 characters"),
    ("token-space", {"token": "sk abc"}, "token must be printable ASCII without spaces"),
    ("token-non-ascii", {"token": "sk-é"}, "token must be printable ASCII without spaces"),
    ("token-newline", {"token": "sk-a\r\nX-Injected: 1"}, "token must be printable ASCII without spaces"),
    ("token-null", {"token": None}, "token: Input should be a valid string"),
    ("rps-negative", {"max_calls_per_second": -1}, "max_calls_per_second: Input should be greater than or equal to 0"),
    (
        "rps-too-big",
        {"max_calls_per_second": 100_001},
        "max_calls_per_second: Input should be less than or equal to 100000",
    ),
    ("rps-huge", {"max_calls_per_second": 2**70}, "max_calls_per_second: Input should be less than or equal to 100000"),
    ("rps-bool", {"max_calls_per_second": True}, "max_calls_per_second: Input should be a whole number"),
    ("rps-string", {"max_calls_per_second": "10"}, "max_calls_per_second: Input should be a whole number"),
    ("rps-float", {"max_calls_per_second": 10.0}, "max_calls_per_second: Input should be a whole number"),
    ("concurrency-negative", {"max_concurrency": -5}, "max_concurrency: Input should be greater than or equal to 0"),
    ("concurrency-fraction", {"max_concurrency": 1.5}, "max_concurrency: Input should be a whole number"),
    ("params-list", {"params": [1, 2]}, "params: Input should be a valid dictionary"),
    ("params-string", {"params": '{"temperature": 1}'}, "params: Input should be a valid dictionary"),
    ("params-stream", {"params": {"stream": True}}, "params must not set stream: the request itself does"),
    (
        "params-request-keys",
        {"params": {"stream": True, "messages": [], "prompt": "p", "top_p": 1}},
        "params must not set messages, prompt, stream: the request itself does",
    ),
    ("params-too-big", {"params": {"stop": ["x" * 17_000]}}, "params must be at most 16384 characters of JSON"),
]


@pytest.mark.parametrize(("case", "override", "message"), BAD_FIELDS, ids=[c for c, _, _ in BAD_FIELDS])
async def test_a_bad_field_is_a_422_naming_it(
    client: Client, deps: Deps, case: str, override: dict[str, Any], message: str
) -> None:
    r = await client.post(ENDPOINTS, json=doc_example(**override))
    assert (r.status_code, r.json()) == (422, {"error": [message]}), case
    assert await listed(client) == []
    assert await stored(deps) == []


async def test_every_missing_field_is_named_at_once(client: Client) -> None:
    r = await client.post(ENDPOINTS, json={"params": {}})
    assert r.status_code == 422
    assert r.json() == {
        "error": [
            "name is required",
            "connector_type is required",
            "uri is required",
            "token is required",
            "max_calls_per_second is required",
            "max_concurrency is required",
        ]
    }


async def test_several_bad_fields_are_all_named(client: Client) -> None:
    r = await client.post(ENDPOINTS, json=doc_example(name="", max_concurrency=-1, params=[]))
    assert (r.status_code, r.json()) == (
        422,
        {
            "error": [
                "name: String should have at least 1 character",
                "max_concurrency: Input should be greater than or equal to 0",
                "params: Input should be a valid dictionary",
            ]
        },
    )


@pytest.mark.parametrize("content", [b"[]", b'"endpoint"', b"null", b"42", b""], ids=repr)
async def test_a_body_that_is_not_an_object_is_a_422(client: Client, content: bytes) -> None:
    r = await client.post(ENDPOINTS, content=content, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (422, NOT_AN_OBJECT)


async def test_a_body_that_is_not_json_is_a_400(client: Client) -> None:
    r = await client.post(ENDPOINTS, content=b"{name: 'x'", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    [message] = r.json()["error"]
    assert message.startswith("body: JSON is malformed")


async def test_a_body_that_is_not_utf8_is_a_400(client: Client) -> None:
    body = b'{"name": "\xff\xfe", "uri": "http://h"}'
    r = await client.post(ENDPOINTS, content=body, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == (400, {"error": ["body: not UTF-8 JSON"]})


async def test_unknown_fields_are_ignored(client: Client) -> None:
    await add(client, doc_example(id="chosen-id", extra={"a": 1}))
    assert [e["id"] for e in await listed(client)] == ["openaigpt35turbotest2"]


# -- secrets ---------------------------------------------------------------------------------


async def test_the_token_is_sealed_at_rest_and_never_answered(client: Client, deps: Deps) -> None:
    answers = [await client.post(ENDPOINTS, json=doc_example())]
    answers.append(await client.post(ENDPOINTS, json=doc_example(max_concurrency=2)))
    answers.append(await client.get(ENDPOINTS))
    answers.append(await client.get("/v1/connectors"))
    answers.append(await client.get("/api/v1/tables/llm_endpoint"))
    answers.append(await client.get("/schema/openapi.json"))
    answers.append(await client.delete(f"{ENDPOINTS}/nothing"))
    answers.append(await client.delete(f"{ENDPOINTS}/openaigpt35turbotest2"))
    assert [r.status_code for r in answers] == [200, 200, 200, 200, 200, 200, 404, 200]
    [row] = answers[4].json()["data"]
    assert row["token_sealed"] == "<redacted>"
    for r in answers:
        assert TOKEN not in r.text

    await add(client, doc_example())
    [row] = await stored(deps)
    for column, value in row.model_dump().items():
        assert TOKEN not in str(value), column
    assert row.token_sealed
    assert deps.box.open(row.token_sealed) == TOKEN


async def test_an_endpoint_without_a_token_stores_none(client: Client, deps: Deps) -> None:
    await add(client, doc_example(token=""))
    [row] = await stored(deps)
    assert row.token_sealed == ""


# -- below the routes ------------------------------------------------------------------------


def test_the_paths_reach_the_admin_app_not_the_gateway() -> None:
    for path in ("/v1/connectors", ENDPOINTS, f"{ENDPOINTS}/my-ep-1", f"{ENDPOINTS}/completions"):
        assert match(path) is None, path


async def test_every_change_calls_on_change(deps: Deps) -> None:
    """on_change (the catalog's reload in the app) runs after each add, overwrite and delete, and only then."""
    calls: list[str] = []

    async def on_change() -> None:
        calls.append("reload")

    outbound = OutboundPolicy.from_settings(deps.settings)
    service = ExternalEndpointService(
        ExternalEndpointStore(make_sessions(deps.engine)), deps.box, on_change=on_change, outbound=outbound
    )
    spec = EndpointSpec(
        name="Ext 1",
        connector_type="openai-compatible",
        uri="https://localhost/v1",
        token=TOKEN,
        max_calls_per_second=1,
        max_concurrency=1,
        params={},
    )
    assert await service.save(spec) == "ext-1"
    assert await service.save(spec) == "ext-1"
    assert len(calls) == 2
    await service.delete("EXT 1")
    assert len(calls) == 3
    with pytest.raises(NotFound):
        await service.delete("ext-1")
    assert len(calls) == 3
    assert await service.endpoints() == []
