"""The Pulumi program of one replica: its VM (with the pinned SSH host key) and its security rules."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import astuple

import pulumi

from infra.cloud_init import user_data
from infra.hyperstack.provider import SecurityRule, SecurityRuleArgs, Vm, VmArgs
from infra.vm import Rule, VmRequest

LABEL_PREFIX = "orchestrator-replica="
DEPLOYMENT_LABEL_PREFIX = "orchestrator-deployment="
DEPLOYMENT_NAME = r"[a-z][a-z0-9-]{0,39}"
"""What a deployment name may be (`ORCH_DEPLOYMENT`): it travels inside a label."""


FIRST_BOOT_INPUTS = ("user_data", "key_name")
"""VM inputs read once, at creation: a change to them is not worth a new VM."""


def replica_label(replica_id: int) -> str:
    """The label that ties a Hyperstack VM to its replica (what an orphan sweep over the cloud looks for)."""
    return f"{LABEL_PREFIX}{replica_id}"


def replica_of_label(label: str) -> int | None:
    """The replica id a `replica_label` names; None for any other label."""
    match = re.fullmatch(re.escape(LABEL_PREFIX) + r"([0-9]+)", label)
    return int(match.group(1)) if match else None


def deployment_label(deployment: str) -> str:
    """The label that ties a Hyperstack VM to the orchestrator deployment that made it (replica ids are per
    deployment: two deployments on one cloud account each have a replica 1)."""
    return f"{DEPLOYMENT_LABEL_PREFIX}{deployment}"


def deployment_of_label(label: str) -> str | None:
    """The deployment a `deployment_label` names; None for any other label."""
    match = re.fullmatch(re.escape(DEPLOYMENT_LABEL_PREFIX) + f"({DEPLOYMENT_NAME})", label)
    return match.group(1) if match else None


def rule_resource_name(prefix: str, rule: Rule) -> str:
    """A name that follows the rule's content, so a changed rule set touches only the rules that changed.

    A digest rather than the fields: IPv6 prefixes hold "::", the separator of Pulumi URNs.
    """
    digest = hashlib.sha256(repr(astuple(rule)).encode()).hexdigest()[:12]
    return f"{prefix}-{rule.direction}-{rule.protocol}-{rule.port_range_min}-{rule.port_range_max}-{digest}"


class ReplicaVm(pulumi.ComponentResource):
    """VM -> one security rule per rule; outputs the VM's id and address.

    The VM is labelled with its replica and with `deployment`, the orchestrator deployment it belongs to. Its
    keypair is the admin's (`request.key_name`, which must exist in the environment): the cloud installs it for
    the image's default user, and the user-data installs the orchestrator's key for the `ubuntu` login.
    """

    vm_id: pulumi.Output[str]
    address: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        request: VmRequest,
        rules: Sequence[Rule],
        opts: pulumi.ResourceOptions | None = None,
        *,
        deployment: str,
        create_timeout_s: float = 300.0,
        poll_interval_s: float = 3.0,
    ) -> None:
        super().__init__("orchestrator:hyperstack:ReplicaVm", name, None, opts)
        # Stacks made before the VM took the admin's keypair also hold a Keypair resource (`<key_name>-replica-<id>`,
        # the orchestrator's key): no longer declared, Pulumi deletes it at their next `up` (with `KeypairProvider`,
        # kept for that), which is right: it was the stack's own.
        vm = Vm(
            f"{name}-vm",
            VmArgs(
                name=request.name,
                environment_name=request.environment_name,
                image_name=request.image_name,
                flavor_name=request.flavor_name,
                key_name=request.key_name,
                assign_floating_ip=request.assign_floating_ip,
                user_data=pulumi.Output.secret(user_data(request)),
                labels=[replica_label(request.replica_id), deployment_label(deployment)],
                enable_port_randomization=False,  # the orchestrator connects to port 22
                create_timeout_s=create_timeout_s,
                poll_interval_s=poll_interval_s,
            ),
            # What only a first boot reads: a VM made by an older orchestrator (another user-data, its own
            # keypair) keeps serving instead of being replaced at the next rules change.
            pulumi.ResourceOptions(parent=self, ignore_changes=list(FIRST_BOOT_INPUTS)),
        )
        for rule in sorted(set(rules)):
            SecurityRule(
                rule_resource_name(name, rule),
                SecurityRuleArgs(
                    vm_id=vm.vm_id,
                    direction=rule.direction,
                    protocol=rule.protocol,
                    ethertype=rule.ethertype,
                    remote_ip_prefix=rule.remote_ip_prefix,
                    port_range_min=rule.port_range_min,
                    port_range_max=rule.port_range_max,
                ),
                pulumi.ResourceOptions(parent=self, depends_on=[vm]),
            )
        self.vm_id = vm.vm_id
        self.address = vm.address
        self.register_outputs({"vm_id": vm.vm_id, "address": vm.address})


def replica_program(request: VmRequest, rules: Sequence[Rule], deployment: str) -> None:
    """The inline program of stack `replica-<id>` of `deployment`: enforce `rules` on the replica's VM."""
    replica = ReplicaVm(f"replica-{request.replica_id}", request, rules, deployment=deployment)
    pulumi.export("vm_id", replica.vm_id)
    pulumi.export("address", replica.address)
