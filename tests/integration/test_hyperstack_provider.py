"""The Hyperstack REST client and dynamic providers against the fake Hyperstack API over real sockets."""

from __future__ import annotations

import base64
import pickle
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pulumi import automation as auto

from infra.hyperstack import HyperstackBackend, HyperstackConfig
from infra.hyperstack.api import ConflictError, HyperstackApiError, HyperstackClient, NotFoundError, VmNotActive
from infra.hyperstack.backend import pulumi_errors
from infra.hyperstack.provider import (
    API_KEY_ENV,
    BASE_URL_ENV,
    KeypairProvider,
    SecurityRuleProvider,
    VmProvider,
)
from infra.vm import BackendError, BackendUnavailable, Rule, VmHandle
from tests.support.fake_hyperstack import FakeHyperstack, running_fake_hyperstack

SERIALISED_PROVIDER = "gASV...pickled provider..."
"""What Pulumi adds to every property bag as `__provider`: never an input the providers compare."""
OLDER_STACKS_KEYPAIR_PROVIDER = "gASVNAAAAAAAAACMGWluZnJhLmh5cGVyc3RhY2sucHJvdmlkZXKUjA9LZXlwYWlyUHJvdmlkZXKUk5QpgZQu"
"""The `__provider` of the per-replica Keypair in the state of stacks made before VMs took the admin's keypair."""
ENVIRONMENT = "default-CANADA-1"
ADMIN_KEYPAIR = "ops"
"""The admin's keypair in `ENVIRONMENT`: VMs are created with it."""
VM_BODY = {"name": "vm", "environment_name": ENVIRONMENT, "flavor_name": "f", "key_name": ADMIN_KEYPAIR, "count": 1}
ENGINE_RULE_BODY = {
    "direction": "ingress",
    "protocol": "tcp",
    "ethertype": "IPv4",
    "remote_ip_prefix": "198.51.100.0/24",
    "port_range_min": 8000,
    "port_range_max": 8000,
}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHyperstack]:
    """The fake API with the admin's keypair, and the provider process's environment pointing at it (as the
    backend's env_vars would)."""
    with running_fake_hyperstack() as fake:
        fake.add_keypair_directly(ADMIN_KEYPAIR, ENVIRONMENT)
        monkeypatch.setenv(API_KEY_ENV, fake.api_key)
        monkeypatch.setenv(BASE_URL_ENV, fake.base_url)
        yield fake


@pytest.fixture
def client(fake: FakeHyperstack) -> Iterator[HyperstackClient]:
    with HyperstackClient(fake.base_url, fake.api_key, timeout=5) as c:
        yield c


def vm_props(**overrides: Any) -> dict[str, Any]:
    props = {
        "name": "llama-7",
        "environment_name": ENVIRONMENT,
        "image_name": "Ubuntu Server 22.04 LTS R535 CUDA 12.2",
        "flavor_name": "n3-RTX-A6000x1",
        "key_name": ADMIN_KEYPAIR,
        "assign_floating_ip": True,
        "user_data": "#cloud-config\n{}\n",
        "labels": ["orchestrator-replica=7"],
        "create_timeout_s": 10.0,
        "poll_interval_s": 0.0,
        "__provider": SERIALISED_PROVIDER,
    }
    return props | overrides


def rule_props(vm_id: str, **overrides: Any) -> dict[str, Any]:
    # Numbers as floats: that is how Pulumi hands them to a dynamic provider.
    floats = {"port_range_min": 8000.0, "port_range_max": 8000.0}
    return {"vm_id": vm_id, **ENGINE_RULE_BODY, **floats, "__provider": SERIALISED_PROVIDER} | overrides


@pytest.fixture
def vm_id(fake: FakeHyperstack) -> str:
    """An ACTIVE VM created through the providers."""
    return VmProvider().create(vm_props()).id


# -- the REST client


def test_client_polls_a_new_vm_through_creating_and_build_to_active(
    fake: FakeHyperstack, client: HyperstackClient
) -> None:
    fake.gets_per_status = 2
    created = client.create_vm(VM_BODY)
    assert created["status"] == "CREATING"

    instance = client.wait_for_vm(created["id"], deadline_s=10, interval_s=0)

    assert instance["status"] == "ACTIVE"
    assert fake.vm_gets(created["id"]) == 4  # two GETs in CREATING, two in BUILD


def test_client_wait_raises_when_the_vm_goes_to_error(fake: FakeHyperstack, client: HyperstackClient) -> None:
    fake.failing_names.add("doomed")
    created = client.create_vm(VM_BODY | {"name": "doomed"})

    with pytest.raises(VmNotActive, match="went to ERROR") as caught:
        client.wait_for_vm(created["id"], deadline_s=10, interval_s=0)
    assert caught.value.status == "ERROR"


def test_client_wait_raises_at_the_deadline(fake: FakeHyperstack, client: HyperstackClient) -> None:
    fake.gets_per_status = 1000
    created = client.create_vm(VM_BODY | {"name": "slow"})

    with pytest.raises(VmNotActive, match=r"still CREATING after 0 s \(deadline\)"):
        client.wait_for_vm(created["id"], deadline_s=0, interval_s=0)


def test_client_errors_carry_the_status_and_the_api_message(client: HyperstackClient) -> None:
    with pytest.raises(NotFoundError, match="virtual machine 999 not found") as caught:
        client.get_vm(999)
    assert caught.value.status == 404
    vm_id = client.create_vm(VM_BODY)["id"]
    client.add_rule(vm_id, ENGINE_RULE_BODY)
    with pytest.raises(ConflictError, match="already exists") as conflict:
        client.add_rule(vm_id, ENGINE_RULE_BODY)
    assert conflict.value.status == 409


def test_client_with_a_bad_key_says_so(fake: FakeHyperstack) -> None:
    with HyperstackClient(fake.base_url, "wrong-key") as c, pytest.raises(HyperstackApiError) as caught:
        c.get_vm(1)
    assert caught.value.status == 401
    assert str(caught.value) == (
        "Hyperstack GET /core/virtual-machines/1 failed with 401: Unauthorized: invalid api_key"
        " (check HYPERSTACK_API_KEY)"
    )


def test_client_reports_an_unreachable_api_without_a_status() -> None:
    with socket.socket() as s:  # a port that nobody listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    with (
        HyperstackClient(f"http://127.0.0.1:{port}/v1", "key", timeout=5, sleep=waits.append) as c,
        pytest.raises(HyperstackApiError) as caught,
    ):
        c.get_vm(1)
    assert caught.value.status is None
    assert str(caught.value).startswith("Hyperstack GET /core/virtual-machines/1 failed after 5 attempts: ConnectError")
    assert waits == [1.0, 2.0, 4.0, 8.0]


def test_client_lists_vms_across_pages(fake: FakeHyperstack, client: HyperstackClient) -> None:
    for i in range(5):
        client.create_vm(VM_BODY | {"name": f"vm-{i}"})

    vms = client.list_vms(search="vm-", page_size=2)

    assert sorted(v["name"] for v in vms) == [f"vm-{i}" for i in range(5)]
    assert sum(1 for method, path in fake.requests if method == "GET" and path == "/core/virtual-machines") == 3


def test_client_rejects_answers_without_what_it_needs() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/core/virtual-machines":
            return httpx.Response(200, text="<html>down for maintenance</html>")
        return httpx.Response(200, json={"status": True, "message": "ok", "instance": None})

    with HyperstackClient("http://hyperstack.test/v1", "key", transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(HyperstackApiError, match=r"answered without instance\.id"):
            c.get_vm(1)
        with pytest.raises(HyperstackApiError, match="answered 200 with a body that is not JSON"):
            c.list_vms()


# -- the keypair of older stacks


def test_an_older_stacks_keypair_is_deleted_with_the_provider_its_state_names(fake: FakeHyperstack) -> None:
    # The program no longer declares the keypair: Pulumi deletes it with the provider unpickled from the state.
    provider = pickle.loads(base64.b64decode(OLDER_STACKS_KEYPAIR_PROVIDER))
    kp_id = fake.add_keypair_directly("ops-replica-7", ENVIRONMENT)
    props = {"name": "ops-replica-7", "environment_name": ENVIRONMENT, "public_key": "ssh-ed25519 AAAAC3 orch"}

    assert isinstance(provider, KeypairProvider)
    provider.delete(str(kp_id), {**props, "__provider": OLDER_STACKS_KEYPAIR_PROVIDER})
    assert [k["name"] for k in fake.keypairs.values()] == [ADMIN_KEYPAIR]  # the admin's stays
    provider.delete(str(kp_id), props)  # 404: already gone is done


# -- VM provider


def test_vm_create_posts_one_vm_without_port_randomisation_and_waits_for_active(fake: FakeHyperstack) -> None:
    created = VmProvider().create(vm_props())

    [payload] = fake.created_payloads
    assert payload["enable_port_randomization"] is False
    assert payload["count"] == 1
    assert payload["labels"] == ["orchestrator-replica=7"]
    assert payload["user_data"] == "#cloud-config\n{}\n"
    assert payload["assign_floating_ip"] is True
    assert "create_timeout_s" not in payload
    assert created.outs is not None
    vm_id = int(created.id)
    assert created.outs["vm_id"] == created.id
    assert created.outs["status"] == "ACTIVE"
    assert created.outs["address"] == fake.vms[vm_id]["floating_ip"] == f"203.0.113.{vm_id % 250}"
    assert created.outs["flavor_name"] == "n3-RTX-A6000x1"  # inputs kept for the next diff
    assert fake.vm_gets(vm_id) == 2  # CREATING -> BUILD, BUILD -> ACTIVE


def test_vm_without_floating_ip_is_reached_on_its_fixed_ip(fake: FakeHyperstack) -> None:
    created = VmProvider().create(vm_props(assign_floating_ip=False))

    assert created.outs is not None
    assert created.outs["address"] == fake.vms[int(created.id)]["fixed_ip"]


def test_vm_that_goes_to_error_is_deleted_and_the_create_fails(fake: FakeHyperstack) -> None:
    fake.failing_names.add("llama-7")
    with pytest.raises(VmNotActive, match=r"Hyperstack VM \d+ went to ERROR while being created"):
        VmProvider().create(vm_props())

    assert len(fake.created_payloads) == 1
    assert fake.vms == {}  # nothing left running (and billing)


def test_vm_not_active_by_the_deadline_is_deleted_too(fake: FakeHyperstack) -> None:
    fake.gets_per_status = 1000
    with pytest.raises(VmNotActive, match="deadline"):
        VmProvider().create(vm_props(create_timeout_s=0.0))

    assert fake.vms == {}


@pytest.mark.parametrize("environment", [None, "default-NORWAY-1"])
def test_vm_create_with_a_keypair_missing_from_the_environment_fails_naming_the_keypair(
    fake: FakeHyperstack, environment: str | None
) -> None:
    if environment is not None:
        fake.add_keypair_directly("laptop", environment)  # a keypair of that name elsewhere is no keypair here

    with pytest.raises(HyperstackApiError) as caught:
        VmProvider().create(vm_props(key_name="laptop"))

    assert caught.value.status == 400
    assert str(caught.value) == (
        "creating VM llama-7 with keypair 'laptop' in 'default-CANADA-1': "
        "Hyperstack POST /core/virtual-machines failed with 400: invalid key_name"
    )
    assert fake.vms == {}
    # What the replica's error_message gets: the line of the provider's traceback in the Pulumi CLI's output.
    raised = traceback.format_exception_only(caught.value)[-1]
    error = auto.CommandError(auto.CommandResult(stdout=f"error: Traceback ...\n{raised}", stderr="", code=255))
    with pytest.raises(BackendError) as reported, pulumi_errors("replica-7", "up"):
        raise error
    assert str(reported.value) == f"pulumi up of stack replica-7 failed: {caught.value}"


def test_vm_create_with_a_bad_key_fails_clearly(fake: FakeHyperstack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "not-the-key")

    with pytest.raises(BackendError, match=r"failed with 401: .*\(check HYPERSTACK_API_KEY\)$"):
        VmProvider().create(vm_props())

    assert fake.vms == {}


def test_provider_without_a_key_in_its_environment_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)

    with pytest.raises(BackendUnavailable, match="HYPERSTACK_API_KEY is not set"):
        VmProvider().delete("1", vm_props())


def test_vm_diff_replaces_on_any_change_but_labels_and_tuning() -> None:
    olds = vm_props() | {"vm_id": "101", "address": "203.0.113.101", "status": "ACTIVE"}
    provider = VmProvider()

    same = provider.diff("101", olds, vm_props(__provider="a newer pickle"))
    tuning = provider.diff("101", olds, vm_props(create_timeout_s=600.0, poll_interval_s=5.0))
    labels = provider.diff("101", olds, vm_props(labels=["orchestrator-replica=7", "team=ml"]))
    flavor = provider.diff("101", olds, vm_props(flavor_name="n3-H100x1", user_data='#cloud-config\n{"a": 1}\n'))

    assert (same.changes, tuning.changes) == (False, False)
    assert (labels.changes, labels.replaces) == (True, [])
    assert flavor.changes is True
    assert flavor.replaces == ["flavor_name", "user_data"]
    assert flavor.delete_before_replace is True


def test_vm_update_changes_labels_in_place(fake: FakeHyperstack, vm_id: str) -> None:
    olds = fake.vms[int(vm_id)]
    news = vm_props(labels=["orchestrator-replica=7", "team=ml"])

    updated = VmProvider().update(vm_id, dict(olds), news)

    assert fake.vms[int(vm_id)]["labels"] == ["orchestrator-replica=7", "team=ml"]
    assert updated.outs is not None
    assert updated.outs["labels"] == ["orchestrator-replica=7", "team=ml"]
    assert updated.outs["vm_id"] == vm_id
    assert len(fake.created_payloads) == 1  # the same VM


def test_vm_read_reports_the_live_vm_and_an_empty_id_once_gone(fake: FakeHyperstack, vm_id: str) -> None:
    fake.vms[int(vm_id)]["labels"] = ["changed-by-hand"]

    live = VmProvider().read(vm_id, vm_props())

    assert live.id == vm_id
    assert live.outs is not None
    assert live.outs["labels"] == ["changed-by-hand"]  # the next diff sees the drift
    assert live.outs["status"] == "ACTIVE"
    del fake.vms[int(vm_id)]
    assert VmProvider().read(vm_id, vm_props()).id == ""


def test_vm_delete_is_done_when_already_gone(fake: FakeHyperstack, vm_id: str) -> None:
    VmProvider().delete(vm_id, vm_props())
    assert fake.vms == {}

    VmProvider().delete(vm_id, vm_props())  # 404: done

    assert fake.requests.count(("DELETE", f"/core/virtual-machines/{vm_id}")) == 2


# -- security rule provider


def test_rule_create_read_delete(fake: FakeHyperstack, vm_id: str) -> None:
    provider = SecurityRuleProvider()

    created = provider.create(rule_props(vm_id))

    [rule] = fake.vms[int(vm_id)]["security_rules"]
    assert str(rule["id"]) == created.id
    assert (rule["port_range_min"], rule["port_range_max"]) == (8000, 8000)  # ints on the wire
    assert provider.read(created.id, rule_props(vm_id)).id == created.id
    provider.delete(created.id, rule_props(vm_id))
    assert fake.vms[int(vm_id)]["security_rules"] == []
    assert provider.read(created.id, rule_props(vm_id)).id == ""
    provider.delete(created.id, rule_props(vm_id))  # 404: done


def test_rule_that_already_exists_is_adopted(fake: FakeHyperstack, vm_id: str) -> None:
    existing = fake.add_rule_directly(int(vm_id), ENGINE_RULE_BODY)

    created = SecurityRuleProvider().create(rule_props(vm_id))

    assert created.id == str(existing["id"])
    assert len(fake.vms[int(vm_id)]["security_rules"]) == 1
    assert ("POST", f"/core/virtual-machines/{vm_id}/sg-rules") in fake.requests  # it did try, and got the 409


def test_rule_on_a_vm_that_is_gone_is_deleted_already(fake: FakeHyperstack, vm_id: str) -> None:
    created = SecurityRuleProvider().create(rule_props(vm_id))
    VmProvider().delete(vm_id, vm_props())

    SecurityRuleProvider().delete(created.id, rule_props(vm_id))  # the VM's 404 means the rule went with it


def test_rule_any_change_replaces() -> None:
    olds = rule_props("101") | {"rule_id": "5"}
    provider = SecurityRuleProvider()

    assert provider.diff("5", olds, rule_props("101")).changes is False
    moved = provider.diff("5", olds, rule_props("102", port_range_max=8001.0))
    assert (moved.changes, moved.replaces) == (True, ["vm_id", "port_range_max"])


# -- the backend's drift reading


def test_backend_reads_the_enforced_rules_from_the_api(fake: FakeHyperstack, vm_id: str, tmp_path: Path) -> None:
    SecurityRuleProvider().create(rule_props(vm_id))
    unset = {"remote_ip_prefix": None, "port_range_min": None, "port_range_max": None}
    fake.add_rule_directly(int(vm_id), {"direction": "egress", "protocol": "any", "ethertype": "IPv6", **unset})
    fake.add_rule_directly(int(vm_id), {"direction": "ingress", "protocol": "icmp", "ethertype": "IPv4", **unset})
    config = HyperstackConfig(api_key=fake.api_key, base_url=fake.base_url, state_dir=tmp_path, passphrase="pw")
    handle = VmHandle(7, vm_id, "203.0.113.1", 22, "ubuntu")

    enforced = HyperstackBackend(config).enforced_rules(handle)

    assert enforced == {
        Rule("ingress", "tcp", "IPv4", "198.51.100.0/24", 8000, 8000),
        Rule("egress", "tcp", "IPv6", "::/0", 1, 65535),  # "any" protocol, every port
        Rule("egress", "udp", "IPv6", "::/0", 1, 65535),
    }


def test_backend_enforced_rules_of_a_vm_that_is_gone_is_a_backend_error(fake: FakeHyperstack, tmp_path: Path) -> None:
    config = HyperstackConfig(api_key=fake.api_key, base_url=fake.base_url, state_dir=tmp_path, passphrase="pw")

    with pytest.raises(BackendError, match="404"):
        HyperstackBackend(config).enforced_rules(VmHandle(7, "424242", "203.0.113.1", 22, "ubuntu"))
