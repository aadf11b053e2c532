"""The `hosts` backend: replicas on GPU servers the team already owns, reached over SSH with the admin's key.

No VM is made: `up` logs in to the replica's host (the admin's key, the host key pinned), authorises the
replica's own SSH key for the host's login (the line tagged `orchestrator-replica-<id>`, so `destroy` removes
exactly it), and enforces the replica's rules; the orchestrator then bootstraps the replica as it does a VM,
with its engine under a unit, in a directory and on a port of its own (`unit_name`, `work_dir`).

The rules live in an nftables table per replica on the host (`orch_replica_<id>`, `sudo -n nft`): its accept
lines are the rule set, and its reject covers the replica's engine port alone, on `input` (an engine listening on
the host) and on `prerouting` ahead of docker's DNAT (an engine in a container published with `-p`).
Other replicas' ports and the host's own SSH are never refused by it, so replicas on one host do not touch each
other and no rule set can lock the orchestrator (or the admin) out of the server.

Which host a replica is on, and its GPUs, come from a `HostBook` the orchestrator keeps current from its
database (the backend's methods take replica ids, and infra never reads the database).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import shlex
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import paramiko
from paramiko.pkey import UnknownKeyType

from infra.nft import DENY, decode_rule, encode_rule
from infra.vm import BackendError, Rule, VmHandle, VmRequest

log = logging.getLogger(__name__)

KEY_TAG = "orchestrator-replica-"
TABLE_PREFIX = "orch_replica_"
UNIT_PREFIX = "orchestrator-engine-r"
WORK_ROOT = "/opt/orchestrator-engine"
OPEN_TO_ALL = Rule("ingress", "tcp", "IPv4", "0.0.0.0/0", 0, 65535)
"""What a missing or foreign table means for drift: assume the worst."""
_KEY_TYPES: tuple[type[paramiko.PKey], ...] = (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def unit_name(replica_id: int) -> str:
    return f"{UNIT_PREFIX}{replica_id}"


def work_dir(replica_id: int) -> str:
    return f"{WORK_ROOT}/replica-{replica_id}"


def table_name(replica_id: int) -> str:
    return f"{TABLE_PREFIX}{replica_id}"


@dataclass(frozen=True)
class HostLogin:
    """How the orchestrator logs in to a registered host as its admin."""

    name: str
    address: str
    ssh_port: int
    ssh_user: str
    ssh_private_key: str = field(repr=False)
    """OpenSSH PEM (Ed25519, ECDSA or RSA), unencrypted."""
    host_public_key: str
    """The host's own key, an OpenSSH public line: pinned."""


@dataclass(frozen=True)
class Seat:
    """A replica's place on a host."""

    host: HostLogin
    gpus: tuple[int, ...]
    engine_port: int


class HostBook:
    """The registered hosts and where each replica sits, as the orchestrator last read them. Thread-safe: the
    orchestrator replaces the whole picture, the backend's worker threads read it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hosts: tuple[HostLogin, ...] = ()
        self._seats: dict[int, Seat] = {}
        self.loaded = False

    def replace(self, hosts: Sequence[HostLogin], seats: Mapping[int, Seat]) -> None:
        with self._lock:
            self._hosts, self._seats, self.loaded = tuple(hosts), dict(seats), True

    def hosts(self) -> tuple[HostLogin, ...]:
        with self._lock:
            return self._hosts

    def seat(self, replica_id: int) -> Seat | None:
        with self._lock:
            return self._seats.get(replica_id)


class HostsBackend:
    def __init__(
        self, book: HostBook, *, source_address: str | None = None, ssh_port: int = 22, timeout_s: float = 20.0
    ) -> None:
        self.book = book
        self.ssh_port = ssh_port
        """Only for the bootstrap rules' SSH line: each host's own port is in its registration."""
        self._source = source_address
        self._timeout_s = timeout_s

    # -- the backend interface ----------------------------------------------------------------

    def up(self, request: VmRequest) -> VmHandle:
        rid = request.replica_id
        seat = self._seat(rid)
        line = " ".join([*request.ssh_public_key.split()[:2], f"{KEY_TAG}{rid}"])
        with self.session(seat.host) as ssh:
            ssh.run(_authorise(rid, line), "authorising the replica's key")
            _apply(ssh, rid, seat, request.rules)
        host = seat.host
        return VmHandle(rid, f"{host.name}/replica-{rid}", host.address, host.ssh_port, host.ssh_user)

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        seat = self._seat(request.replica_id)
        with self.session(seat.host) as ssh:
            _apply(ssh, request.replica_id, seat, rules)

    def enforced_rules(self, handle: VmHandle) -> frozenset[Rule]:
        seat = self._seat(handle.replica_id)
        with self.session(seat.host) as ssh:
            status, out = ssh.call(f"sudo -n nft -j list table inet {table_name(handle.replica_id)}")
        return frozenset({OPEN_TO_ALL}) if status != 0 else read_rules(out)

    def destroy(self, replica_id: int) -> None:
        """From its host; a replica placed nowhere (it waited, or an orphan whose placement is gone) is looked for
        on every host that answers: one out of reach would be found later by `owned`, and must not keep a replica
        that never reached it from ending."""
        seat = self.book.seat(replica_id)
        if seat is None and not self.book.loaded:
            raise BackendError("the registered hosts are not loaded yet; try again")
        if seat is not None:
            self._remove(seat.host, replica_id)
            return
        for host in self.book.hosts():
            try:
                self._remove(host, replica_id)
            except BackendError as e:
                log.warning("hosts.remove_failed host=%s replica_id=%s error=%s", host.name, replica_id, e)

    def owned(self) -> frozenset[int]:
        ids: set[int] = set()
        for host in self.book.hosts():
            try:
                with self.session(host) as ssh:
                    _, out = ssh.call(INVENTORY)
            except BackendError as e:  # one host out of reach hides only its own replicas
                log.warning("hosts.inventory_failed host=%s error=%s", host.name, e)
                continue
            ids |= inventory_ids(out)
        return frozenset(ids)

    # -- internals ----------------------------------------------------------------------------

    def _remove(self, host: HostLogin, replica_id: int) -> None:
        with self.session(host) as ssh:
            ssh.run(removal(replica_id), f"removing replica {replica_id} from host {host.name}")

    def _seat(self, replica_id: int) -> Seat:
        seat = self.book.seat(replica_id)
        if seat is None:
            raise BackendError(f"replica {replica_id} is placed on no registered host")
        return seat

    @contextlib.contextmanager
    def session(self, host: HostLogin) -> Iterator[HostShell]:
        """Logged in to `host` as its admin (the pinned host key, the registered key); BackendError otherwise."""
        client = _login(host, self._source, self._timeout_s)
        try:
            yield HostShell(client, host.name, self._timeout_s)
        finally:
            client.close()


class HostShell:
    def __init__(self, client: paramiko.SSHClient, host: str, timeout_s: float) -> None:
        self._client, self._host, self._timeout_s = client, host, timeout_s

    def call(self, command: str, stdin: str | None = None) -> tuple[int, str]:
        """The command's exit status and its output, stderr included (where nft and sudo say what went wrong)."""
        transport = self._client.get_transport()
        try:
            if transport is None:
                raise paramiko.SSHException("the session is closed")
            chan = transport.open_session(timeout=self._timeout_s)
            with chan:
                chan.set_combine_stderr(True)
                chan.settimeout(self._timeout_s)
                chan.exec_command(command)
                if stdin is not None:
                    chan.sendall(stdin.encode())
                chan.shutdown_write()
                out = bytearray()
                while data := chan.recv(65536):
                    out += data
                return chan.recv_exit_status(), out.decode(errors="replace")
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise BackendError(f"host {self._host}: the SSH session failed: {type(e).__name__}: {e}") from e

    def run(self, command: str, what: str, stdin: str | None = None) -> str:
        status, out = self.call(command, stdin)
        if status != 0:
            raise BackendError(f"host {self._host}: {what} failed (exit {status}): {out.strip()[-500:]}")
        return out


def _login(host: HostLogin, source: str | None, timeout_s: float) -> paramiko.SSHClient:
    pinned = public_key(host.host_public_key)
    client = paramiko.SSHClient()
    known_as = host.address if host.ssh_port == 22 else f"[{host.address}]:{host.ssh_port}"
    client.get_host_keys().add(known_as, pinned.get_name(), pinned)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        sock = socket.create_connection(
            (host.address, host.ssh_port), timeout=timeout_s, source_address=(source, 0) if source else None
        )
        client.connect(
            host.address,
            port=host.ssh_port,
            username=host.ssh_user,
            pkey=private_key(host.ssh_private_key),
            sock=sock,
            timeout=timeout_s,
            banner_timeout=timeout_s,
            auth_timeout=timeout_s,
            allow_agent=False,
            look_for_keys=False,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        raise BackendError(f"host {host.name} presented a host key other than the pinned one") from e
    except paramiko.AuthenticationException as e:
        client.close()
        raise BackendError(f"host {host.name} refused the registered key for {host.ssh_user!r}") from e
    except paramiko.SSHException as e:
        client.close()  # RejectPolicy's refusal of an unknown key type lands here too
        raise BackendError(f"host {host.name}: SSH failed: {e}") from e
    except OSError as e:
        client.close()
        raise BackendError(f"host {host.name} ({host.address}:{host.ssh_port}) unreachable: {e}") from e
    return client


def private_key(pem: str) -> paramiko.PKey:
    """The admin's key for a host; BackendError (never quoting the key) when it is no unencrypted OpenSSH key."""
    for kind in _KEY_TYPES:
        # A truncated OpenSSH body fails inside paramiko's unpadding with an IndexError.
        with contextlib.suppress(paramiko.SSHException, ValueError, IndexError):
            return kind.from_private_key(io.StringIO(pem))
    raise BackendError("the host's registered key is not an unencrypted Ed25519, ECDSA or RSA private key")


def public_key(line: str) -> paramiko.PKey:
    parts = line.split()
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1], validate=True))
    except (IndexError, ValueError, paramiko.SSHException, UnknownKeyType) as e:
        # UnknownKeyType (a type paramiko cannot use, as `sk-ssh-ed25519@openssh.com`) is a plain Exception.
        raise BackendError(
            "the host's pinned key is not an OpenSSH public key line of a type it can pin (Ed25519, ECDSA, RSA)"
        ) from e


# -- what runs on the host --------------------------------------------------------------------------


def _apply(ssh: HostShell, replica_id: int, seat: Seat, rules: Sequence[Rule]) -> None:
    ssh.run("sudo -n nft -f -", "applying the replica's rules", stdin=rules_script(replica_id, seat, rules))


def _authorise(replica_id: int, line: str) -> str:
    """The replica's key line, tagged, in the login's authorized_keys: an older line of the same replica goes.
    Under a lock, since replicas placed on one host at once edit the same file (and the admin's own line in it
    must survive every edit)."""
    tag, q_line = shlex.quote(f"{KEY_TAG}{replica_id}"), shlex.quote(line)
    return (
        f'set -e; umask 077; mkdir -p ~/.ssh; f=~/.ssh/authorized_keys; touch "$f"; {_LOCK};'
        f' grep -qxF {q_line} "$f" && exit 0;'
        f' awk -v t={tag} \'$NF != t\' "$f" > "$f.$$"; echo {q_line} >> "$f.$$"; mv "$f.$$" "$f"'
    )


_LOCK = "exec 9>>~/.ssh/.orchestrator.lock && flock -w 30 9"
"""Serialises the edits of authorized_keys (`flock` is in util-linux, on every distribution)."""


def removal(replica_id: int) -> str:
    """Stops and removes the replica's unit, its container, its files, its key line and its rules; nothing there
    is fine. The container goes by its name (the unit's, `spec_command`'s `--name`): stopping the unit stops only
    the `docker run` client, and an engine that hangs on its signal would keep its container, GPUs and port."""
    unit, wd = shlex.quote(unit_name(replica_id)), shlex.quote(work_dir(replica_id))
    tag = shlex.quote(f"{KEY_TAG}{replica_id}")
    return (
        f"sudo -n systemctl disable --now {unit} >/dev/null 2>&1;"
        f" {{ ! command -v docker >/dev/null || timeout 60 sudo -n docker rm -f {unit} >/dev/null 2>&1; true; }};"
        f" sudo -n rm -f /etc/systemd/system/{unit}.service"
        f" && sudo -n systemctl daemon-reload && {{ sudo -n systemctl reset-failed {unit} 2>/dev/null; true; }}"
        f" && sudo -n rm -rf {wd}"
        f' && f=~/.ssh/authorized_keys && {{ ! [ -f "$f" ] || {{ {_LOCK} && awk -v t={tag} \'$NF != t\' "$f" > "$f.$$"'
        f' && mv "$f.$$" "$f"; }}; }}'
        f" && sudo -n nft -f - <<'EOF'\nadd table inet {table_name(replica_id)}\ndelete table inet "
        f"{table_name(replica_id)}\nEOF"
    )


INVENTORY = (
    "awk '{print $NF}' ~/.ssh/authorized_keys 2>/dev/null; ls -1 " + WORK_ROOT + " 2>/dev/null;"
    " ls -1 /etc/systemd/system 2>/dev/null; sudo -n nft list tables 2>/dev/null;"
    " command -v docker >/dev/null && timeout 30 sudo -n docker ps -a --format '{{.Names}}' 2>/dev/null; true"
)
"""What a host holds of replicas: key lines, directories, units, tables and (where docker is) containers."""
_OWNED = re.compile(
    rf"^(?:{KEY_TAG}(\d+)|replica-(\d+)|{UNIT_PREFIX}(\d+)(?:\.service)?|table inet {TABLE_PREFIX}(\d+))$",
    re.MULTILINE,
)


def inventory_ids(out: str) -> set[int]:
    """The replica ids that `INVENTORY`'s output shows something of (a key, a directory, a unit, a table)."""
    return {int(next(g for g in m.groups() if g)) for m in _OWNED.finditer(out)}


def rules_script(replica_id: int, seat: Seat, rules: Sequence[Rule]) -> str:
    """The replica's table, replaced atomically. Its ingress is filtered twice, with the same lines in each chain:
    every rule as an accept line (its comment encodes it, for drift), then the reject of the engine port alone.
    `input` sees a call to an engine that listens on the host itself; `prerouting` at -150, before the DNAT of
    `docker run -p PORT:...` (dstnat, -100), sees a call that is then forwarded to a container and never meets
    `input`. There the reject is of calls to the host's own addresses only (`fib daddr type local`), so a
    container's outgoing connections to some other server's port of the same number pass."""
    name = table_name(replica_id)
    ordered = sorted(set(rules))
    ingress = [_line(r) for r in ordered if r.direction == "ingress"]
    egress = [_line(r) for r in ordered if r.direction == "egress"]
    reject = f'tcp dport {seat.engine_port} reject with tcp reset comment "{DENY}"'
    body = [
        "  chain ingress { type filter hook input priority 0; policy accept;",
        *(f"    {line}" for line in [*ingress, reject]),
        "  }",
        "  chain ingress_dnat { type filter hook prerouting priority -150; policy accept;",
        *(f"    {line}" for line in [*ingress, f"fib daddr type local {reject}"]),
        "  }",
        "  chain egress { type filter hook output priority 0; policy accept;",
        *(f"    {line}" for line in egress),
        "  }",
    ]
    return f"add table inet {name}\ndelete table inet {name}\ntable inet {name} {{\n" + "\n".join(body) + "\n}\n"


_REJECTS = 2
"""One per ingress chain: a table with fewer (a foreign one, or one written before `prerouting` was filtered)
reads as open, so the drift sweep writes it anew."""


def _line(rule: Rule) -> str:
    family = "ip" if rule.ethertype == "IPv4" else "ip6"
    peer = "saddr" if rule.direction == "ingress" else "daddr"
    ports = f"{rule.port_range_min}-{rule.port_range_max}"
    return f'{family} {peer} {rule.remote_ip_prefix} {rule.protocol} dport {ports} accept comment "{encode_rule(rule)}"'


def read_rules(listing: str) -> frozenset[Rule]:
    """The rules of a replica's table (`nft -j list table`); a missing reject or a line this module did not
    write reads as open to all."""
    rules: set[Rule] = set()
    rejects = 0
    for item in json.loads(listing).get("nftables", []):
        if "rule" not in item:
            continue
        comment = str(item["rule"].get("comment", ""))
        if comment == DENY:
            rejects += 1
            continue
        rules.add(decode_rule(comment) or OPEN_TO_ALL)
    return frozenset(rules if rejects == _REJECTS else {*rules, OPEN_TO_ALL})
