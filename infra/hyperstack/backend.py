"""The `hyperstack` VM backend: one Pulumi stack `replica-<id>` per replica, driven through the Automation API.

Pulumi runs as the `pulumi` CLI in a subprocess and `Stack.up` blocks: the orchestrator calls this backend
from worker threads, a lock per stack serialises the operations on one replica and a semaphore caps how
many run at once. `StackRunner` is the seam between that bookkeeping and Pulumi itself.

A replica's VM also carries the labels `orchestrator-replica=<id>` and `orchestrator-deployment=<name>`: what the
backend owns is its stacks and every VM so labelled with its own deployment, so a VM whose stack state was lost is
still found by the orphan sweep and destroyed, and another deployment's VMs on the same cloud account are left alone.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pulumi import automation as auto

from infra.hyperstack.api import DEFAULT_BASE_URL, HyperstackClient, JsonObject, NotFoundError
from infra.hyperstack.program import DEPLOYMENT_NAME, deployment_of_label, replica_of_label, replica_program
from infra.hyperstack.provider import API_KEY_ENV, BASE_URL_ENV
from infra.vm import BackendError, BackendUnavailable, Rule, VmHandle, VmRequest

log = logging.getLogger(__name__)

STACK_PREFIX = "replica-"
DEFAULT_DEPLOYMENT = "default"
"""The deployment of a VM labelled before VMs carried a deployment label (see `belongs_to`)."""
GONE = frozenset({"DELETING", "DELETED"})
"""VM statuses on the way out: such a VM is neither owned any more nor deleted again."""
CLI_MISSING = (
    "the Pulumi CLI is not on PATH: install it (https://www.pulumi.com/docs/install/) "
    "to use ORCH_INFRA_BACKEND=hyperstack"
)


@dataclass(frozen=True, kw_only=True)
class HyperstackConfig:
    api_key: str = field(repr=False)
    """Hyperstack API key; reaches the Pulumi CLI (and its providers) as an environment variable only."""
    state_dir: Path
    """Holds the stacks' work dirs (`pulumi/<stack>`) and the file:// Pulumi backend (`pulumi-state`)."""
    passphrase: str = field(repr=False)
    """Encrypts the secrets in the Pulumi state (the passphrase secrets provider)."""
    base_url: str = DEFAULT_BASE_URL
    max_concurrent_ups: int = 3
    """How many Pulumi operations run at once (each is a CLI process and a Python provider process)."""
    ssh_user: str = "ubuntu"
    project_name: str = "orchestrator"
    api_timeout_s: float = 30.0
    """Timeout of each REST call the backend makes itself (`enforced_rules`, `owned`, `destroy`)."""
    deployment: str = DEFAULT_DEPLOYMENT
    """This orchestrator deployment's name (`ORCH_DEPLOYMENT`): its VMs are labelled with it, and the orphan sweep
    touches no VM labelled with another one."""

    @property
    def backend_url(self) -> str:
        return (self.state_dir / "pulumi-state").resolve().as_uri()


class StackRunner(Protocol):
    """The Pulumi operations the backend needs; `PulumiStacks` runs them, tests inject a fake."""

    def up(self, stack_name: str, program: Callable[[], None]) -> Mapping[str, Any]:
        """Create or select the stack, run `up` with the program; return the stack's outputs."""
        ...

    def destroy(self, stack_name: str) -> None:
        """Destroy the stack's resources and remove the stack; a stack that does not exist is done."""
        ...

    def stack_names(self) -> list[str]: ...


class PulumiStacks:
    """`StackRunner` over the Automation API: inline programs, a work dir per stack, file:// state."""

    def __init__(self, config: HyperstackConfig) -> None:
        self._config = config
        self._command: auto.PulumiCommand | None = None
        self._command_lock = threading.Lock()

    def up(self, stack_name: str, program: Callable[[], None]) -> Mapping[str, Any]:
        with pulumi_errors(stack_name, "up"):
            stack = auto.create_or_select_stack(
                stack_name=stack_name,
                project_name=self._config.project_name,
                program=program,
                opts=self._options(stack_name),
            )
            result = stack.up(color="never")
            return {name: output.value for name, output in result.outputs.items()}

    def destroy(self, stack_name: str) -> None:
        with pulumi_errors(stack_name, "destroy"):
            try:
                stack = auto.select_stack(
                    stack_name=stack_name,
                    project_name=self._config.project_name,
                    program=_no_program,  # destroy works from the state alone
                    opts=self._options(stack_name),
                )
            except auto.StackNotFoundError:
                return
            stack.destroy(color="never", remove=True)

    def stack_names(self) -> list[str]:
        with pulumi_errors("", "stack ls"):
            workspace = auto.LocalWorkspace(**vars(self._options("_workspace")))
            # DIY backends may answer "organization/<project>/<stack>".
            return [summary.name.rsplit("/", 1)[-1] for summary in workspace.list_stacks()]

    def _options(self, dir_name: str) -> auto.LocalWorkspaceOptions:
        c = self._config
        if not c.api_key:
            raise BackendUnavailable(f"{API_KEY_ENV} is empty: the hyperstack backend needs an API key")
        work_dir = c.state_dir / "pulumi" / dir_name
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (c.state_dir / "pulumi-state").mkdir(parents=True, exist_ok=True, mode=0o700)
        # The dynamic providers run in a Python the CLI starts: point it at this virtualenv, where `infra` is.
        runtime = auto.ProjectRuntimeInfo(
            "python", {"virtualenv": sys.prefix} if sys.prefix != sys.base_prefix else None
        )
        settings = auto.ProjectSettings(
            name=c.project_name, runtime=runtime, main=str(work_dir), backend=auto.ProjectBackend(c.backend_url)
        )
        return auto.LocalWorkspaceOptions(
            work_dir=str(work_dir),
            project_settings=settings,
            secrets_provider="passphrase",
            # Credentials travel in the environment: secret config values would end up on the CLI's argv.
            env_vars={
                API_KEY_ENV: c.api_key,
                BASE_URL_ENV: c.base_url,
                "PULUMI_CONFIG_PASSPHRASE": c.passphrase,
                "PULUMI_SKIP_UPDATE_CHECK": "true",
            },
            pulumi_command=self._pulumi_command(),
        )

    def _pulumi_command(self) -> auto.PulumiCommand:
        """Found (and its version checked) once; a missing CLI is looked for again at the next call."""
        with self._command_lock:
            if self._command is None:
                self._command = auto.PulumiCommand()
            return self._command


def _no_program() -> None:
    return None


@contextmanager
def pulumi_errors(stack_name: str, action: str) -> Iterator[None]:
    """Pulumi's exceptions leave as `BackendError`s with a one-line message (`stack_name` may be "")."""
    subject = f"pulumi {action}" + (f" of stack {stack_name}" if stack_name else "")
    try:
        yield
    except FileNotFoundError as e:
        if Path(str(e.filename)).name == "pulumi":
            raise BackendUnavailable(CLI_MISSING) from e
        raise BackendError(f"{subject}: {e}") from e
    except auto.InvalidVersionError as e:
        raise BackendUnavailable(f"the Pulumi CLI on PATH cannot be used: {one_line(str(e))}") from e
    except auto.ConcurrentUpdateError as e:
        locked = f"stack {stack_name} is" if stack_name else "a stack is"
        raise BackendError(f"{locked} locked by another Pulumi update (`pulumi cancel` if none runs)") from e
    except auto.CommandError as e:
        raise BackendError(f"{subject} failed: {command_error_summary(e)}") from e


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Unavailable|NotActive|Exception)\w*: (.+)$")
_GENERIC_ERROR = re.compile(r"^(update|preview|destroy|refresh) failed$")


def command_error_summary(error: auto.CommandError) -> str:
    """The line that says what went wrong, out of the CLI's stdout and stderr (which hold tracebacks)."""
    # str(error) is "code: N", "stdout: <first line>", ..., "stderr: <first line>", ...
    lines = [re.sub(r"^(code|stdout|stderr):\s*", "", line.strip()) for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.isdigit()]
    # A dynamic provider's exception arrives as a traceback whose last line is "<module>.<Class>: <message>".
    raised = [m.group(1) for line in lines if (m := _EXCEPTION_LINE.match(line))]
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    specific = [e for e in errors if not _GENERIC_ERROR.match(e)]
    summary = raised[-1:] or specific[:1] or errors[:1] or lines[-1:] or ["no output"]
    return one_line(summary[0])


def one_line(text: str) -> str:
    return " ".join(text.split())[:300]


class HyperstackBackend:
    """`VmBackend` for Hyperstack; `stacks` defaults to the real Pulumi driver."""

    ssh_port = 22

    def __init__(self, config: HyperstackConfig, stacks: StackRunner | None = None) -> None:
        if config.max_concurrent_ups < 1:
            raise ValueError("max_concurrent_ups must be at least 1")
        if not re.fullmatch(DEPLOYMENT_NAME, config.deployment):
            raise ValueError(f"deployment must match {DEPLOYMENT_NAME} (it is a label), not {config.deployment!r}")
        self.config = config
        self._stacks = stacks if stacks is not None else PulumiStacks(config)
        self._slots = threading.BoundedSemaphore(config.max_concurrent_ups)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def up(self, request: VmRequest) -> VmHandle:
        return self._converge(request, request.rules)

    def apply_rules(self, request: VmRequest, rules: Sequence[Rule]) -> None:
        self._converge(request, rules)

    def enforced_rules(self, handle: VmHandle) -> frozenset[Rule]:
        with self._client() as client:
            return enforced_rules_of(client.get_vm(handle.vm_id))

    def destroy(self, replica_id: int) -> None:
        """Destroy the replica's stack, then delete any VM of this deployment still labelled with the replica (its
        stack was lost).

        The VM's keypair is the admin's (`key_name`) and stays. So does the keypair `<key_name>-replica-<id>` of a
        lost stack made before VMs took the admin's keypair: keypairs carry no label, a name alone could match a
        keypair of the user's, and a keypair costs nothing.
        """
        name = stack_name(replica_id)
        with self._exclusive(name):
            self._stacks.destroy(name)
            with self._client() as client:
                for vm in client.list_vms():
                    if replica_id in labelled_replicas(vm, self.config.deployment):
                        delete_orphan_vm(client, vm, replica_id)

    def owned(self) -> frozenset[int]:
        """Replicas with a stack, or with a VM of this deployment labelled `orchestrator-replica=<id>` (whatever
        its stack)."""
        names = self._stacks.stack_names()
        stacked = {int(n.removeprefix(STACK_PREFIX)) for n in names if re.fullmatch(r"replica-\d+", n)}
        with self._client() as client:
            labelled = {rid for vm in client.list_vms() for rid in labelled_replicas(vm, self.config.deployment)}
        return frozenset(stacked | labelled)

    def _client(self) -> HyperstackClient:
        c = self.config
        return HyperstackClient(c.base_url, c.api_key, c.api_timeout_s)

    def _converge(self, request: VmRequest, rules: Sequence[Rule]) -> VmHandle:
        name = stack_name(request.replica_id)
        rule_set = tuple(rules)

        def program() -> None:
            replica_program(request, rule_set, self.config.deployment)

        with self._exclusive(name):
            outputs = self._stacks.up(name, program)
        vm_id, address = outputs.get("vm_id"), outputs.get("address")
        if not vm_id or not address:
            raise BackendError(f"stack {name} has no vm_id/address output after up (got {sorted(outputs)})")
        return VmHandle(request.replica_id, str(vm_id), str(address), self.ssh_port, self.config.ssh_user)

    @contextmanager
    def _exclusive(self, name: str) -> Iterator[None]:
        # The stack's own lock first, then a slot: a caller queued behind its replica's running update must not
        # sit on a slot that another replica could use.
        with self._lock_of(name), self._slots:
            yield

    def _lock_of(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())


def stack_name(replica_id: int) -> str:
    return f"{STACK_PREFIX}{replica_id}"


def labelled_replicas(instance: JsonObject, deployment: str) -> set[int]:
    """The replicas of `deployment` a VM's labels tie it to; none for a VM already being deleted."""
    labels = [str(label) for label in instance.get("labels") or []]
    if instance.get("status") in GONE or not belongs_to(labels, deployment):
        return set()
    return {rid for label in labels if (rid := replica_of_label(label)) is not None}


def belongs_to(labels: Sequence[str], deployment: str) -> bool:
    """Whether a VM with these labels is `deployment`'s: it carries that deployment's label and no other's.

    Migration: VMs made before deployments were labelled carry only `orchestrator-replica=<id>`. Such a VM is taken
    to be the `default` deployment's (the name every deployment had implicitly), never another's, so a deployment
    given a name of its own does not sweep them. On an account that several deployments shared before, at most one
    may stay `default`: the old VMs of the others get their own deployment's label only at their stack's next update
    (labels change in place), and until then the `default` one's sweep takes them for its own and deletes those of
    replica ids it does not know, so label them by hand (`orchestrator-deployment=<name>`) before it runs.
    """
    deployments = {d for label in labels if (d := deployment_of_label(label)) is not None}
    if not deployments:
        return deployment == DEFAULT_DEPLOYMENT
    return deployments == {deployment}


def delete_orphan_vm(client: HyperstackClient, instance: JsonObject, replica_id: int) -> None:
    """Delete a VM that outlived its replica's stack; one already gone (404) is done."""
    try:
        client.delete_vm(instance["id"])
    except NotFoundError:
        return
    log.warning(
        "deleted Hyperstack VM %s (%s) of replica %d: no stack held it",
        instance["id"],
        instance.get("name"),
        replica_id,
    )


_DIRECTIONS: dict[str, Literal["ingress", "egress"]] = {"ingress": "ingress", "egress": "egress"}
_ETHERTYPES: dict[str, Literal["IPv4", "IPv6"]] = {"ipv4": "IPv4", "ipv6": "IPv6"}
_PROTOCOLS: dict[str, tuple[Literal["tcp", "udp"], ...]] = {
    "tcp": ("tcp",),
    "udp": ("udp",),
    "any": ("tcp", "udp"),  # Hyperstack's "any protocol" allows at least what a tcp and a udp rule would
    "": ("tcp", "udp"),
}


def enforced_rules_of(instance: JsonObject) -> frozenset[Rule]:
    """A VM's security rules as `Rule`s; rules for other protocols (ICMP) cannot be expressed and are left out."""
    rules: set[Rule] = set()
    for live in instance.get("security_rules") or []:
        direction = _DIRECTIONS.get(str(live.get("direction")).lower())
        ethertype = _ETHERTYPES.get(str(live.get("ethertype")).lower())
        protocols = _PROTOCOLS.get(str(live.get("protocol") or "").lower(), ())
        if direction is None or ethertype is None:
            continue
        prefix = live.get("remote_ip_prefix") or ("0.0.0.0/0" if ethertype == "IPv4" else "::/0")
        low, high = live.get("port_range_min"), live.get("port_range_max")
        ports = (1 if low is None else int(low), 65535 if high is None else int(high))  # no range: every port
        rules.update(Rule(direction, p, ethertype, str(prefix), *ports) for p in protocols)
    return frozenset(rules)
