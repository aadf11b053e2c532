"""Bad input on the toolkit API: every case a 4xx in the toolkit's shapes, never a 500 or a traceback."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.toolkit import Client, create_model, vm_details


async def _post_replica(client: Client, body: Any) -> tuple[int, Any]:
    model_id = await create_model(client)
    r = await client.post(f"/api/v1/models/{model_id}/replicas", json=body)
    return r.status_code, r.json()


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"endpoint": ["LLM EndPoint URL must not be empty."]}),
        ({"endpoint": ""}, {"endpoint": ["LLM EndPoint URL must not be empty."]}),
        ({"endpoint": None, "create_vm": False}, {"endpoint": ["LLM EndPoint URL must not be empty."]}),
        ({"endpoint": "not a url"}, {"endpoint": ["Not a valid URL (http:// or https://)."]}),
        ({"endpoint": "ftp://x/v1"}, {"endpoint": ["Not a valid URL (http:// or https://)."]}),
        ({"endpoint": 5}, {"endpoint": ["Not a valid string."]}),
        ({"endpoint": "http://x:1", "rate_limit": "fast"}, {"rate_limit": ["Not a valid integer."]}),
        ({"endpoint": "http://x:1", "rate_limit": 0}, {"rate_limit": ["Input should be greater than or equal to 1"]}),
        ({"endpoint": "http://x:1", "colour": "red"}, {"colour": ["Unknown field."]}),
        ({"create_vm": True}, {"_schema": ["VM creation details must be provided when create_vm is True."]}),
        ({"create_vm": "maybe"}, {"create_vm": ["Not a valid boolean."]}),
        (
            {"create_vm": True, "endpoint": "http://x:1", "vm_creation_details": vm_details()},
            {"endpoint": ["A replica with create_vm gets its endpoint from its VM; leave it empty."]},
        ),
        (
            {"create_vm": True, "vm_creation_details": vm_details(name=" lead")},
            {
                "vm_creation_details": {
                    "name": [
                        "Invalid name format. Name must not start or end with a space "
                        "and can contain alphanumeric characters, spaces, and hyphens."
                    ]
                }
            },
        ),
        (
            {"create_vm": True, "vm_creation_details": vm_details(port=70000)},
            {"vm_creation_details": {"port": ["Input should be less than or equal to 65535"]}},
        ),
        (
            {"create_vm": True, "vm_creation_details": {"name": "vm"}},
            {
                "vm_creation_details": {
                    field: ["Missing data for required field."]
                    # run_command is not required here: without it, the engine spec (or its defaults) says what runs
                    for field in ("environment_name", "image_name", "flavor_name", "key_name", "port")
                }
            },
        ),
        (
            {"create_vm": True, "vm_creation_details": vm_details(engine={"model": "meta-llama/Llama-3.1-8B"})},
            {"vm_creation_details": {"engine": ["Give run_command or engine, not both."]}},
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(
                    run_command=None,
                    engine={
                        "secret_env": {"VLLM_API_KEY": "x"},
                        "extra_args": ["--port", "9000"],
                        "image": "Bad Image",
                    },
                ),
            },
            {
                "vm_creation_details": {
                    "engine": [
                        "image 'Bad Image' is not an image reference (name[:tag][@sha256:digest]); "
                        "VLLM_API_KEY is set by the orchestrator (the engine key); --port is set by the orchestrator"
                    ]
                }
            },
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(run_command=None, engine={"gpu_memory_utilization": 1.5}),
            },
            {
                "vm_creation_details": {
                    "engine": {"gpu_memory_utilization": ["Input should be less than or equal to 1"]}
                }
            },
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(
                    security_rules=[{"direction": "sideways", "port_range_min": 1, "port_range_max": 2}]
                ),
            },
            {"vm_creation_details": {"security_rules": {"0": {"direction": ["Must be one of: ingress, egress."]}}}},
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(security_rules=[{"port_range_min": 9000, "port_range_max": 8000}]),
            },
            {
                "vm_creation_details": {
                    "security_rules": {
                        "0": {"port_range_min": ["port_range_min must be less than or equal to port_range_max."]}
                    }
                }
            },
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(security_rules=[{"port_range_min": -1, "port_range_max": 70000}]),
            },
            {
                "vm_creation_details": {
                    "security_rules": {
                        "0": {
                            "port_range_min": ["Input should be greater than or equal to 1"],
                            "port_range_max": ["Input should be less than or equal to 65535"],
                        }
                    }
                }
            },
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(
                    security_rules=[{"remote_ip_prefix": "300.1.1.1/8", "port_range_min": 1, "port_range_max": 1}]
                ),
            },
            {
                "vm_creation_details": {
                    "security_rules": {"0": {"remote_ip_prefix": ["Not a valid IP network (CIDR)."]}}
                }
            },
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(
                    security_rules=[
                        {
                            "ethertype": "IPv6",
                            "remote_ip_prefix": "10.0.0.0/8",
                            "port_range_min": 1,
                            "port_range_max": 1,
                        }
                    ]
                ),
            },
            {
                "vm_creation_details": {
                    "security_rules": {"0": {"remote_ip_prefix": ["An IPv6 rule needs an IPv6 prefix."]}}
                }
            },
        ),
        (
            {
                "create_vm": True,
                "vm_creation_details": vm_details(
                    security_rules=[
                        {
                            "ethertype": "IPv6",
                            "remote_ip_prefix": "fe80::1%eth0/128",
                            "port_range_min": 9400,
                            "port_range_max": 9400,
                        }
                    ]
                ),
            },
            {
                "vm_creation_details": {
                    "security_rules": {
                        "0": {
                            "remote_ip_prefix": [
                                "An IPv6 scope id (%...) names a local interface; a rule's prefix cannot carry one."
                            ]
                        }
                    }
                }
            },
        ),
        (
            # The sandbox's SSH port (ORCH_SANDBOX_SSH_PORT), opened to everyone in two halves.
            {
                "create_vm": True,
                "vm_creation_details": vm_details(
                    security_rules=[
                        {"remote_ip_prefix": "0.0.0.0/1", "port_range_min": 2200, "port_range_max": 2300},
                        {"remote_ip_prefix": "128.0.0.0/1", "port_range_min": 2222, "port_range_max": 2222},
                    ]
                ),
            },
            {
                "vm_creation_details": {
                    "security_rules": [
                        "SSH (port 2222) would be open to 0.0.0.0/0 by security_rules[0], security_rules[1]; "
                        "only the orchestrator (127.0.0.2/32) may reach it."
                    ]
                }
            },
        ),
        (
            {"create_vm": True, "vm_creation_details": vm_details(port=2222)},
            {"vm_creation_details": {"port": ["Port 2222 is SSH's on this backend."]}},
        ),
        ([], {"_schema": ["Invalid input type."]}),
        ("endpoint", {"_schema": ["Invalid input type."]}),
    ],
)
async def test_replica_body_rules(client: Client, body: Any, errors: dict[str, Any]) -> None:
    assert await _post_replica(client, body) == (400, {"errors": errors})


@pytest.mark.parametrize(
    ("path", "body", "errors"),
    [
        ("/api/v1/models", {}, {"name": ["Missing data for required field."]}),
        ("/api/v1/models", {"name": ""}, {"name": ["Shorter than minimum length 1."]}),
        ("/api/v1/models", {"name": " padded "}, {"name": ["Model name must not start or end with whitespace."]}),
        ("/api/v1/models", {"name": "x" * 256}, {"name": ["Longer than maximum length 255."]}),
        ("/api/v1/models", {"name": ["a"]}, {"name": ["Not a valid string."]}),
        ("/api/v1/models", {"name": None}, {"name": ["Field may not be null."]}),
        ("/api/v1/generate_api_key", {"user_id": 7}, {"user_id": ["Not a valid string."]}),
        ("/api/v1/generate_api_key", {"user_id": "u", "allowed_rpm": "x"}, {"allowed_rpm": ["Not a valid integer."]}),
        (
            "/api/v1/generate_api_key",
            {"user_id": "u", "allowed_rpm": 0},
            {"allowed_rpm": ["Input should be greater than or equal to 1"]},
        ),
        ("/api/v1/delete_api_key", {"user_id": "u"}, {"api_key_id": ["Missing data for required field."]}),
        ("/api/v1/delete_api_key", {"user_id": "u", "api_key_id": "one"}, {"api_key_id": ["Not a valid integer."]}),
    ],
)
async def test_body_rules(client: Client, path: str, body: Any, errors: dict[str, Any]) -> None:
    r = await client.post(path, json=body)
    assert (r.status_code, r.json()) == (400, {"errors": errors})


async def test_update_replica_body_rules(client: Client) -> None:
    r = await client.put("/api/v1/models/replicas/1", json={})
    assert (r.status_code, r.json()) == (400, {"errors": {"rate_limit": ["Missing data for required field."]}})


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"name": "x",}', b"\xff\xfe", b"", b'{"name": "\\ud800"}'])
async def test_malformed_json_is_400_schema_error(client: Client, raw: bytes) -> None:
    r = await client.post("/api/v1/models", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    body = r.json()
    assert list(body) == ["errors"]
    assert list(body["errors"]) == ["_schema"] or "name" in body["errors"]
    assert "Traceback" not in r.text


async def test_body_of_several_megabytes_is_413(client: Client) -> None:
    big = b'{"name": "' + b"x" * 5_000_000 + b'"}'
    r = await client.post("/api/v1/models", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"error": "Request Entity Too Large"}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/models/abc"),
        ("GET", "/api/v1/models/abc/replicas"),
        ("POST", "/api/v1/models/1.5/replicas"),
        ("PUT", "/api/v1/models/replicas/x"),
        ("GET", "/api/v1/replicas/-"),
        ("DELETE", "/api/v1/replicas/1e3"),
        ("GET", "/api/v1/nowhere"),
    ],
)
async def test_non_integer_ids_and_unknown_routes_are_404(client: Client, method: str, path: str) -> None:
    r = await client.request(method, path, json={"rate_limit": 1, "endpoint": "http://x:1"})
    assert r.status_code == 404
    assert "error" in r.json()


async def test_wrong_method_is_405(client: Client) -> None:
    r = await client.patch("/api/v1/models")
    assert (r.status_code, r.json()) == (405, {"error": "Method Not Allowed"})


@pytest.mark.parametrize("row_id", [0, -1, 2**31, 2**63 - 1, 10**30])
async def test_out_of_range_ids_are_400_not_500(client: Client, row_id: int) -> None:
    for method, path, body, param in (
        ("GET", f"/api/v1/replicas/{row_id}", None, "replica_id"),
        ("DELETE", f"/api/v1/models/{row_id}", None, "model_id"),
        ("PUT", f"/api/v1/models/replicas/{row_id}", {"rate_limit": 1}, "replica_id"),
        ("POST", "/api/v1/delete_api_key", {"user_id": "u", "api_key_id": row_id}, "api_key_id"),
    ):
        r = await client.request(method, path, json=body)
        assert r.status_code == 400, (method, path, r.text)
        assert list(r.json()["errors"]) == [param]


async def test_largest_id_is_a_plain_404(client: Client) -> None:
    r = await client.get(f"/api/v1/replicas/{2**31 - 1}")
    assert (r.status_code, r.json()) == (404, {"error": "Replica not found"})
