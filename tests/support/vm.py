"""Backend test helpers: a `VmRequest` with real Ed25519 keys (override any field), and a backend wrapper."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from infra.vm import Rule, VmHandle, VmRequest
from orchestrator.fleet.backend import VmBackend
from provisioning.ssh_keys import generate_keypair


def vm_request(replica_id: int, rules: tuple[Rule, ...] = (), **overrides: Any) -> VmRequest:
    host_private, host_public = generate_keypair(f"replica-{replica_id}-host")
    request = VmRequest(
        replica_id=replica_id,
        name=f"llama-{replica_id}",
        environment_name="default-CANADA-1",
        image_name="Ubuntu Server 22.04 LTS R535 CUDA 12.2",
        flavor_name="n3-RTX-A6000x1",
        key_name="orch",
        assign_floating_ip=True,
        engine_port=8000,
        ssh_public_key=generate_keypair("orchestrator")[1],
        host_public_key=host_public,
        host_private_key=host_private,
        rules=rules,
    )
    return dataclasses.replace(request, **overrides)


class WrappedBackend:
    """A VM backend that passes every call to `inner`: tests subclass it and change what they test."""

    def __init__(self, inner: VmBackend) -> None:
        self.inner = inner
        self.ssh_port = inner.ssh_port

    def up(self, request: VmRequest) -> VmHandle:
        return self.inner.up(request)

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        self.inner.apply_rules(request, rules)

    def enforced_rules(self, handle: VmHandle) -> frozenset[Rule]:
        return self.inner.enforced_rules(handle)

    def destroy(self, replica_id: int) -> None:
        self.inner.destroy(replica_id)

    def owned(self) -> frozenset[int]:
        return self.inner.owned()
