"""A model's deployment over the admin API, and its keeper making and draining replica rows (no VM is made here:
the reconcile job is not run; `tests/system/test_deployments.py` runs it all on sandbox VMs)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from orchestrator.domain.autoscale import AutoscalePolicy, Load
from orchestrator.domain.lifecycle import ReplicaStatus
from orchestrator.fleet.deployments import DeploymentKeeper
from orchestrator.runtime.container import Deps
from orchestrator.store.db import make_sessions
from orchestrator.store.deployments import DeploymentStore
from tests.support.toolkit import Client, create_model, create_replica, vm_details

S = ReplicaStatus


def body(**overrides: Any) -> dict[str, Any]:
    return {"template": {"create_vm": True, "vm_creation_details": vm_details()}, "replicas": 2, **overrides}


async def put(client: Client, model_id: int, data: Any) -> tuple[int, Any]:
    r = await client.put(f"/api/v1/models/{model_id}/deployment", json=data)
    return r.status_code, r.json()


SSH_TO_EVERYONE = [{"remote_ip_prefix": "0.0.0.0/0", "port_range_min": 2222, "port_range_max": 2223}]


BAD_BODIES = [
    (body(replicas=-1), {"replicas": ["Input should be greater than or equal to 0"]}),
    (body(replicas=None), {"replicas": ["Give replicas (a fixed count) or autoscale (the autoscaler's bounds)."]}),
    (
        body(autoscale={"min_replicas": 1, "max_replicas": 2}),
        {"autoscale": ["Give replicas (a fixed count) or autoscale, not both."]},
    ),
    (
        body(replicas=None, autoscale={"min_replicas": 3, "max_replicas": 2}),
        {"autoscale": {"min_replicas": ["min_replicas must not be above max_replicas."]}},
    ),
    (
        body(replicas=None, autoscale={"min_replicas": -1, "max_replicas": 2}),
        {"autoscale": {"min_replicas": ["Input should be greater than or equal to 0"]}},
    ),
    (body(max_surge=0), {"max_surge": ["Input should be greater than or equal to 1"]}),
    (
        body(template={"endpoint": "http://127.0.0.1:9/v1"}),
        {"template": ["A deployment's replicas are made from a VM template: create_vm true."]},
    ),
    (
        body(template={"create_vm": True, "vm_creation_details": vm_details(port=0)}),
        {"template": {"vm_creation_details": {"port": ["Input should be greater than or equal to 1"]}}},
    ),
    (
        body(template={"create_vm": True, "vm_creation_details": vm_details(port=2222)}),
        {"template": {"vm_creation_details": {"port": ["Port 2222 is SSH's on this backend."]}}},
    ),
    (body(colour="red"), {"colour": ["Unknown field."]}),
]
"""Each body, and the errors it is answered with."""


async def test_bad_input_is_a_400_and_nothing_is_kept(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    for data, errors in BAD_BODIES:
        assert await put(client, model_id, data) == (400, {"errors": errors}), data
    assert (await client.get(f"/api/v1/models/{model_id}/deployment")).status_code == 404
    assert await deps.keeper.keep() is False


async def test_rules_opening_ssh_to_everyone_are_refused_as_for_a_replica(client: Client) -> None:
    model_id = await create_model(client)
    status, answer = await put(
        client,
        model_id,
        body(template={"create_vm": True, "vm_creation_details": vm_details(security_rules=SSH_TO_EVERYONE)}),
    )
    assert status == 400
    assert list(answer["errors"]["template"]["vm_creation_details"]) == ["security_rules"]


async def test_unknown_model_is_a_404(client: Client) -> None:
    assert await put(client, 999, body()) == (404, {"error": "Model not found"})
    assert (await client.get("/api/v1/models/999/deployment")).status_code == 404
    assert (await client.delete("/api/v1/models/999/deployment")).status_code == 404


async def test_the_keeper_makes_the_count_leaves_hand_made_replicas_and_drains_the_surplus(
    client: Client, deps: Deps
) -> None:
    model_id = await create_model(client)
    by_hand = await create_replica(client, model_id, create_vm=True, vm_creation_details=vm_details())
    status, made = await put(client, model_id, body(replicas=3))
    assert status == 200, made
    assert (made["generation"], made["desired"], made["status"], made["members"]) == (1, 3, "scaling", [])

    assert await deps.keeper.keep() is True
    assert await deps.keeper.keep() is False  # the three are made once, not at every look
    got = (await client.get(f"/api/v1/models/{model_id}/deployment")).json()
    members = [m["id"] for m in got["members"]]
    assert len(members) == 3
    assert by_hand not in members
    assert {(m["status"], m["generation"]) for m in got["members"]} == {("PENDING", 1)}
    assert got["template"]["vm_creation_details"]["name"] == "llama-vm-1"
    assert (got["status"], got["message"]) == ("scaling", "0 of 3 replicas READY, 3 alive")

    assert (await put(client, model_id, body(replicas=1)))[0] == 200
    assert await deps.keeper.keep() is True
    drained = list((await client.get(f"/api/v1/models/{model_id}/deployment")).json()["members"])
    assert sorted((m["status"], m["termination_reason"]) for m in drained) == [
        ("DRAINING", "scaled_down"),
        ("DRAINING", "scaled_down"),
        ("PENDING", None),
    ]
    [kept] = [m["id"] for m in drained if m["status"] == "PENDING"]
    assert kept == min(members)  # the newest go first
    hand_made = (await client.get(f"/api/v1/replicas/{by_hand}")).json()
    assert (hand_made["status"], hand_made["deleted"]) == ("PENDING", False)


async def test_a_changed_template_is_a_new_generation_the_same_one_is_not(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    assert (await put(client, model_id, body()))[1]["generation"] == 1
    assert (await put(client, model_id, body(replicas=4)))[1]["generation"] == 1
    other = {"create_vm": True, "vm_creation_details": vm_details(flavor_name="n3-H100x1")}
    changed = (await put(client, model_id, body(template=other)))[1]
    assert changed["generation"] == 2
    assert changed["template"]["vm_creation_details"]["flavor_name"] == "n3-H100x1"


async def test_engine_secrets_are_kept_sealed_and_never_shown(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    engine = {"model": "meta-llama/Llama-3.1-8B-Instruct", "secret_env": {"HF_TOKEN": "hf_secret_value_123"}}
    template = {"create_vm": True, "vm_creation_details": vm_details(run_command=None, engine=engine)}
    r = await client.put(f"/api/v1/models/{model_id}/deployment", json=body(template=template, replicas=1))
    assert r.status_code == 200, r.text
    assert "hf_secret_value_123" not in r.text
    assert r.json()["template"]["vm_creation_details"]["engine"]["secret_env"] == ["HF_TOKEN"]
    assert await deps.keeper.keep() is True
    [member] = (await client.get(f"/api/v1/models/{model_id}/deployment")).json()["members"]
    replica = await deps.store.replica(member["id"])
    assert replica is not None
    assert replica.engine_secrets_sealed
    assert deps.box.open(replica.engine_secrets_sealed) == '{"HF_TOKEN": "hf_secret_value_123"}'
    table = (await client.get("/api/v1/tables/deployments")).text
    assert "hf_secret_value_123" not in table


async def test_deleting_the_deployment_drains_its_replicas_and_only_those(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    by_hand = await create_replica(client, model_id, create_vm=True, vm_creation_details=vm_details())
    await put(client, model_id, body(replicas=2))
    await deps.keeper.keep()
    r = await client.delete(f"/api/v1/models/{model_id}/deployment")
    assert r.status_code == 200, r.text
    drained = r.json()["drained"]
    assert len(drained) == 2
    assert by_hand not in drained
    assert r.json()["message"] == "Deployment deleted; 2 replicas draining"
    for replica_id in drained:
        detail = (await client.get(f"/api/v1/replicas/{replica_id}")).json()
        assert (detail["status"], detail["termination_reason"]) == ("DRAINING", "deployment_deleted")
        assert detail["vm_status"] == "PENDING"  # not FAILED: nothing went wrong
    assert (await client.get(f"/api/v1/models/{model_id}/deployment")).status_code == 404
    assert await deps.keeper.keep() is False
    assert (await client.get(f"/api/v1/replicas/{by_hand}")).json()["status"] == "PENDING"
    assert (await put(client, model_id, body(replicas=1)))[0] == 200  # a new one may be set again


async def test_a_deleted_models_deployment_goes_with_it(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    await put(client, model_id, body(replicas=2))
    await deps.keeper.keep()
    assert (await client.delete(f"/api/v1/models/{model_id}")).status_code == 204
    assert await deps.keeper.keep() is False  # none made for a model that is gone
    assert await deps.store.count_replicas_by_status() == {"DRAINING": 2}


async def test_an_autoscaled_deployment_starts_at_its_minimum(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    policy = {"min_replicas": 2, "max_replicas": 4, "target_waiting": 3, "scale_up_delay_s": 10}
    status, made = await put(client, model_id, body(replicas=None, autoscale=policy))
    assert status == 200, made
    assert made["autoscale"] == {**policy, "scale_down_delay_s": 300}
    assert (made["replicas"], made["desired"]) == (None, 2)
    assert await deps.keeper.keep() is True  # no load is known yet: the count stays at the minimum
    got = (await client.get(f"/api/v1/models/{model_id}/deployment")).json()
    assert (len(got["members"]), got["desired"]) == (2, 2)


async def test_a_changed_policy_keeps_the_count_within_its_new_bounds(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    at_five = {"min_replicas": 5, "max_replicas": 5}
    assert (await put(client, model_id, body(replicas=None, autoscale=at_five)))[0] == 200
    assert await deps.keeper.keep() is True
    raised = {"min_replicas": 1, "max_replicas": 8}
    status, changed = await put(client, model_id, body(replicas=None, autoscale=raised))
    assert (status, changed["desired"]) == (200, 5)  # raising the ceiling drains nothing
    assert await deps.keeper.keep() is False
    assert await deps.store.count_replicas_by_status() == {"PENDING": 5}
    assert (await put(client, model_id, body(replicas=None, autoscale={"min_replicas": 1, "max_replicas": 3})))[1][
        "desired"
    ] == 3  # a lower ceiling: the count brought under it, not to the minimum
    assert (await put(client, model_id, body(replicas=2)))[1]["desired"] == 2
    lifted = {"min_replicas": 4, "max_replicas": 6}
    assert (await put(client, model_id, body(replicas=None, autoscale=lifted)))[1]["desired"] == 4
    assert (await put(client, model_id, body(replicas=7)))[1]["desired"] == 7
    assert (await put(client, model_id, body(replicas=None, autoscale=raised)))[1]["desired"] == 7


async def walk_to_ready(deps: Deps, replica_id: int) -> None:
    for src, dst in itertools.pairwise([S.PENDING, S.PROVISIONING, S.BOOTSTRAPPING, S.STARTING, S.READY]):
        assert await deps.store.move(replica_id, src, dst, "test")


async def crash_after_ready(deps: Deps, replica_id: int) -> None:
    """Walk a replica the keeper made to READY, then end it as an engine that crashed for good."""
    await walk_to_ready(deps, replica_id)
    assert await deps.store.move(replica_id, S.READY, S.UNHEALTHY, "test")
    assert await deps.store.move(replica_id, S.UNHEALTHY, S.TERMINATING, "unrecoverable")
    assert await deps.store.move(replica_id, S.TERMINATING, S.TERMINATED, "terminated")


async def test_engines_crashing_soon_after_ready_are_replaced_until_failing(client: Client, deps: Deps) -> None:
    model_id = await create_model(client)
    assert (await put(client, model_id, body(replicas=1)))[0] == 200
    for _ in range(deps.settings.deployment_max_failed_starts):
        assert await deps.keeper.keep() is True
        members = (await client.get(f"/api/v1/models/{model_id}/deployment")).json()["members"]
        [made] = [m["id"] for m in members if m["status"] == "PENDING"]
        await crash_after_ready(deps, made)
    assert await deps.keeper.keep() is False  # no VM booted for an engine that keeps crashing
    got = (await client.get(f"/api/v1/models/{model_id}/deployment")).json()
    assert got["status"] == "failing"
    assert "or within 10 min of it" in got["message"]


POLICY = AutoscalePolicy(min_replicas=1, max_replicas=3, target_waiting=2, scale_up_delay_s=30)
BUSY = Load(ready=1, running=8, waiting=15)


def remembers(deps: Deps, deployment_id: int) -> bool:
    """Whether the autoscaler still holds a load seen above the target at 0 s for the deployment (it grows at 30 s);
    asking restarts that memory."""
    return deps.autoscaler.decide(deployment_id, POLICY, 1, BUSY, 30.0).desired == 2


async def test_the_autoscaler_forgets_a_deployment_deleted_rolled_or_fixed(client: Client, deps: Deps) -> None:
    autoscale = {"min_replicas": 1, "max_replicas": 3, "target_waiting": 2, "scale_up_delay_s": 30}
    other = {"create_vm": True, "vm_creation_details": vm_details(flavor_name="n3-H100x1")}
    changes: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
        ("nothing", lambda model_id: put(client, model_id, body(replicas=None, autoscale=autoscale))),
        (
            "a new template",
            lambda model_id: put(client, model_id, body(replicas=None, autoscale=autoscale, template=other)),
        ),
        ("a fixed count", lambda model_id: put(client, model_id, body(replicas=2))),
        ("its deletion", lambda model_id: client.delete(f"/api/v1/models/{model_id}/deployment")),
    ]
    for i, (change, make) in enumerate(changes):
        model_id = await create_model(client, name=f"model-{i}")
        status, made = await put(client, model_id, body(replicas=None, autoscale=autoscale))
        assert status == 200, made
        await deps.keeper.keep()
        deps.autoscaler.decide(made["id"], POLICY, 1, BUSY, 0.0)  # a load above the target seen at 0 s
        await make(model_id)
        await deps.keeper.keep()
        assert remembers(deps, made["id"]) is (change == "nothing"), change


async def test_a_rolling_deployment_is_not_resized_on_its_new_replicas_load(client: Client, deps: Deps) -> None:
    """Mid-roll the old replicas carry the calls: the few new ones READY are no measure of the deployment's load."""
    seen: list[list[int]] = []

    def idle(deployment: Any, replica_ids: list[int]) -> Load:
        seen.append(sorted(replica_ids))
        return Load(ready=len(replica_ids))  # nothing running, nothing waiting

    keeper = DeploymentKeeper(
        DeploymentStore(make_sessions(deps.engine)), deps.replicas, deps.box, max_failed_starts=3, load_of=idle
    )
    model_id = await create_model(client)
    fixed = {"min_replicas": 2, "max_replicas": 2, "scale_down_delay_s": 0}
    await put(client, model_id, body(replicas=None, autoscale=fixed))
    assert await keeper.keep() is True
    old = [m["id"] for m in (await client.get(f"/api/v1/models/{model_id}/deployment")).json()["members"]]
    for replica_id in old:
        await walk_to_ready(deps, replica_id)
    other = {"create_vm": True, "vm_creation_details": vm_details(flavor_name="n3-H100x1")}
    loose = {**fixed, "min_replicas": 1}
    assert (await put(client, model_id, body(replicas=None, autoscale=loose, template=other)))[1]["desired"] == 2
    assert await keeper.keep() is True  # the surge: one new replica
    [new] = [
        m["id"]
        for m in (await client.get(f"/api/v1/models/{model_id}/deployment")).json()["members"]
        if m["generation"] == 2
    ]
    await walk_to_ready(deps, new)
    assert await keeper.keep() is True  # one old one drained for the new one READY, the next new one made
    got = (await client.get(f"/api/v1/models/{model_id}/deployment")).json()
    assert (got["status"], got["desired"]) == ("rolling", 2), got["message"]
    assert got["message"].startswith("the count is held while the deployment rolls; ")
    [second] = [m["id"] for m in got["members"] if m["generation"] == 2 and m["id"] != new]
    await walk_to_ready(deps, second)
    assert await keeper.keep() is True  # the last old one drained
    assert seen == [[]]  # asked once, before the roll
    await keeper.keep()
    assert seen[-1] == sorted([new, second])  # the roll over: its new replicas' load, never the old ones'
    assert (await client.get(f"/api/v1/models/{model_id}/deployment")).json()["desired"] == 1
