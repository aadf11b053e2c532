"""SSH sessions to replica VMs: connect with the pinned host key (retried until a deadline), run, write files."""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Never, Self

import paramiko
from tenacity import Retrying, retry_if_exception_type, stop_before_delay, wait_exponential

from provisioning.errors import CommandFailed, HostKeyMismatch, SshError, SshUnreachable
from provisioning.ssh_keys import generate_keypair, load_private_key, parse_public_key

__all__ = [
    "CommandFailed",
    "CommandResult",
    "HostKeyMismatch",
    "SshError",
    "SshSession",
    "SshTarget",
    "SshUnreachable",
    "connect",
    "generate_keypair",
]

OUTPUT_CAP = 8 * 1024  # bytes of command output kept (the tail: that is where errors are)
DROPPED_MARK = "bytes of output dropped]"  # ends the first line of a capped output
_SSH_PORT = 22
AUTH_ATTEMPTS = 3  # a refused client key is tried this often before the refusal is believed
CLOSE_WAIT_S = 2.0  # how long closing waits for the server to end the TCP connection too
# Socket errors no retry can cure: the source address is not ours, or the address family is wrong.
_PERMANENT_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL})
_MIN_ATTEMPT_S = 0.5  # the last attempt before the deadline still gets time for a handshake


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in, with the host key pinned before first contact."""

    host: str
    port: int
    username: str
    host_key: str  # pinned OpenSSH public line, e.g. "ssh-ed25519 AAAA..." (comment optional)
    client_key: str = field(repr=False)  # OpenSSH-format Ed25519 private key PEM
    # Bind the client socket here: firewall rules tell the orchestrator from the gateway by source address.
    source_address: str | None = None


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    output: str  # stdout and stderr interleaved, the last OUTPUT_CAP bytes


class _Retryable(Exception):
    """An attempt failed in a way another attempt may not (refused, timed out, sshd still starting)."""


class _KeyRefused(Exception):
    """The host with the pinned key did not accept the client key."""


class _PinnedKeyPolicy(paramiko.RejectPolicy):
    """RejectPolicy that says so with our own error (the plain one raises a bare SSHException)."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> Never:
        raise HostKeyMismatch(f"{hostname} presented {key.get_name()} {key.fingerprint}, not the pinned key")


class SshSession:
    """A connected, authenticated session; close it (or use it as a context manager)."""

    def __init__(self, client: paramiko.SSHClient) -> None:
        self._client = client
        self._sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def run(self, command: str, *, timeout_s: float = 60.0, stdin: bytes | None = None) -> CommandResult:
        """Runs `command` in the login shell; a non-zero exit is a result, only a timeout raises CommandFailed."""
        name = command.split(maxsplit=1)[0][:40] if command.strip() else "command"
        deadline = time.monotonic() + timeout_s
        try:
            chan = self._transport().open_session(timeout=timeout_s)
            try:
                chan.set_combine_stderr(True)
                chan.settimeout(timeout_s)
                chan.exec_command(command)
                if stdin:
                    chan.sendall(stdin)
                chan.shutdown_write()  # the command sees end of input instead of waiting for more
                output, finished = _read_until_eof(chan, deadline)
                if not (finished and chan.status_event.wait(max(deadline - time.monotonic(), 0.0))):
                    raise CommandFailed(name, None, output)
                return CommandResult(chan.recv_exit_status(), output)
            finally:
                chan.close()
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"session lost while running {name}: {e}") from e

    def write_file(self, path: str, content: bytes, mode: int = 0o600) -> None:
        """Replaces `path` atomically by SFTP, so the content never appears on a command line."""
        tmp = f"{path}.tmp"
        try:
            if self._sftp is None:
                self._transport()
                self._sftp = self._client.open_sftp()
            with self._sftp.open(tmp, "wb") as f:
                f.chmod(mode)  # before any content: a secret never sits in a file others can read
                f.write(content)
            self._sftp.posix_rename(tmp, path)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SshError(f"could not write {path}: {e}") from e

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        transport = self._client.get_transport()
        sock = getattr(transport, "sock", None) if transport is not None else None
        held = sock.dup() if isinstance(sock, socket.socket) and sock.fileno() >= 0 else None
        self._client.close()
        if held is not None:
            _close_gracefully(held)

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SshError("the SSH session is closed")
        return transport


def connect(target: SshTarget, *, deadline_s: float = 300.0, attempt_timeout_s: float = 10.0) -> SshSession:
    """An authenticated session to `target`, retrying while sshd is not up yet; blocks (run it in a thread)."""
    host_key = parse_public_key(target.host_key)
    client_key = load_private_key(target.client_key)
    started = time.monotonic()

    refusals = 0

    def attempt() -> paramiko.SSHClient:
        nonlocal refusals
        remaining = started + deadline_s - time.monotonic()
        try:
            return _attempt(target, host_key, client_key, min(attempt_timeout_s, max(remaining, _MIN_ATTEMPT_S)))
        except _KeyRefused as e:
            # paramiko reports an sshd that dropped the connection during authentication (a machine busy
            # booting) as a refusal too: tried again a few times, then taken for a real one.
            refusals += 1
            if refusals >= AUTH_ATTEMPTS:
                raise SshUnreachable(str(e)) from e
            raise _Retryable(f"{e} (attempt {refusals} of {AUTH_ATTEMPTS})") from e

    retrying = Retrying(
        retry=retry_if_exception_type(_Retryable),
        stop=stop_before_delay(deadline_s),
        wait=wait_exponential(multiplier=0.05, max=2.0),  # 50 ms, 100 ms, ... capped at 2 s
        reraise=True,
    )
    try:
        return SshSession(retrying(attempt))
    except _Retryable as e:
        attempts = retrying.statistics.get("attempt_number", 1)
        elapsed = time.monotonic() - started
        raise SshUnreachable(
            f"{target.host}:{target.port} unreachable after {attempts} attempts in {elapsed:.1f}s: {e}"
        ) from e


def _attempt(
    target: SshTarget, host_key: paramiko.PKey, client_key: paramiko.PKey, timeout: float
) -> paramiko.SSHClient:
    sock = _open_socket(target, timeout)
    client = paramiko.SSHClient()
    # Only the pinned key is known, under the name paramiko looks up; no system known_hosts is loaded.
    known_as = target.host if target.port == _SSH_PORT else f"[{target.host}]:{target.port}"
    client.get_host_keys().add(known_as, host_key.get_name(), host_key)
    client.set_missing_host_key_policy(_PinnedKeyPolicy())
    connected = False
    try:
        client.connect(
            target.host,
            port=target.port,
            username=target.username,
            pkey=client_key,
            sock=sock,
            timeout=timeout,  # with sock= given, this bounds the key exchange
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
        connected = True
        return client
    except paramiko.BadHostKeyException as e:
        raise HostKeyMismatch(
            f"{known_as} presented {e.key.get_name()} {e.key.fingerprint}, pinned {e.expected_key.fingerprint}"
        ) from e
    except paramiko.AuthenticationException as e:
        # The pinned host answered and refused our key, which waiting rarely changes: see AUTH_ATTEMPTS.
        raise _KeyRefused(f"{known_as} refused the client key for {target.username!r}") from e
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from e
    finally:
        if not connected:
            client.close()
            sock.close()


def _close_gracefully(sock: socket.socket) -> None:
    """Send our FIN and wait (briefly) for the server's: the connection is then over on both ends, so a rule
    change right after (SSH closed at SECURING) cannot strand the VM's end of it, retransmitting its FIN."""
    with contextlib.suppress(OSError), sock:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(CLOSE_WAIT_S)
        while sock.recv(4096):
            pass


def _open_socket(target: SshTarget, timeout: float) -> socket.socket:
    source = (target.source_address, 0) if target.source_address else None
    try:
        sock = socket.create_connection((target.host, target.port), timeout=timeout, source_address=source)
    except OSError as e:
        if e.errno in _PERMANENT_ERRNOS:
            raise SshError(f"cannot connect to {target.host} from {target.source_address}: {e.strerror}") from e
        raise _Retryable(f"{type(e).__name__}: {e}") from e
    # SSH requests are small request/reply exchanges: Nagle plus delayed ACKs add ~40 ms to each channel open.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_eof(chan: paramiko.Channel, deadline: float) -> tuple[str, bool]:
    """The output's last OUTPUT_CAP bytes, and whether end of output came before the deadline."""
    buf = bytearray()
    dropped = 0
    finished = False
    while (remaining := deadline - time.monotonic()) > 0:
        chan.settimeout(remaining)
        try:
            data = chan.recv(32768)
        except TimeoutError:
            break
        if not data:
            finished = True
            break
        buf += data
        if len(buf) > 2 * OUTPUT_CAP:  # trim in batches, not on every chunk
            dropped += len(buf) - OUTPUT_CAP
            del buf[:-OUTPUT_CAP]
    if len(buf) > OUTPUT_CAP:
        dropped += len(buf) - OUTPUT_CAP
        del buf[:-OUTPUT_CAP]
    text = bytes(buf).decode(errors="replace")
    return (f"[{dropped} {DROPPED_MARK}\n{text}" if dropped else text), finished
