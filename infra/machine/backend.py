"""The `machine` backend: each VM a booted Debian machine, as close to a cloud VM as this host can make one.

A replica's machine is an overlay on the cached image (`image.py`), booted by `systemd-nspawn` with systemd as
its init, its own process table, hostname and network namespace, joined to this host by a veth pair: replica N
owns the N-th /30 of the machine subnet (this host's end is its first address, the machine's the second). Its
first boot goes through cloud-init's NoCloud datasource with the same user-data a GPU cloud gets
(`infra.cloud_init`). The security group is an nftables table on this host (`infra.nft`, routed hooks): outside
the machine, where a cloud enforces it, and in force before the machine boots.

A small supervisor script owns each machine: it mounts the overlay, runs `systemd-nspawn`, configures this
host's end of the veth each time the machine boots (a reboot inside ends nspawn with status 133, and the
supervisor boots it again, as `systemd-nspawn@.service` does), and on SIGTERM powers the machine off and
unmounts. It runs in its own session, so machines outlive the orchestrator process, like VMs.

This host's connections reach the machines from addresses on its loopback interface: `host_address` (the
routes' source: what the gateway and the prober use), and whatever `local_addresses` the caller adds (the
orchestrator's SSH source, a stranger's address for the security check).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra import nft
from infra.cloud_init import SSH_USER, user_data
from infra.machine.image import ENGINE_HOME, ImageRecipe, ensure_image
from infra.processes import alive, read_pid
from infra.vm import BackendError, Rule, VmHandle, VmRequest

_DIR_PREFIX = "replica-"
SEED_DIR = "var/lib/cloud/seed/nocloud"
INSTANCES_DIR = "var/lib/cloud/instances"
"""cloud-init's per-instance state; its `boot-finished` is written at the end of every boot (the final stage)."""
REBOOT_STATUS = 133
"""systemd-nspawn's exit status when the machine rebooted."""


@dataclass(frozen=True)
class MachineConfig:
    root: Path
    """Holds one directory per machine: its overlay layers, supervisor, seed and console log."""
    image_dir: Path
    """The image cache (shared by every state directory on this host)."""
    enginesim_dir: Path
    """The engine simulator's package, mounted read-only where the vLLM image stand-in runs it from."""
    site_packages: Path
    """Packages the engine simulator imports (this installation's), mounted read-only beside it."""
    recipe: ImageRecipe = field(default_factory=ImageRecipe)
    subnet: str = "10.213.0.0/16"
    """Replica N owns the N-th /30 of it."""
    host_address: str = "10.212.0.1"
    """This host's source address towards every machine (the routes' `src`), added to its loopback interface."""
    local_addresses: tuple[str, ...] = ()
    """More addresses put on the loopback interface, for connections that must come from elsewhere."""
    keypairs_dir: Path | None = None
    """Stands in for the cloud's keypairs: `<key_name>.pub` there is installed for the image's default user
    (`ubuntu`), as a cloud installs the VM's keypair; no such file, no admin key."""
    ssh_port: int = 22
    boot_timeout_s: float = 90.0
    stop_timeout_s: float = 20.0


class MachineBackend:
    def __init__(self, config: MachineConfig) -> None:
        self.config = config
        self.ssh_port = config.ssh_port
        self._network = ipaddress.ip_network(config.subnet)
        if self._network.version != 4 or self._network.prefixlen > 28:
            raise ValueError(f"the machine subnet must be an IPv4 network of /28 or larger, not {config.subnet}")
        self._addresses_added = False
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        """Supervisors this object started, kept to reap them (a restarted server finds them by pid file)."""

    # -- addresses ----------------------------------------------------------------------------

    def address(self, replica_id: int) -> str:
        """The machine's own address."""
        return str(self._block(replica_id)[2])

    def name(self, replica_id: int) -> str:
        """Unique on this host (machines of other subnets, other state directories, run beside it): named after
        its address, in hex, so that this host's end of its veth, `ve-<name>`, fits Linux's 15 characters."""
        return f"vm-{int(self._block(replica_id)[2]):08x}"

    def veth(self, replica_id: int) -> str:
        return f"ve-{self.name(replica_id)}"  # systemd-nspawn's name for this host's end

    def _block(self, replica_id: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        blocks = self._network.num_addresses // 4
        if not 0 < replica_id < blocks:
            raise BackendError(f"replica {replica_id} has no /30 in the machine subnet {self._network}")
        return ipaddress.ip_network(f"{self._network.network_address + 4 * replica_id}/30")

    # -- the backend interface ----------------------------------------------------------------

    def up(self, request: VmRequest) -> VmHandle:
        rid = request.replica_id
        image = ensure_image(self.config.image_dir, self.config.recipe)
        self._local_addresses()
        nft.apply(self.address(rid), request.rules, nft.ROUTED_HOOKS)  # before it boots: never open to all
        vm = self._vm_dir(rid)
        instance, seed = self._seed(request)
        if self.running(rid) and self._seed_of(vm) == seed:
            return self._handle(rid)
        self._stop(rid)  # new keys or user-data: boot it again from them, as a rebuilt VM would
        for layer in ("upper", "work", "merged"):
            (vm / layer).mkdir(parents=True, exist_ok=True)
        seed_dir = vm / "upper" / SEED_DIR
        seed_dir.mkdir(parents=True, exist_ok=True)
        for name, content in seed.items():
            _write(seed_dir / name, content)
        script = vm / "supervisor.sh"
        script.write_text(self._supervisor(rid, image))
        started = time.time()
        with (vm / "console.log").open("ab") as console:
            try:
                process = subprocess.Popen(  # noqa: S603 (a script this backend wrote)
                    ["/bin/sh", str(script)],
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=console,
                    start_new_session=True,
                )
            except OSError as e:
                raise BackendError(f"cannot start machine {self.name(rid)}: {e}") from e
        self._children[rid] = process
        (vm / "supervisor.pid").write_text(str(process.pid))
        self._wait_booted(rid, process, started, vm / "upper" / INSTANCES_DIR / instance / "boot-finished")
        return self._handle(rid)

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        nft.apply(self.address(request.replica_id), rules, nft.ROUTED_HOOKS)

    def enforced_rules(self, handle: VmHandle) -> frozenset[Rule]:
        return nft.enforced(handle.address, nft.ROUTED_HOOKS)

    def destroy(self, replica_id: int) -> None:
        self._stop(replica_id)
        if Path(f"/sys/class/net/{self.veth(replica_id)}").exists():  # gone with the machine's namespace, normally
            _ip("link", "delete", self.veth(replica_id))
        nft.delete(self.address(replica_id))
        shutil.rmtree(self._vm_dir(replica_id), ignore_errors=True)

    def owned(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.config.root.is_dir():
            for entry in self.config.root.iterdir():
                suffix = entry.name.removeprefix(_DIR_PREFIX)
                if entry.name.startswith(_DIR_PREFIX) and suffix.isdigit():
                    ids.add(int(suffix))
        for address in nft.sandbox_tables():
            ip = ipaddress.ip_address(address)
            if ip in self._network and (int(ip) - int(self._network.network_address)) % 4 == 2:
                ids.add((int(ip) - int(self._network.network_address)) // 4)
        return frozenset(ids)

    # -- what tests and operators look at -----------------------------------------------------

    def running(self, replica_id: int) -> bool:
        pid = read_pid(self._vm_dir(replica_id) / "supervisor.pid")
        return pid is not None and alive(pid)

    def init_pid(self, replica_id: int) -> int | None:
        """The machine's init (systemd) as this host sees it, or None when it is not booted. Recorded by the
        supervisor, since it outlives a killed systemd-nspawn."""
        pid = read_pid(self._vm_dir(replica_id) / "init.pid")
        return pid if pid and alive(pid) else None

    def reboot(self, replica_id: int) -> None:
        """Reboot the machine from inside (systemd's reboot signal), as `sudo reboot` on a VM would."""
        pid = self.init_pid(replica_id)
        if pid is None:
            raise BackendError(f"machine {self.name(replica_id)} is not running")
        os.kill(pid, signal.SIGRTMIN + 5)

    def processes(self, replica_id: int) -> list[int]:
        """Every process of this host that belongs to the machine: its supervisor, nspawn, and everything inside
        (the processes in its init's pid namespace)."""
        vm = str(self._vm_dir(replica_id).resolve())
        init = self.init_pid(replica_id)
        namespace = None
        if init is not None:
            with contextlib.suppress(OSError):
                namespace = os.readlink(f"/proc/{init}/ns/pid")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                inside = namespace is not None and os.readlink(entry / "ns" / "pid") == namespace
                if inside or f"{vm}/" in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
        return found

    def leftovers(self, replica_id: int) -> list[str]:
        """What is left of the machine on this host (empty after `destroy`)."""
        vm = self._vm_dir(replica_id)
        found = [f"process {pid}" for pid in self.processes(replica_id)]
        if Path(f"/sys/class/net/{self.veth(replica_id)}").exists():
            found.append(f"interface {self.veth(replica_id)}")
        if os.path.ismount(vm / "merged"):
            found.append(f"mount {vm / 'merged'}")
        if vm.exists():
            found.append(f"directory {vm}")
        if self.address(replica_id) in nft.sandbox_tables():
            found.append(f"nft table {nft.table_name(self.address(replica_id))}")
        return found

    # -- internals ----------------------------------------------------------------------------

    def _vm_dir(self, replica_id: int) -> Path:
        return self.config.root / f"{_DIR_PREFIX}{replica_id}"

    def _handle(self, replica_id: int) -> VmHandle:
        return VmHandle(replica_id, f"machine-{replica_id}", self.address(replica_id), self.ssh_port, SSH_USER)

    def _seed(self, request: VmRequest) -> tuple[str, dict[str, bytes]]:
        """The instance id and the NoCloud seed files: what a cloud's metadata service would serve the VM."""
        rid = request.replica_id
        document = user_data(request)
        keys = []
        if self.config.keypairs_dir is not None:
            with contextlib.suppress(OSError):
                keys.append((self.config.keypairs_dir / f"{request.key_name}.pub").read_text().strip())
        # A new instance id for new keys or user-data: cloud-init then runs its once-per-instance modules again.
        digest = hashlib.sha256("\0".join([document, *keys]).encode()).hexdigest()[:12]
        instance = f"replica-{rid}-{digest}"
        meta = {"instance-id": instance, "local-hostname": self.name(rid), "public-keys": keys}
        block = self._block(rid)
        network = (
            "version: 2\nethernets:\n  host0:\n"
            f"    addresses: [{block[2]}/30]\n"
            f"    routes: [{{to: 0.0.0.0/0, via: {block[1]}}}]\n"
        )
        return instance, {
            "meta-data": json.dumps(meta).encode(),  # JSON is YAML
            "user-data": document.encode(),
            "network-config": network.encode(),
        }

    def _seed_of(self, vm: Path) -> dict[str, bytes]:
        seed: dict[str, bytes] = {}
        for name in ("meta-data", "user-data", "network-config"):
            with contextlib.suppress(OSError):
                seed[name] = (vm / "upper" / SEED_DIR / name).read_bytes()
        return seed

    def _supervisor(self, replica_id: int, image: Path) -> str:
        vm = self._vm_dir(replica_id).resolve()
        q = shlex.quote
        block = self._block(replica_id)
        veth = self.veth(replica_id)
        nspawn = shlex.join(
            [
                "systemd-nspawn",
                "--quiet",
                f"--directory={vm}/merged",
                f"--machine={self.name(replica_id)}",
                "--boot",
                "--network-veth",
                "--register=no",  # no machined on this host; --keep-unit: no systemd bus either
                "--keep-unit",
                "--console=passive",
                f"--bind-ro={self.config.site_packages.resolve()}:{ENGINE_HOME}/site",
                f"--bind-ro={self.config.enginesim_dir.resolve()}:{ENGINE_HOME}/src/orchestrator/enginesim",
            ]
        )
        return f"""#!/bin/sh
# Written by the orchestrator: boots machine {self.name(replica_id)} and boots it again when it reboots.
set -u
vm={q(str(vm))}
mountpoint -q "$vm/merged" || mount -t overlay overlay \\
  -o lowerdir={q(str(image))},upperdir="$vm/upper",workdir="$vm/work" "$vm/merged" || exit 1
stop=0
child=0
trap 'stop=1; [ "$child" -gt 0 ] && kill -TERM "$child"' TERM INT
while :; do
  {nspawn} &
  child=$!
  echo "$child" > "$vm/nspawn.pid"
  i=0
  until ip link show {veth} >/dev/null 2>&1 || [ $i -ge 400 ]; do sleep 0.05; i=$((i + 1)); done
  ip addr replace {block[1]}/30 dev {veth} && ip link set {veth} up \\
    && ip route replace {block} dev {veth} scope link src {self.config.host_address} \\
    || echo "supervisor: configuring {veth} failed" >&2
  # The machine's init, recorded: it outlives a killed nspawn (its processes are then found by it, and stopped).
  i=0
  until set -- $(cat /proc/$child/task/$child/children 2>/dev/null) && [ $# -gt 0 ] || [ $i -ge 400 ]; do
    sleep 0.05; i=$((i + 1))
  done
  echo "${{1:-0}}" > "$vm/init.pid"
  rc=0
  wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done  # a trapped signal ends wait early
  [ "$stop" -eq 0 ] && [ "$rc" -eq {REBOOT_STATUS} ] || break
  echo "supervisor: the machine rebooted; booting it again" >&2
done
rm -f "$vm/nspawn.pid" "$vm/init.pid"
umount "$vm/merged"
"""

    def _wait_booted(self, replica_id: int, process: subprocess.Popen[bytes], started: float, finished: Path) -> None:
        """Until cloud-init's final stage has run on this boot: the user-data is applied and sshd answers."""
        deadline = time.monotonic() + self.config.boot_timeout_s
        while True:
            with contextlib.suppress(OSError):
                if finished.stat().st_mtime >= started:
                    return
            if process.poll() is not None:
                raise BackendError(
                    f"machine {self.name(replica_id)} stopped while booting: {self._console_tail(replica_id)}"
                )
            if time.monotonic() > deadline:
                raise BackendError(
                    f"machine {self.name(replica_id)} had not finished booting (cloud-init) after "
                    f"{self.config.boot_timeout_s:.0f} s: {self._console_tail(replica_id)}"
                )
            time.sleep(0.05)

    def _console_tail(self, replica_id: int) -> str:
        with contextlib.suppress(OSError):
            lines = (self._vm_dir(replica_id) / "console.log").read_text(errors="replace").strip().splitlines()
            return " | ".join(lines[-5:]) or "no console output"
        return "no console output"

    def _stop(self, replica_id: int) -> None:
        """Power the machine off (SIGTERM to its supervisor), then kill whatever is left and unmount."""
        vm = self._vm_dir(replica_id)
        supervisor = read_pid(vm / "supervisor.pid")
        if supervisor is not None and alive(supervisor):
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout_s
            while alive(supervisor) and time.monotonic() < deadline:
                time.sleep(0.05)
        for pid in self.processes(replica_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        merged = vm / "merged"
        if merged.is_dir() and os.path.ismount(merged):
            done = subprocess.run(["umount", "--lazy", str(merged)], capture_output=True, text=True, check=False)  # noqa: S603, S607
            if done.returncode != 0:
                raise BackendError(f"cannot unmount {merged}: {done.stderr.strip()[:300]}")
        if (child := self._children.pop(replica_id, None)) is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(self.config.stop_timeout_s)
        (vm / "supervisor.pid").unlink(missing_ok=True)

    def _local_addresses(self) -> None:
        if self._addresses_added:
            return
        for address in (self.config.host_address, *self.config.local_addresses):
            _ip("address", "replace", f"{address}/32", "dev", "lo")
        self._addresses_added = True


def _ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)  # noqa: S603, S607
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendError(f"ip {' '.join(args)} failed: {e}") from e
    if done.returncode != 0:
        raise BackendError(f"ip {' '.join(args)} failed: {done.stderr.strip()[:300]}")


def _write(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    path.chmod(0o600)
