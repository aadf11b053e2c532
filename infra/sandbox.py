"""The `local` sandbox backend: each VM is a real OpenSSH sshd on its own 127.x address, with its own host
key, authorized key, work dir ("disk") and nftables table.

The sandbox behaves like a cloud VM where it matters: it outlives the orchestrator process (sshd runs in
its own session), it is reached only through SSH and the engine port, its firewall is enforced by the
kernel, and destroying it leaves nothing behind: no process, no table, no file.
"""

from __future__ import annotations

import contextlib
import getpass
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from infra import nft
from infra.processes import alive, read_pid, terminate
from infra.vm import BackendError, Rule, VmHandle, VmRequest

_DIR_PREFIX = "replica-"


@dataclass(frozen=True)
class SandboxConfig:
    root: Path
    """Holds one directory per sandbox VM."""
    subnet: str = "127.77.0.0/16"
    """Replica N gets the N-th address of this loopback subnet."""
    ssh_port: int = 2222
    """sshd's port on every sandbox address (22 may be taken by the host's own sshd on 0.0.0.0)."""
    sshd: str = "/usr/sbin/sshd"
    enforce_rules: bool = True
    """False records the rules without nft (also what happens when nft or root is missing)."""
    start_timeout_s: float = 5.0
    stop_timeout_s: float = 3.0


class SandboxBackend:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.ssh_port = config.ssh_port
        # sshd processes this object started, kept to reap them (a sandbox outlives a restarted server,
        # which then finds its sshd by pid file instead).
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._network = ipaddress.ip_network(config.subnet)
        if not self._network.subnet_of(ipaddress.ip_network("127.0.0.0/8")):  # type: ignore[arg-type]
            raise ValueError(f"the sandbox subnet must be inside 127.0.0.0/8, not {config.subnet}")
        self.not_enforced_reason = nft.available() if config.enforce_rules else "disabled by configuration"
        """None when nftables enforces the rules; else why they are only recorded."""

    def address(self, replica_id: int) -> str:
        if not 0 < replica_id < self._network.num_addresses - 1:
            raise BackendError(f"replica {replica_id} has no address in the sandbox subnet {self._network}")
        return str(self._network[replica_id])

    def work_dir(self, replica_id: int) -> Path:
        """The VM's "disk": where the bootstrap writes the engine's files."""
        return self._vm_dir(replica_id) / "vm"

    def up(self, request: VmRequest) -> VmHandle:
        rid, address = request.replica_id, self.address(request.replica_id)
        vm = self._vm_dir(rid)
        self.work_dir(rid).mkdir(parents=True, exist_ok=True, mode=0o700)
        changed = _write(vm / "host_ed25519", request.host_private_key.encode())
        changed |= _write(vm / "host_ed25519.pub", request.host_public_key.encode())
        changed |= _write(vm / "authorized_keys", request.ssh_public_key.encode() + b"\n")
        self._enforce(rid, request.rules)  # before sshd listens: never a moment open to everyone
        pid = self._sshd_pid(rid)
        if pid is not None and changed:
            terminate([pid], self.config.stop_timeout_s)  # new keys: restart, as a rebuilt VM would
            if (child := self._children.pop(rid, None)) is not None:
                child.wait(self.config.stop_timeout_s)
            pid = None
        if pid is None:
            self._start_sshd(rid, address)
        return VmHandle(rid, f"sandbox-{rid}", address, self.config.ssh_port, getpass.getuser())

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        self._enforce(request.replica_id, rules)

    def enforced_rules(self, handle: VmHandle) -> frozenset[Rule]:
        if self.not_enforced_reason is None:
            return nft.enforced(handle.address)
        recorded = self._vm_dir(handle.replica_id) / "rules.json"
        if not recorded.exists():
            return frozenset()
        return frozenset(Rule(**r) for r in json.loads(recorded.read_text()))

    def destroy(self, replica_id: int) -> None:
        vm = self._vm_dir(replica_id)
        pids = set(_processes_under(vm)) | set(_processes_on(self.address(replica_id)))
        if (pid := self._sshd_pid(replica_id)) is not None:
            pids.add(pid)
        terminate(sorted(pids), self.config.stop_timeout_s)
        if (child := self._children.pop(replica_id, None)) is not None:
            child.wait(self.config.stop_timeout_s)
        if self.not_enforced_reason is None:
            nft.delete(self.address(replica_id))
        shutil.rmtree(vm, ignore_errors=True)

    def owned(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.config.root.is_dir():
            for entry in self.config.root.iterdir():
                suffix = entry.name.removeprefix(_DIR_PREFIX)
                if entry.name.startswith(_DIR_PREFIX) and suffix.isdigit():
                    ids.add(int(suffix))
        if self.not_enforced_reason is None:
            for address in nft.sandbox_tables():
                ip = ipaddress.ip_address(address)
                if ip in self._network:
                    ids.add(int(ip) - int(self._network.network_address))
        return frozenset(ids)

    # -- internals --------------------------------------------------------------------------

    def _vm_dir(self, replica_id: int) -> Path:
        return self.config.root / f"{_DIR_PREFIX}{replica_id}"

    def _enforce(self, replica_id: int, rules: Iterable[Rule]) -> None:
        rules = sorted(set(rules))
        if self.not_enforced_reason is None:
            nft.apply(self.address(replica_id), rules)
        else:  # nothing enforces them: the record is all there is to read back
            _write(self._vm_dir(replica_id) / "rules.json", json.dumps([asdict(r) for r in rules]).encode())

    def _sshd_pid(self, replica_id: int) -> int | None:
        pid = read_pid(self._vm_dir(replica_id) / "sshd.pid")
        return pid if pid is not None and alive(pid) else None

    def _start_sshd(self, replica_id: int, address: str) -> None:
        vm = self._vm_dir(replica_id)
        pid_file = vm / "sshd.pid"
        pid_file.unlink(missing_ok=True)
        argv = sshd_argv(self.config.sshd, address, self.config.ssh_port, vm)
        _privilege_separation_dir()
        with (vm / "sshd.log").open("ab") as log_file:
            try:
                process = subprocess.Popen(  # noqa: S603 (fixed binary, arguments built here)
                    argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
                )
            except OSError as e:
                raise BackendError(f"cannot start sshd ({self.config.sshd}): {e}") from e
        self._children[replica_id] = process
        # sshd writes its pid file once its listening socket is bound.
        deadline = time.monotonic() + self.config.start_timeout_s
        while not pid_file.exists():
            if process.poll() is not None:
                del self._children[replica_id]
                tail = (vm / "sshd.log").read_text(errors="replace")[-300:].strip()
                raise BackendError(f"sshd on {address}:{self.config.ssh_port} exited: {tail}")
            if time.monotonic() > deadline:
                terminate([process.pid], self.config.stop_timeout_s)
                self._children.pop(replica_id).wait(self.config.stop_timeout_s)
                raise BackendError(f"sshd on {address} did not start within {self.config.start_timeout_s} s")
            time.sleep(0.005)


def sshd_argv(sshd: str, address: str, port: int, vm_dir: Path, **extra: str) -> list[str]:
    """sshd's command line for a sandbox VM: its host key, authorized keys and pid file are in `vm_dir`."""
    options = {
        "ListenAddress": f"{address}:{port}",
        "HostKey": str(vm_dir / "host_ed25519"),
        "PidFile": str(vm_dir / "sshd.pid"),
        "AuthorizedKeysFile": str(vm_dir / "authorized_keys"),
        "UsePAM": "no",
        "StrictModes": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "PermitRootLogin": "prohibit-password",
        "Subsystem": "sftp internal-sftp",
        # bash reads ~/.bashrc for commands sshd runs unless SHLVL says it is nested. The sandbox shares
        # the host's home, whose bashrc may be heavy (pyenv init: 90 ms per command here, 3 ms without).
        "SetEnv": "SHLVL=1",
        **extra,
    }
    argv = [sshd, "-D", "-e", "-f", "/dev/null"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return argv


def _write(path: Path, content: bytes) -> bool:
    """Write with mode 0600 unless the file already holds exactly this; True when it changed."""
    with contextlib.suppress(OSError):
        if path.read_bytes() == content:
            return False
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    tmp.replace(path)
    return True


PRIVSEP_DIR = Path("/run/sshd")
"""Where OpenSSH's sshd drops privileges; /run is empty after every boot and only a system sshd service makes it."""


def _privilege_separation_dir() -> None:
    """Make sshd's privilege separation directory when it is missing (as root: root-owned, 0755, as Debian's sshd
    service makes it). Without root it cannot be made, and sshd's own error says what is missing."""
    if not PRIVSEP_DIR.is_dir() and os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)


def _processes_under(directory: Path) -> list[int]:
    """Processes whose working directory is inside `directory`: what runs "on" the sandbox VM."""
    root = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = os.readlink(entry / "cwd")
            if cwd == root or cwd.startswith(root + "/"):
                found.append(int(entry.name))
    return found


def _processes_on(address: str) -> list[int]:
    """Processes holding a TCP socket on `address`: sshd's per-connection children among them, which live on
    after their listener when a connection's end was never seen (its FIN rejected by a rule change)."""
    packed = socket.inet_aton(address)[::-1].hex().upper()
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].split(":")[0] == packed and fields[9] != "0":
            inodes.add(f"socket:[{fields[9]}]")
    found = []
    for entry in Path("/proc").iterdir():
        if not inodes or not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
    return found
