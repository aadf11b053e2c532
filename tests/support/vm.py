"""A `VmRequest` for backend tests, with real Ed25519 keys (override any field)."""

from __future__ import annotations

import dataclasses
from typing import Any

from infra.vm import Rule, VmRequest
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
