"""The cloud-init user-data every replica VM boots with, on a GPU cloud and on a `machine` sandbox alike.

One document, so the one the cloud gets is the one tested on a real boot: the `ubuntu` user with passwordless
sudo and the orchestrator's authorized key (the login every plan runs as), and the pinned SSH host key.

The image's default user stays (`default`): the cloud installs the admin's keypair (the replica's `key_name`)
for it, and on a GPU cloud image it is `ubuntu` itself, so cloud-init merges both into one login that the admin's
key and the orchestrator's key open.
"""

from __future__ import annotations

import json

from infra.vm import VmRequest

HOST_KEY_PATH = "/etc/ssh/ssh_host_ed25519_key"
SSH_USER = "ubuntu"
"""The login of GPU cloud images (Ubuntu); created here too, so images without it behave the same."""


def user_data(request: VmRequest) -> str:
    """cloud-config: the login user, and the orchestrator's host key as the VM's only one before sshd first answers.

    cloud-init's ssh module runs before sshd starts: it deletes the image's host keys, installs these and
    generates no other (of the types it may generate, ed25519, one is there). The runcmd repeats that for
    images whose sshd starts earlier, then restarts sshd. JSON is YAML, and json.dumps quotes the PEM's
    newlines correctly.
    """
    config = {
        "users": [
            "default",
            {
                "name": SSH_USER,
                "shell": "/bin/bash",
                "sudo": "ALL=(ALL) NOPASSWD:ALL",
                "lock_passwd": True,
                "ssh_authorized_keys": [request.ssh_public_key],
            },
        ],
        "ssh_deletekeys": True,
        "ssh_genkeytypes": ["ed25519"],  # only missing keys are generated: this one is given (the schema wants one)
        "ssh_keys": {"ed25519_private": request.host_private_key, "ed25519_public": request.host_public_key},
        "runcmd": [
            ["sh", "-c", "find /etc/ssh -name 'ssh_host_*' ! -name 'ssh_host_ed25519_key*' -delete"],
            ["chmod", "0600", HOST_KEY_PATH],
            ["chmod", "0644", f"{HOST_KEY_PATH}.pub"],
            ["sh", "-c", "systemctl restart ssh || systemctl restart sshd"],
        ],
    }
    return "#cloud-config\n" + json.dumps(config, indent=2) + "\n"
