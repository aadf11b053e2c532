"""The user-data document every replica VM boots with (the `machine` system tests boot it for real)."""

from __future__ import annotations

import json

from infra.cloud_init import HOST_KEY_PATH, SSH_USER, user_data
from infra.vm import Rule
from tests.support.vm import vm_request

REQUEST = vm_request(7, (Rule("ingress", "tcp", "IPv4", "198.51.100.7/32", 22, 22),))


def _config(text: str) -> dict[str, object]:
    assert text.startswith("#cloud-config\n")
    config: dict[str, object] = json.loads(text.removeprefix("#cloud-config\n"))  # JSON is YAML: what cloud-init reads
    return config


def test_the_pinned_host_key_is_installed_and_no_other() -> None:
    config = _config(user_data(REQUEST))

    assert config["ssh_keys"] == {
        "ed25519_private": REQUEST.host_private_key,
        "ed25519_public": REQUEST.host_public_key,
    }
    assert config["ssh_deletekeys"] is True
    assert config["ssh_genkeytypes"] == ["ed25519"]  # generated only when missing, and it is given
    runcmd = config["runcmd"]
    assert isinstance(runcmd, list)
    assert ["chmod", "0600", HOST_KEY_PATH] in runcmd
    assert HOST_KEY_PATH == "/etc/ssh/ssh_host_ed25519_key"
    assert runcmd[-1] == ["sh", "-c", "systemctl restart ssh || systemctl restart sshd"]


def test_the_login_is_ubuntu_with_passwordless_sudo_and_the_orchestrator_key() -> None:
    default, user = _config(user_data(REQUEST))["users"]  # type: ignore[misc]

    assert default == "default"  # the image's own login stays: the cloud puts the admin's keypair there
    assert user["name"] == SSH_USER == "ubuntu"
    assert user["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    assert user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == [REQUEST.ssh_public_key]
