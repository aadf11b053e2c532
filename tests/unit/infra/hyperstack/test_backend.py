"""The Hyperstack backend's own work: a missing Pulumi CLI, the per-stack lock and the cap, Pulumi errors, and the
VMs found by their replica and deployment labels (the fake Hyperstack API stands in for the cloud)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from pulumi import automation as auto

from infra.hyperstack import HyperstackBackend, HyperstackConfig
from infra.hyperstack.backend import CLI_MISSING, command_error_summary, pulumi_errors
from infra.vm import BackendError, BackendUnavailable, Rule, VmHandle, VmRequest
from tests.support.fake_hyperstack import FakeHyperstack, Scripted, running_fake_hyperstack
from tests.support.vm import vm_request

RULE = Rule("ingress", "tcp", "IPv4", "198.51.100.7/32", 22, 22)
DEPLOYMENTS_OF_BOTH = ("orchestrator-deployment=production", "orchestrator-deployment=staging")


def request(replica_id: int) -> VmRequest:
    return vm_request(replica_id, (RULE,))


def config(tmp_path: Path, **overrides: Any) -> HyperstackConfig:
    return HyperstackConfig(**({"api_key": "hs-key", "state_dir": tmp_path / "state", "passphrase": "pw"} | overrides))


@pytest.fixture
def cloud() -> Iterator[FakeHyperstack]:
    """The fake Hyperstack API, with the key `config` gives: what `owned` and `destroy` list and delete VMs on.

    A test asks for it before `in_threads`, so that it outlives the threads (fixtures end in reverse order).
    """
    with running_fake_hyperstack(FakeHyperstack(api_key="hs-key")) as fake:
        yield fake


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


@dataclass
class GatedStacks:
    """A `StackRunner` whose `up` and `destroy` hold until the test opens the stack's gate; records overlaps."""

    outputs: Mapping[str, Any] = field(default_factory=lambda: {"vm_id": "101", "address": "203.0.113.101"})
    names: list[str] = field(default_factory=list)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    inside: list[str] = field(default_factory=list)
    """Stack names of the operations running now, in the order they entered."""
    max_inside: int = 0
    same_stack_overlap: bool = False
    finished: list[str] = field(default_factory=list)
    programs: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def gate(self, stack_name: str) -> threading.Event:
        with self._lock:
            return self.gates.setdefault(stack_name, threading.Event())

    def up(self, stack_name: str, program: Callable[[], None]) -> Mapping[str, Any]:
        self.programs.append(program)
        self._run(stack_name)
        return self.outputs

    def destroy(self, stack_name: str) -> None:
        self._run(stack_name)

    def stack_names(self) -> list[str]:
        return list(self.names)

    def _run(self, stack_name: str) -> None:
        with self._lock:
            self.same_stack_overlap |= stack_name in self.inside
            self.inside.append(stack_name)
            self.max_inside = max(self.max_inside, len(self.inside))
        assert self.gate(stack_name).wait(timeout=10), f"the test never opened {stack_name}"
        with self._lock:
            self.inside.remove(stack_name)
            self.finished.append(stack_name)


@pytest.fixture
def in_threads() -> Iterator[Callable[[Callable[[], object]], threading.Thread]]:
    threads: list[threading.Thread] = []

    def start(fn: Callable[[], object]) -> threading.Thread:
        thread = threading.Thread(target=fn, daemon=True)
        thread.start()
        threads.append(thread)
        return thread

    yield start
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()


# -- without the Pulumi CLI


@pytest.fixture
def no_pulumi_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.mark.usefixtures("no_pulumi_on_path")
@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda b: b.up(request(7)), id="up"),
        pytest.param(lambda b: b.apply_rules(request(7), [RULE]), id="apply_rules"),
        pytest.param(lambda b: b.destroy(7), id="destroy"),
        pytest.param(lambda b: b.owned(), id="owned"),
    ],
)
def test_without_the_pulumi_cli_every_operation_says_so(
    tmp_path: Path, operation: Callable[[HyperstackBackend], object]
) -> None:
    backend = HyperstackBackend(config(tmp_path))

    with pytest.raises(BackendUnavailable) as caught:
        operation(backend)

    assert str(caught.value) == CLI_MISSING
    assert "the Pulumi CLI is not on PATH" in str(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_without_an_api_key_the_backend_is_unavailable(tmp_path: Path) -> None:
    backend = HyperstackBackend(config(tmp_path, api_key=""))

    with pytest.raises(BackendUnavailable, match="HYPERSTACK_API_KEY is empty"):
        backend.up(request(7))


def test_config_keeps_secrets_out_of_its_repr(tmp_path: Path) -> None:
    text = repr(config(tmp_path, api_key="hs-very-secret", passphrase="pass-very-secret"))

    assert "very-secret" not in text
    assert "state_dir" in text


# -- with a fake stack runner


def test_up_runs_the_replica_stack_and_returns_its_handle(tmp_path: Path) -> None:
    stacks = GatedStacks()
    stacks.gate("replica-7").set()

    handle = HyperstackBackend(config(tmp_path, ssh_user="ubuntu"), stacks=stacks).up(request(7))

    assert handle == VmHandle(7, "101", "203.0.113.101", 22, "ubuntu")
    assert stacks.finished == ["replica-7"]
    assert len(stacks.programs) == 1


def test_up_without_outputs_is_a_backend_error(tmp_path: Path) -> None:
    stacks = GatedStacks(outputs={"vm_id": "101"})
    stacks.gate("replica-7").set()

    with pytest.raises(BackendError, match="stack replica-7 has no vm_id/address output"):
        HyperstackBackend(config(tmp_path), stacks=stacks).up(request(7))


def test_owned_reads_replica_ids_from_stack_names(tmp_path: Path, cloud: FakeHyperstack) -> None:
    stacks = GatedStacks(names=["replica-3", "replica-12", "staging", "replica-x", "replica-"])

    assert HyperstackBackend(config(tmp_path, base_url=cloud.base_url), stacks=stacks).owned() == {3, 12}


def test_operations_on_one_stack_never_overlap(tmp_path: Path, cloud: FakeHyperstack, in_threads: Any) -> None:
    stacks = GatedStacks()
    backend = HyperstackBackend(config(tmp_path, base_url=cloud.base_url, max_concurrent_ups=3), stacks=stacks)

    in_threads(lambda: backend.up(request(7)))
    wait_until(lambda: stacks.inside == ["replica-7"], "the first up runs")
    in_threads(lambda: backend.destroy(7))
    in_threads(lambda: backend.up(request(8)))  # another stack is not held up
    wait_until(lambda: "replica-8" in stacks.inside, "replica 8 runs beside replica 7")
    stacks.gate("replica-8").set()
    stacks.gate("replica-7").set()
    wait_until(lambda: len(stacks.finished) == 3, "all three end")

    assert not stacks.same_stack_overlap
    assert stacks.finished.count("replica-7") == 2


def test_a_caller_queued_on_its_stack_holds_no_slot(tmp_path: Path, in_threads: Any) -> None:
    stacks = GatedStacks()
    backend = HyperstackBackend(config(tmp_path, max_concurrent_ups=2), stacks=stacks)

    in_threads(lambda: backend.up(request(7)))
    wait_until(lambda: stacks.inside == ["replica-7"], "replica 7 runs")
    in_threads(lambda: backend.apply_rules(request(7), [RULE]))  # waits for replica 7's lock, not for a slot
    in_threads(lambda: backend.up(request(8)))

    wait_until(lambda: stacks.inside == ["replica-7", "replica-8"], "replica 8 takes the second slot")
    stacks.gate("replica-7").set()
    stacks.gate("replica-8").set()
    wait_until(lambda: len(stacks.finished) == 3, "all three end")


def test_at_most_max_concurrent_ups_run_at_once(tmp_path: Path, in_threads: Any) -> None:
    stacks = GatedStacks()
    backend = HyperstackBackend(config(tmp_path, max_concurrent_ups=2), stacks=stacks)
    started: list[int] = []

    def up(replica_id: int) -> None:
        started.append(replica_id)
        backend.up(request(replica_id))

    for replica_id in range(1, 6):
        in_threads(lambda r=replica_id: up(r))
    wait_until(lambda: len(started) == 5 and len(stacks.inside) == 2, "two run and three wait")
    for replica_id in range(1, 6):  # open the gates one by one: each opening lets exactly one more in
        stacks.gate(f"replica-{replica_id}").set()
    wait_until(lambda: len(stacks.finished) == 5, "all five end")

    assert stacks.max_inside == 2


def test_max_concurrent_ups_must_allow_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HyperstackBackend(config(tmp_path, max_concurrent_ups=0), stacks=GatedStacks())


# -- VMs found by their replica label, whatever the stacks say


def test_owned_finds_a_labelled_vm_whose_stack_was_lost(tmp_path: Path, cloud: FakeHyperstack) -> None:
    cloud.add_vm_directly("llama-9", ["team=ml", "orchestrator-replica=9"])  # no stack: its state was lost
    cloud.add_vm_directly("users-own", [])
    cloud.add_vm_directly("users-labelled", ["team=ml", "orchestrator-replica=x", "orchestrator-replica-5"])
    cloud.add_vm_directly("on-its-way-out", ["orchestrator-replica=4"], status="DELETING")
    stacks = GatedStacks(names=["replica-3"])

    owned = HyperstackBackend(config(tmp_path, base_url=cloud.base_url), stacks=stacks).owned()

    assert owned == {3, 9}


def test_destroy_deletes_every_vm_still_labelled_with_the_replica(tmp_path: Path, cloud: FakeHyperstack) -> None:
    orphans = {cloud.add_vm_directly(f"llama-9-{i}", ["orchestrator-replica=9"]) for i in range(2)}
    kept = {
        cloud.add_vm_directly("llama-10", ["orchestrator-replica=10"]),
        cloud.add_vm_directly("users-own", ["team=ml"]),
        cloud.add_vm_directly("llama-99", ["orchestrator-replica=99"]),  # a prefix of another id is not it
    }
    stacks = GatedStacks()
    stacks.gate("replica-9").set()
    backend = HyperstackBackend(config(tmp_path, base_url=cloud.base_url), stacks=stacks)

    backend.destroy(9)

    assert stacks.finished == ["replica-9"]  # the stack first, as before
    assert set(cloud.vms) == kept
    assert sorted(path for method, path in cloud.requests if method == "DELETE") == sorted(
        f"/core/virtual-machines/{vm_id}" for vm_id in orphans
    )
    assert backend.owned() == {10, 99}
    backend.destroy(9)  # nothing left: done
    assert set(cloud.vms) == kept


def test_destroy_takes_a_labelled_vm_gone_meanwhile_as_done(tmp_path: Path, cloud: FakeHyperstack) -> None:
    vm_id = cloud.add_vm_directly("llama-9", ["orchestrator-replica=9"])
    cloud.script("DELETE", f"/core/virtual-machines/{vm_id}", Scripted(404))  # deleted between the list and here
    stacks = GatedStacks()
    stacks.gate("replica-9").set()

    HyperstackBackend(config(tmp_path, base_url=cloud.base_url), stacks=stacks).destroy(9)

    assert cloud.count("DELETE", f"/core/virtual-machines/{vm_id}") == 1


def test_destroy_leaves_a_vm_already_being_deleted_alone(tmp_path: Path, cloud: FakeHyperstack) -> None:
    vm_id = cloud.add_vm_directly("llama-9", ["orchestrator-replica=9"], status="DELETING")
    stacks = GatedStacks()
    stacks.gate("replica-9").set()

    HyperstackBackend(config(tmp_path, base_url=cloud.base_url), stacks=stacks).destroy(9)

    assert cloud.count("DELETE", f"/core/virtual-machines/{vm_id}") == 0


# -- deployments sharing one cloud account


def test_owned_counts_only_vms_of_its_own_deployment(tmp_path: Path, cloud: FakeHyperstack) -> None:
    cloud.add_vm_directly("prod-9", ["orchestrator-replica=9", "orchestrator-deployment=production"])
    cloud.add_vm_directly("staging-5", ["orchestrator-replica=5", "orchestrator-deployment=staging"])
    cloud.add_vm_directly("both-6", ["orchestrator-replica=6", *DEPLOYMENTS_OF_BOTH])  # claimed twice: by neither
    cloud.add_vm_directly("old-4", ["orchestrator-replica=4"])  # made before deployment labels

    def owned(deployment: str) -> frozenset[int]:
        backend = HyperstackBackend(config(tmp_path, base_url=cloud.base_url, deployment=deployment), GatedStacks())
        return backend.owned()

    assert owned("production") == {9}
    assert owned("staging") == {5}


def test_a_vm_without_a_deployment_label_is_the_default_deployments(tmp_path: Path, cloud: FakeHyperstack) -> None:
    cloud.add_vm_directly("old-4", ["orchestrator-replica=4"])
    cloud.add_vm_directly("new-5", ["orchestrator-replica=5", "orchestrator-deployment=default"])
    cloud.add_vm_directly("staging-6", ["orchestrator-replica=6", "orchestrator-deployment=staging"])

    assert HyperstackBackend(config(tmp_path, base_url=cloud.base_url), GatedStacks()).owned() == {4, 5}


def test_destroy_deletes_only_the_vm_of_its_own_deployment(tmp_path: Path, cloud: FakeHyperstack) -> None:
    ours = cloud.add_vm_directly("prod-9", ["orchestrator-replica=9", "orchestrator-deployment=production"])
    kept = {
        cloud.add_vm_directly("staging-9", ["orchestrator-replica=9", "orchestrator-deployment=staging"]),
        cloud.add_vm_directly("old-9", ["orchestrator-replica=9"]),  # the default deployment's
        cloud.add_vm_directly("both-9", ["orchestrator-replica=9", *DEPLOYMENTS_OF_BOTH]),
    }
    stacks = GatedStacks()
    stacks.gate("replica-9").set()

    HyperstackBackend(config(tmp_path, base_url=cloud.base_url, deployment="production"), stacks).destroy(9)

    assert set(cloud.vms) == kept
    assert cloud.count("DELETE", f"/core/virtual-machines/{ours}") == 1


def test_the_default_deployment_destroys_a_vm_without_a_deployment_label(tmp_path: Path, cloud: FakeHyperstack) -> None:
    old = cloud.add_vm_directly("old-9", ["orchestrator-replica=9"])
    staging = cloud.add_vm_directly("staging-9", ["orchestrator-replica=9", "orchestrator-deployment=staging"])
    stacks = GatedStacks()
    stacks.gate("replica-9").set()

    HyperstackBackend(config(tmp_path, base_url=cloud.base_url), stacks).destroy(9)

    assert set(cloud.vms) == {staging}
    assert cloud.count("DELETE", f"/core/virtual-machines/{old}") == 1


@pytest.mark.parametrize("deployment", ["", "Prod", "2nd", "prod_1", "p" * 41])
def test_a_deployment_name_that_cannot_be_a_label_is_refused(tmp_path: Path, deployment: str) -> None:
    with pytest.raises(ValueError, match="deployment must match"):
        HyperstackBackend(config(tmp_path, deployment=deployment), stacks=GatedStacks())


def test_up_labels_the_vm_with_the_deployment(tmp_path: Path) -> None:
    stacks = GatedStacks()
    stacks.gate("replica-7").set()

    HyperstackBackend(config(tmp_path, deployment="staging"), stacks=stacks).up(request(7))

    with patch("infra.hyperstack.backend.replica_program") as program:
        stacks.programs[0]()  # what Pulumi runs: the replica's program, told the deployment
    assert program.call_args.args[1:] == ((RULE,), "staging")


def test_owned_when_the_cloud_cannot_be_listed_is_a_backend_error(tmp_path: Path, cloud: FakeHyperstack) -> None:
    stacks = GatedStacks(names=["replica-3"])
    backend = HyperstackBackend(config(tmp_path, base_url=cloud.base_url, api_key="not-the-key"), stacks=stacks)

    with pytest.raises(BackendError, match="401"):
        backend.owned()


# -- Pulumi's errors


def command_error(kind: type[auto.CommandError], stdout: str = "", stderr: str = "") -> auto.CommandError:
    return kind(auto.CommandResult(stdout=stdout, stderr=stderr, code=255))


def test_a_locked_stack_is_a_clear_backend_error() -> None:
    error = command_error(auto.ConcurrentUpdateError, stderr="error: the stack is currently locked by 1 lock(s)")

    locked = r"^stack replica-7 is locked by another Pulumi update"
    with pytest.raises(BackendError, match=locked) as caught, pulumi_errors("replica-7", "up"):
        raise error
    assert caught.value.__cause__ is error


def test_a_provider_failure_is_summarised_on_one_line() -> None:
    stdout = (
        "Updating (replica-7):\n"
        "    pulumi-python:dynamic/hyperstack:Vm (replica-7-vm):\n"
        "      error: Exception calling application: Traceback (most recent call last):\n"
        '        File "/srv/infra/hyperstack/provider.py", line 120, in create\n'
        "      infra.hyperstack.api.VmNotActive: Hyperstack VM 101 went to ERROR while being created\n"
        "Resources:\n    1 unchanged\n"
    )
    error = command_error(auto.CommandError, stdout=stdout, stderr="error: update failed")

    with pytest.raises(BackendError) as caught, pulumi_errors("replica-7", "up"):
        raise error

    assert (
        str(caught.value) == "pulumi up of stack replica-7 failed: Hyperstack VM 101 went to ERROR while being created"
    )


def test_a_cli_error_without_a_traceback_keeps_its_error_line() -> None:
    error = command_error(
        auto.CommandError, stdout="Previewing update (replica-7):\n", stderr="error: passphrase must be set\n"
    )
    generic = command_error(auto.CommandError, stderr="error: update failed\nerror: getting secrets manager: bad\n")

    assert command_error_summary(error) == "passphrase must be set"
    assert command_error_summary(generic) == "getting secrets manager: bad"


def test_a_missing_file_other_than_the_cli_is_not_called_a_missing_cli() -> None:
    with pytest.raises(BackendError) as caught, pulumi_errors("replica-7", "up"):
        raise FileNotFoundError(2, "No such file or directory", "/state/pulumi/replica-7/Pulumi.yaml")

    assert not isinstance(caught.value, BackendUnavailable)
    assert "Pulumi.yaml" in str(caught.value)
