"""The toolkit's models and replicas routes, through the ASGI app, on SQLite and PostgreSQL."""

from __future__ import annotations

from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.reconcile import reconcile
from orchestrator.runtime.container import Deps
from tests.support.toolkit import Client, create_model, create_replica, vm_details

TOOLKIT_REPLICA_FIELDS = {
    "id",
    "model_id",
    "endpoint",
    "rate_limit",
    "flavor_name",
    "vm_status",
    "name",
    "environment_name",
    "image_name",
    "assign_floating_ip",
    "run_command",
    "key_name",
    "vm_id",
    "error_message",
}


async def test_create_list_get_model(client: Client) -> None:
    r = await client.post("/api/v1/models", json={"name": "llama"})
    assert r.status_code == 201
    assert r.json() == {"model_name": "llama", "id": r.json()["id"]}
    model_id = r.json()["id"]
    await create_model(client, "mistral")

    r = await client.get("/api/v1/models")
    assert r.status_code == 200
    assert r.json() == [{"id": model_id, "name": "llama"}, {"id": model_id + 1, "name": "mistral"}]

    r = await client.get("/api/v1/models/llama")
    assert (r.status_code, r.json()) == (200, {"id": model_id, "name": "llama"})


async def test_duplicate_model_is_400_with_toolkit_message(client: Client) -> None:
    await create_model(client, "llama")
    r = await client.post("/api/v1/models", json={"name": "llama"})
    assert (r.status_code, r.json()) == (400, {"message": "Model already exists."})


async def test_unknown_model_name_is_404(client: Client) -> None:
    r = await client.get("/api/v1/models/nope")
    assert (r.status_code, r.json()) == (404, {"error": "Model not found"})


async def test_active_filter_lists_models_with_a_ready_replica(client: Client, deps: Deps) -> None:
    llama = await create_model(client, "llama")
    await create_model(client, "idle")
    replica_id = await create_replica(client, llama, endpoint="http://127.0.0.1:95/v1/chat/completions")
    assert (await client.get("/api/v1/models?active=1")).json() == []

    await reconcile(deps.store)  # PENDING -> STARTING
    await deps.store.move(replica_id, ReplicaStatus.STARTING, ReplicaStatus.READY, "probe_ok")

    assert (await client.get("/api/v1/models?active=1")).json() == [{"id": llama, "name": "llama"}]
    assert len((await client.get("/api/v1/models")).json()) == 2
    replicas = (await client.get(f"/api/v1/models/{llama}/replicas")).json()
    assert replicas[0]["vm_status"] == "SUCCESS"


async def test_external_replica_listing_has_toolkit_fields(client: Client) -> None:
    model_id = await create_model(client)
    endpoint = "http://127.0.0.1:95/v1/chat/completions"
    replica_id = await create_replica(client, model_id, endpoint=endpoint, rate_limit=5)

    r = await client.get(f"/api/v1/models/{model_id}/replicas")
    assert r.status_code == 200
    [replica] = r.json()
    assert set(replica) >= TOOLKIT_REPLICA_FIELDS
    assert replica["id"] == replica_id
    assert replica["endpoint"] == endpoint
    assert replica["rate_limit"] == 5
    assert replica["vm_status"] == "PENDING"
    assert replica["status"] == "PENDING"
    assert replica["create_vm"] is False


async def test_managed_replica_keeps_vm_details_and_rules(client: Client) -> None:
    model_id = await create_model(client)
    replica_id = await create_replica(client, model_id, create_vm=True, vm_creation_details=vm_details())

    [replica] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()
    assert replica["name"] == "llama-vm-1"
    assert replica["flavor_name"] == "n3-A100x1"
    assert replica["assign_floating_ip"] is True
    assert replica["endpoint"] is None

    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert detail["port"] == 8000
    assert [(r["remote_ip_prefix"], r["port_range_min"], r["origin"]) for r in detail["security_rules"]] == [
        ("203.0.113.7/32", 9400, "user")
    ]


async def test_duplicate_endpoint_for_the_model_is_400(client: Client) -> None:
    model_id = await create_model(client)
    endpoint = "http://127.0.0.1:95/v1/chat/completions"
    await create_replica(client, model_id, endpoint=endpoint)
    r = await client.post(f"/api/v1/models/{model_id}/replicas", json={"endpoint": endpoint})
    assert (r.status_code, r.json()) == (400, {"error": "Endpoint already exists"})
    other = await create_model(client, "other")
    await create_replica(client, other, endpoint=endpoint)  # the same URL serves another model


async def test_endpoint_is_free_again_once_its_replica_is_deleted(client: Client) -> None:
    model_id = await create_model(client)
    endpoint = "http://127.0.0.1:95/v1"
    replica_id = await create_replica(client, model_id, endpoint=endpoint)
    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 204
    await create_replica(client, model_id, endpoint=endpoint)


async def test_replica_for_unknown_model_is_404(client: Client) -> None:
    r = await client.post("/api/v1/models/999/replicas", json={"endpoint": "http://127.0.0.1:1/v1"})
    assert (r.status_code, r.json()) == (404, {"error": "Model not found"})
    r = await client.get("/api/v1/models/999/replicas")
    assert (r.status_code, r.json()) == (404, {"error": "Model not found"})


async def test_update_replica_rate_limit(client: Client) -> None:
    model_id = await create_model(client)
    replica_id = await create_replica(client, model_id, endpoint="http://127.0.0.1:1/v1")
    r = await client.put(f"/api/v1/models/replicas/{replica_id}", json={"rate_limit": 42})
    assert (r.status_code, r.content) == (204, b"")
    [replica] = (await client.get(f"/api/v1/models/{model_id}/replicas")).json()
    assert replica["rate_limit"] == 42

    r = await client.put("/api/v1/models/replicas/999", json={"rate_limit": 42})
    assert (r.status_code, r.json()) == (404, {"error": "Replica not found"})


async def test_delete_replica_drains_then_terminates_and_keeps_the_timeline(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    replica_id = await create_replica(client, model_id, endpoint="http://127.0.0.1:1/v1")
    await reconcile(deps.store)

    r = await client.delete(f"/api/v1/replicas/{replica_id}")
    assert (r.status_code, r.content) == (204, b"")
    assert (await client.get(f"/api/v1/models/{model_id}/replicas")).json() == []
    assert (await client.delete(f"/api/v1/replicas/{replica_id}")).status_code == 404

    await reconcile(deps.store)
    await reconcile(deps.store)
    detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
    assert detail["status"] == "TERMINATED"
    assert detail["deleted"] is True
    assert detail["termination_reason"] == "deleted"
    assert [(e["from_status"], e["to_status"]) for e in detail["events"]] == [
        (None, "PENDING"),
        ("PENDING", "STARTING"),
        ("STARTING", "DRAINING"),
        ("DRAINING", "TERMINATING"),
        ("TERMINATING", "TERMINATED"),
    ]


async def test_delete_model_takes_its_replicas_and_rules_down(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    external = await create_replica(client, model_id, endpoint="http://127.0.0.1:1/v1")
    managed = await create_replica(client, model_id, create_vm=True, vm_creation_details=vm_details())

    r = await client.delete(f"/api/v1/models/{model_id}")
    assert (r.status_code, r.content) == (204, b"")
    assert (await client.get("/api/v1/models")).json() == []
    assert (await client.get("/api/v1/models/llama")).status_code == 404
    assert (await client.delete(f"/api/v1/models/{model_id}")).status_code == 404

    for _ in range(2):
        await reconcile(deps.store)
    for replica_id in (external, managed):
        detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
        assert detail["status"] == "TERMINATED"
        assert detail["termination_reason"] == "model_deleted"
        assert detail["security_rules"] == []
    # The name is free for a new model.
    await create_model(client, "llama")


async def test_replica_detail(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    replica_id = await create_replica(client, model_id, endpoint="http://127.0.0.1:1/v1")
    await reconcile(deps.store)
    r = await client.get(f"/api/v1/replicas/{replica_id}")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "STARTING"
    assert body["model_name"] == "llama"
    assert body["endpoint"] == "http://127.0.0.1:1/v1"
    assert body["events"][-1]["reason"] == "registered"
    assert (await client.get("/api/v1/replicas/999")).json() == {"error": "Replica not found"}
