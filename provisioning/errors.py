"""The errors provisioning raises; paramiko's own exceptions never leave the package.

SshError                 every failure; str() is safe to store (no secrets, no key material)
 +-- HostKeyMismatch     the server presented another host key: never retried, never accepted
 +-- SshUnreachable      no authenticated session before the deadline (or the key was refused)
 +-- CommandFailed       a command exited non-zero or did not finish in time
"""

from __future__ import annotations

# How much of a failed command's output the message repeats; the whole (capped) output is on .output.
_MESSAGE_TAIL = 400


class SshError(Exception):
    """Base of every provisioning failure."""


class HostKeyMismatch(SshError):
    """The server's host key is not the pinned one."""


class SshUnreachable(SshError):
    """Could not connect and authenticate before the deadline."""


class CommandFailed(SshError):
    """A remote command failed; `exit_status` is None when it did not finish before its timeout."""

    def __init__(self, command_name: str, exit_status: int | None, output: str) -> None:
        self.command_name = command_name
        self.exit_status = exit_status
        self.output = output
        outcome = "timed out" if exit_status is None else f"exited with status {exit_status}"
        tail = output.strip()[-_MESSAGE_TAIL:]
        super().__init__(f"{command_name} {outcome}" + (f": {tail}" if tail else ""))
