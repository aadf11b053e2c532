"""The replica's Pulumi program under `pulumi.runtime.set_mocks`: what it declares, with which inputs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pytest
from pulumi.runtime import MockCallArgs, MockResourceArgs, Mocks
from pulumi.runtime.rpc import is_rpc_secret, unwrap_rpc_secret

# The program module creates no resource at import time, so importing it before the mocks are set is safe.
from infra.cloud_init import user_data
from infra.hyperstack.program import (
    FIRST_BOOT_INPUTS,
    ReplicaVm,
    deployment_label,
    deployment_of_label,
    replica_program,
    rule_resource_name,
)
from infra.hyperstack.provider import VmArgs
from infra.vm import Rule
from tests.support.vm import vm_request

SSH_RULE = Rule("ingress", "tcp", "IPv4", "198.51.100.7/32", 22, 22)
ENGINE_RULE = Rule("ingress", "tcp", "IPv4", "198.51.100.0/24", 8000, 8000)
ENGINE_RULE_V6 = Rule("ingress", "tcp", "IPv6", "2001:db8::/32", 8000, 8000)
REQUEST = vm_request(7, (SSH_RULE, ENGINE_RULE), key_name="ops")
"""`ops`: the admin's keypair in the environment, which the VM is created with."""


@dataclass
class Registered:
    typ: str
    name: str
    inputs: dict[str, Any]
    secret_inputs: set[str]


@dataclass
class RecordingMocks(Mocks):
    """Records every resource; gives the VM the outputs its provider would compute."""

    resources: list[Registered] = field(default_factory=list)
    worker_loops: set[asyncio.AbstractEventLoop] = field(default_factory=set)

    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        # Pulumi's mock monitor runs here in a worker thread of the test's loop, with an event loop of its own
        # that it never closes: keep it, so that the fixture closes it (no ResourceWarning in a later test).
        self.worker_loops.add(asyncio.get_event_loop())
        secret = {k for k, v in args.inputs.items() if is_rpc_secret(v) and k != "__provider"}
        inputs = {k: unwrap_rpc_secret(v) for k, v in args.inputs.items() if k != "__provider"}
        self.resources.append(Registered(args.typ, args.name, inputs, secret))
        outputs = dict(inputs)
        if args.typ.endswith(":Vm"):
            outputs.update(vm_id="101", address="203.0.113.101", status="ACTIVE")
        return f"{args.name}-id", outputs

    def call(self, args: MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return {}, None

    def of_type(self, suffix: str) -> list[Registered]:
        return [r for r in self.resources if r.typ.endswith(suffix)]


@pytest.fixture
def mocks() -> Iterator[RecordingMocks]:
    """Pulumi's runtime on mocks, on a loop of this test's own; all of it undone afterwards."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    recording = RecordingMocks()
    pulumi.runtime.set_mocks(recording, project="orchestrator", stack="replica-7", preview=False)
    try:
        yield recording
    finally:
        pulumi.runtime.settings.reset_options()
        for worker_loop in recording.worker_loops:
            worker_loop.close()
        loop.run_until_complete(loop.shutdown_default_executor())
        asyncio.set_event_loop(None)
        loop.close()


def test_replica_declares_its_vm_and_one_rule_per_distinct_rule_and_no_keypair(mocks: RecordingMocks) -> None:
    rules = (SSH_RULE, ENGINE_RULE, ENGINE_RULE_V6, ENGINE_RULE)  # a duplicate is one rule

    @pulumi.runtime.test
    def declare() -> pulumi.Output[None]:
        replica = ReplicaVm("replica-7", REQUEST, rules, deployment="default")

        def check(outputs: list[Any]) -> None:
            assert outputs == ["101", "203.0.113.101"]
            [component] = mocks.of_type("orchestrator:hyperstack:ReplicaVm")
            assert component.name == "replica-7"

        return pulumi.Output.all(replica.vm_id, replica.address).apply(check)

    declare()

    assert {r.typ for r in mocks.resources} == {  # no Keypair: the VM's is the admin's own
        "orchestrator:hyperstack:ReplicaVm",
        "pulumi-python:dynamic/hyperstack:Vm",
        "pulumi-python:dynamic/hyperstack:SecurityRule",
    }
    declared = {
        Rule(
            **{k: r.inputs[k] for k in ("direction", "protocol", "ethertype", "remote_ip_prefix")},
            port_range_min=int(r.inputs["port_range_min"]),
            port_range_max=int(r.inputs["port_range_max"]),
        )
        for r in mocks.of_type(":SecurityRule")
    }
    assert declared == {SSH_RULE, ENGINE_RULE, ENGINE_RULE_V6}
    assert len(mocks.of_type(":SecurityRule")) == 3
    assert {r.inputs["vm_id"] for r in mocks.of_type(":SecurityRule")} == {"101"}  # each rule hangs on the VM


def test_vm_inputs_pin_port_22_label_replica_and_deployment_take_the_admins_keypair_and_hide_the_host_key(
    mocks: RecordingMocks,
) -> None:
    @pulumi.runtime.test
    def declare() -> pulumi.Output[None]:
        replica = ReplicaVm("replica-7", REQUEST, REQUEST.rules, deployment="staging")

        def check(_: list[Any]) -> None:
            [vm] = mocks.of_type(":Vm")
            assert vm.inputs["enable_port_randomization"] is False
            assert vm.inputs["labels"] == ["orchestrator-replica=7", "orchestrator-deployment=staging"]
            assert vm.inputs["key_name"] == "ops"  # the admin's keypair, as requested
            assert vm.inputs["assign_floating_ip"] is True
            assert (vm.inputs["name"], vm.inputs["flavor_name"]) == ("llama-7", "n3-RTX-A6000x1")
            assert (vm.inputs["image_name"], vm.inputs["environment_name"]) == (REQUEST.image_name, "default-CANADA-1")
            assert vm.inputs["user_data"] == user_data(REQUEST)  # which installs the orchestrator's key for ubuntu
            assert vm.secret_inputs == {"user_data"}  # the private host key never sits in the state in clear

        return pulumi.Output.all(replica.vm_id).apply(check)

    declare()


def test_replica_program_declares_the_replica_of_the_request_in_its_deployment(mocks: RecordingMocks) -> None:
    @pulumi.runtime.test
    def declare() -> None:
        replica_program(REQUEST, (ENGINE_RULE,), "production")

    declare()

    assert [r.name for r in mocks.of_type("ReplicaVm")] == ["replica-7"]
    assert [r.inputs["port_range_min"] for r in mocks.of_type(":SecurityRule")] == [8000]
    assert [r.inputs["labels"] for r in mocks.of_type(":Vm")] == [
        ["orchestrator-replica=7", "orchestrator-deployment=production"]
    ]


def test_deployment_labels_read_back_only_as_deployment_names() -> None:
    assert deployment_of_label(deployment_label("prod-2")) == "prod-2"
    assert deployment_of_label("orchestrator-deployment=") is None
    assert deployment_of_label("orchestrator-deployment=Prod") is None
    assert deployment_of_label("orchestrator-replica=7") is None


def test_rule_resource_names_follow_the_rule_and_avoid_urn_separators() -> None:
    names = {rule_resource_name("replica-7", r) for r in (SSH_RULE, ENGINE_RULE, ENGINE_RULE_V6)}

    assert len(names) == 3
    assert rule_resource_name("replica-7", ENGINE_RULE) == rule_resource_name(
        "replica-7", Rule(*ENGINE_RULE.__dict__.values())
    )
    assert not any("::" in n or "/" in n for n in names)
    assert rule_resource_name("replica-7", SSH_RULE).startswith("replica-7-ingress-tcp-22-22-")


def test_the_inputs_only_a_first_boot_reads_are_vm_inputs() -> None:
    """ignore_changes names inputs by name, and a name that is none is silently ignored: a VM made by an older
    orchestrator would then be replaced, engine and all, at the next rules change."""
    assert set(FIRST_BOOT_INPUTS) <= {f.name for f in dataclasses.fields(VmArgs)}
