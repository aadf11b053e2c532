"""Small request builders shared by the toolkit API tests."""

from __future__ import annotations

from typing import Any

import httpx

Client = httpx.AsyncClient


def vm_details(**overrides: Any) -> dict[str, Any]:
    details: dict[str, Any] = {
        "name": "llama-vm-1",
        "environment_name": "default-CANADA-1",
        "image_name": "Ubuntu Server 22.04 LTS R535 CUDA 12.2",
        "flavor_name": "n3-A100x1",
        "key_name": "ops",
        "port": 8000,
        "run_command": "vllm serve meta-llama/Llama-3.1-8B-Instruct",
        "security_rules": [
            {
                "direction": "ingress",
                "protocol": "tcp",
                "ethertype": "IPv4",
                "remote_ip_prefix": "203.0.113.7/32",  # a metrics scraper: the engine port is the gateway's alone
                "port_range_min": 9400,
                "port_range_max": 9400,
            },
        ],
    }
    details.update(overrides)
    return details


async def create_model(client: Client, name: str = "llama") -> int:
    r = await client.post("/api/v1/models", json={"name": name})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


async def create_replica(client: Client, model_id: int, **body: Any) -> int:
    r = await client.post(f"/api/v1/models/{model_id}/replicas", json=body)
    assert r.status_code == 201, r.text
    return int(r.json()["replica_id"])
