"""Pulumi dynamic providers (and their resources) for Hyperstack VMs and security rules.

Pulumi pickles each provider object into the stack's state and runs its methods in a separate process that
the Pulumi CLI starts: so providers hold no state, and each method builds its HTTP client from the
environment of that process (`HYPERSTACK_API_KEY`, `ORCH_HYPERSTACK_BASE_URL`), which the backend sets
through the workspace's `env_vars`. Outputs repeat the inputs because Pulumi diffs old outputs against
new inputs. Like Hyperstack's Terraform provider, any change replaces the resource, except a VM's labels.

A stack's state names each resource's provider class (Pulumi pickles it by reference), so a class stays here while
some state may still name it: `KeypairProvider` is left only to delete the keypairs of older stacks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, ReadResult, Resource, ResourceProvider, UpdateResult

from infra.hyperstack.api import (
    DEFAULT_BASE_URL,
    ConflictError,
    HyperstackApiError,
    HyperstackClient,
    JsonObject,
    NotFoundError,
)
from infra.vm import BackendError, BackendUnavailable, Rule

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

API_KEY_ENV = "HYPERSTACK_API_KEY"
BASE_URL_ENV = "ORCH_HYPERSTACK_BASE_URL"
RULE_FIELDS = tuple(f.name for f in fields(Rule))


def client_from_env(timeout: float = 30.0) -> HyperstackClient:
    """The client of the provider process (the only place in `infra` that reads the environment, see above)."""
    api_key = os.environ.get(API_KEY_ENV)
    if not api_key:
        raise BackendUnavailable(f"{API_KEY_ENV} is not set in the Pulumi provider's environment")
    return HyperstackClient(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL, api_key, timeout)


class HyperstackProvider(ResourceProvider):
    """What the providers share: inputs kept in outputs, replace-on-change diffs, 404 means gone."""

    inputs: ClassVar[tuple[str, ...]]
    """Input properties, copied into the outputs so that the next diff can compare against them."""
    updatable: ClassVar[frozenset[str]] = frozenset()
    """Inputs that `update` changes in place; any other change replaces."""
    tuning: ClassVar[frozenset[str]] = frozenset()
    """Inputs that only tune how the provider works (deadlines): a change there changes nothing in the cloud."""

    def pick_inputs(self, props: dict[str, Any]) -> dict[str, Any]:
        return {k: props[k] for k in self.inputs if k in props}

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [k for k in self.inputs if k not in self.tuning and olds.get(k) != news.get(k)]
        replaces = [k for k in changed if k not in self.updatable]
        # Names are unique on Hyperstack and a second GPU VM costs money: delete first, then create.
        return DiffResult(changes=bool(changed), replaces=replaces, delete_before_replace=True)

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        with client_from_env() as client:
            try:
                live = self.read_live(client, id_, props)
            except NotFoundError:
                live = None
        if live is None:
            return ReadResult("", {})  # an empty id tells Pulumi the resource is gone
        return ReadResult(id_, {**self.pick_inputs(props), **live})

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        with client_from_env() as client, contextlib.suppress(NotFoundError):  # already gone is what we want
            self.delete_live(client, _id, props)

    def read_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> dict[str, Any] | None:
        """The computed outputs as the cloud has them now, or None when the resource is gone."""
        raise NotImplementedError

    def delete_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> None:
        raise NotImplementedError


class KeypairProvider(HyperstackProvider):
    """Deletes the per-replica keypair (`<key_name>-replica-<id>`, holding the orchestrator's key) of stacks made
    before VMs took the admin's keypair. No program declares it any more: Pulumi deletes it at such a stack's next
    `up` (or `destroy`) with this class, which the stack's state names. Remove it once no such stack remains.
    """

    inputs = ("name", "environment_name", "public_key")

    def read_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> dict[str, Any] | None:
        # The calls this backend uses have no GET for one keypair: what the state holds stands.
        return {"keypair_id": id_, "fingerprint": props.get("fingerprint", "")}

    def delete_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> None:
        client.delete_keypair(id_)


class VmProvider(HyperstackProvider):
    inputs = (
        "name",
        "environment_name",
        "image_name",
        "flavor_name",
        "key_name",
        "assign_floating_ip",
        "user_data",
        "labels",
        "enable_port_randomization",
        "create_timeout_s",
        "poll_interval_s",
    )
    updatable = frozenset({"labels"})
    tuning = frozenset({"create_timeout_s", "poll_interval_s"})

    def create(self, props: dict[str, Any]) -> CreateResult:
        args = self.pick_inputs(props)
        with client_from_env() as client:
            vm_id = create_one_vm(client, vm_payload(args))
            try:
                instance = client.wait_for_vm(
                    vm_id,
                    _number(args, "create_timeout_s", 300.0),
                    _number(args, "poll_interval_s", 3.0),
                    floating_ip=bool(args["assign_floating_ip"]),
                )
            except BackendError as e:
                discard_vm(client, vm_id, e)
        return CreateResult(str(vm_id), {**args, **vm_outputs(instance, args)})

    def update(self, id_: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        args = self.pick_inputs(news)
        with client_from_env() as client:
            client.set_vm_labels(id_, list(args["labels"]))
            instance = client.get_vm(id_)
        return UpdateResult({**args, **vm_outputs(instance, args)})

    def read_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> dict[str, Any] | None:
        instance = client.get_vm(id_)
        return {"labels": list(instance.get("labels") or []), **vm_outputs(instance, props)}

    def delete_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> None:
        client.delete_vm(id_)


def _number(args: dict[str, Any], key: str, default: float) -> float:
    value = args.get(key)
    return default if value is None else float(value)


def vm_payload(args: dict[str, Any]) -> JsonObject:
    """The create-VM body for one VM; port randomisation stays off unless asked for, so SSH stays on port 22."""
    return {
        "name": args["name"],
        "environment_name": args["environment_name"],
        "image_name": args["image_name"],
        "flavor_name": args["flavor_name"],
        "key_name": args["key_name"],
        "assign_floating_ip": bool(args["assign_floating_ip"]),
        "user_data": args["user_data"],
        "labels": list(args["labels"]),
        "enable_port_randomization": bool(args.get("enable_port_randomization", False)),
        "count": 1,
    }


def create_one_vm(client: HyperstackClient, payload: JsonObject) -> int:
    """Create the VM; returns its id. A failure's message starts with the VM's keypair and environment: the keypair
    (`key_name`, the admin's, made outside the orchestrator) must exist in that environment, and when it does not,
    Hyperstack's own message may not say which keypair it looked for (the message is cut at 300 characters)."""
    try:
        return int(client.create_vm(payload)["id"])
    except HyperstackApiError as e:
        asked = f"creating VM {payload['name']} with keypair {payload['key_name']!r} in {payload['environment_name']!r}"
        raise type(e)(f"{asked}: {e}", e.status) from e


def vm_outputs(instance: JsonObject, args: dict[str, Any]) -> dict[str, Any]:
    fixed_ip, floating_ip = instance.get("fixed_ip") or "", instance.get("floating_ip") or ""
    return {
        "vm_id": str(instance["id"]),
        "address": floating_ip if args.get("assign_floating_ip") else fixed_ip,
        "status": str(instance.get("status") or ""),
        "fixed_ip": fixed_ip,
        "floating_ip": floating_ip,
    }


def discard_vm(client: HyperstackClient, vm_id: int, cause: BackendError) -> NoReturn:
    """A failed create must leave nothing (Pulumi records no resource to delete later): delete the VM, re-raise."""
    try:
        with contextlib.suppress(NotFoundError):
            client.delete_vm(vm_id)
    except BackendError as e:
        raise BackendError(f"{cause}; deleting VM {vm_id} failed too: {e}") from cause
    raise cause


class SecurityRuleProvider(HyperstackProvider):
    inputs = ("vm_id", *RULE_FIELDS)

    def create(self, props: dict[str, Any]) -> CreateResult:
        args = self.pick_inputs(props)
        wanted = rule_body(args)
        with client_from_env() as client:
            try:
                rule = client.add_rule(args["vm_id"], wanted)
            except ConflictError as e:
                # The rule is already on the VM (an earlier run died before saving its state): adopt it.
                found = find_rule(client.get_vm(args["vm_id"]), wanted)
                if found is None:
                    raise BackendError(f"{e}, but no such rule is on VM {args['vm_id']}") from e
                rule = found
        return CreateResult(str(rule["id"]), {**args, "rule_id": str(rule["id"])})

    def read_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> dict[str, Any] | None:
        rules = client.get_vm(props["vm_id"]).get("security_rules") or []
        live = next((r for r in rules if str(r.get("id")) == id_), None)
        return None if live is None else {**rule_body(live), "rule_id": id_}

    def delete_live(self, client: HyperstackClient, id_: str, props: dict[str, Any]) -> None:
        client.delete_rule(props["vm_id"], id_)


def rule_body(rule: dict[str, Any]) -> JsonObject:
    """The six fields of a rule, normalised (Pulumi hands numbers over as floats)."""
    return {
        "direction": str(rule["direction"]).lower(),
        "protocol": str(rule["protocol"]).lower(),
        "ethertype": str(rule["ethertype"]),
        "remote_ip_prefix": str(rule["remote_ip_prefix"]),
        "port_range_min": int(rule["port_range_min"]),
        "port_range_max": int(rule["port_range_max"]),
    }


def find_rule(instance: JsonObject, wanted: JsonObject) -> JsonObject | None:
    for live in instance.get("security_rules") or []:
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a rule of another shape (any protocol, ICMP)
            if rule_body(live) == wanted:
                found: JsonObject = live
                return found
    return None


# -- resources


def _props(args: DataclassInstance) -> dict[str, Any]:
    # Not dataclasses.asdict: it deep-copies, and the values may be Outputs.
    return {f.name: getattr(args, f.name) for f in fields(args)}


@dataclass(frozen=True)
class VmArgs:
    name: pulumi.Input[str]
    environment_name: pulumi.Input[str]
    image_name: pulumi.Input[str]
    flavor_name: pulumi.Input[str]
    key_name: pulumi.Input[str]
    assign_floating_ip: pulumi.Input[bool]
    user_data: pulumi.Input[str]
    labels: pulumi.Input[list[str]]
    enable_port_randomization: pulumi.Input[bool] = False
    """Hyperstack's default with a floating IP is true, which moves SSH off port 22."""
    create_timeout_s: pulumi.Input[float] = 300.0
    poll_interval_s: pulumi.Input[float] = 3.0


class Vm(Resource, module="hyperstack", name="Vm"):
    vm_id: pulumi.Output[str]
    address: pulumi.Output[str]
    status: pulumi.Output[str]

    def __init__(self, resource_name: str, args: VmArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        outputs = dict.fromkeys(("vm_id", "address", "status", "fixed_ip", "floating_ip"))
        # The cloud-init holds the VM's private host key: keep it encrypted in the state.
        opts = pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(additional_secret_outputs=["user_data"]))
        super().__init__(VmProvider(), resource_name, {**_props(args), **outputs}, opts)


@dataclass(frozen=True)
class SecurityRuleArgs:
    vm_id: pulumi.Input[str]
    direction: pulumi.Input[str]
    protocol: pulumi.Input[str]
    ethertype: pulumi.Input[str]
    remote_ip_prefix: pulumi.Input[str]
    port_range_min: pulumi.Input[int]
    port_range_max: pulumi.Input[int]


class SecurityRule(Resource, module="hyperstack", name="SecurityRule"):
    rule_id: pulumi.Output[str]

    def __init__(self, resource_name: str, args: SecurityRuleArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(SecurityRuleProvider(), resource_name, {**_props(args), "rule_id": None}, opts)
