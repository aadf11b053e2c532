"""Golden tests of the bootstrap steps per service kind (quoting, no secret in commands), and the runner on fakes."""

from __future__ import annotations

import hashlib
import shlex
from typing import cast

import pytest

from provisioning.bootstrap import EnginePlan, Step, StepReport, bootstrap, plan_steps
from provisioning.errors import CommandFailed
from provisioning.plan import engine_commands, env_file, run_script, systemd_unit
from provisioning.ssh import DROPPED_MARK, CommandResult, SshSession

SECRET = "sk-replica-'quoted' $HOME `id` \"x\"\nline2"
ARGV = ("vllm", "serve", "org/model", "--host", "0.0.0.0", "--port", "8000")


def make_plan(**overrides: object) -> EnginePlan:
    fields: dict[str, object] = {
        "serve_argv": ARGV,
        "secret_env": {"VLLM_API_KEY": SECRET},
        "work_dir": "/opt/engine",
        "service": "pidfile",
    }
    return EnginePlan(**(fields | overrides))  # type: ignore[arg-type]


def file_check(path: str, mode: str) -> str:
    return (
        f'read -r want && test "$(stat -c %a {path} 2>/dev/null)" = {mode}'
        f' && test "$({{ sha256sum < {path}; }} 2>/dev/null | cut -c1-64)" = "$want"'
    )


RUNNING_FN = (
    'running() { pid=$(cat /opt/engine/engine.pid 2>/dev/null) && [ "$pid" -gt 0 ] 2>/dev/null'
    ' && [ "$(sed \'s/.*) //;s/ .*//\' /proc/$pid/stat 2>/dev/null)" != Z ] && kill -0 "$pid" 2>/dev/null; }'
)
START = (
    "cd /opt/engine || exit 1; setsid nohup /bin/sh /opt/engine/run.sh >> /opt/engine/engine.log 2>&1"
    " < /dev/null & echo $! > /opt/engine/engine.pid"
)
STOP = (
    f'{RUNNING_FN}; if running; then kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid"; i=0;'
    " while running && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done;"
    ' if running; then kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid"; fi; fi; rm -f /opt/engine/engine.pid'
)
COMMON = [
    ("gpu", "nvidia-smi -L", None, False),
    ("work_dir", "test -d /opt/engine", "mkdir -p -m 0700 /opt/engine", False),
    ("install", "command -v vllm", "python3 -m pip install vllm", False),
    ("env_file", file_check("/opt/engine/engine.env", "600"), None, False),
    ("service_file", file_check("/opt/engine/run.sh", "700"), None, False),
]
UNIT = "/etc/systemd/system/orchestrator-engine.service"


def golden(steps: list[Step]) -> list[tuple[str, str, str | None, bool]]:
    return [(s.name, s.check, s.apply, s.rerun) for s in steps]


def test_pidfile_steps() -> None:
    assert golden(plan_steps(make_plan(service="pidfile"))) == [
        *COMMON,
        (
            "start",
            f"{RUNNING_FN}; running && [ -f /opt/engine/engine.pid ]"
            " && ! [ /opt/engine/engine.env -nt /opt/engine/engine.pid ]"
            " && ! [ /opt/engine/run.sh -nt /opt/engine/engine.pid ]",
            f"{STOP}; {START}",
            True,
        ),
        (
            "verify",
            f"{RUNNING_FN}; running || {{ echo engine not running; tail -n 40 /opt/engine/engine.log 2>/dev/null;"
            " exit 1; }",
            None,
            False,
        ),
    ]


def test_systemd_steps() -> None:
    assert golden(plan_steps(make_plan(service="systemd"))) == [
        *COMMON,
        ("unit_file", file_check(UNIT, "644"), None, False),
        (
            "start",
            "systemctl is-enabled --quiet orchestrator-engine && systemctl is-active --quiet orchestrator-engine"
            " && [ -f /opt/engine/engine.started ]"
            " && ! [ /opt/engine/engine.env -nt /opt/engine/engine.started ]"
            " && ! [ /opt/engine/run.sh -nt /opt/engine/engine.started ]"
            f" && ! [ {UNIT} -nt /opt/engine/engine.started ]",
            "systemctl daemon-reload && systemctl enable orchestrator-engine && systemctl restart orchestrator-engine"
            " && touch /opt/engine/engine.started",
            True,
        ),
        (
            "verify",
            "systemctl is-active --quiet orchestrator-engine || { systemctl status --no-pager orchestrator-engine;"
            " journalctl -u orchestrator-engine -n 40 --no-pager; exit 1; }",
            None,
            False,
        ),
    ]


def test_files_their_modes_and_which_steps_restart_the_engine() -> None:
    plan = make_plan(service="systemd")
    steps = {s.name: s for s in plan_steps(plan)}
    files = {name: (s.file.path, s.file.mode) for name, s in steps.items() if s.file is not None}
    assert files == {
        "env_file": ("/opt/engine/engine.env", 0o600),
        "service_file": ("/opt/engine/run.sh", 0o700),
        "unit_file": (UNIT, 0o644),
    }
    assert steps["env_file"].file is not None
    assert steps["env_file"].file.sha256 == hashlib.sha256(env_file(plan.secret_env)).hexdigest()
    assert {n for n, s in steps.items() if s.feeds_engine} == {"install", "env_file", "service_file", "unit_file"}
    assert steps["install"].timeout_s >= 1800


def test_steps_without_gpu_check_and_with_custom_install() -> None:
    plan = make_plan(gpu_check=None, install_check="test -x /opt/sim", install="cp /src/sim /opt/sim")
    steps = plan_steps(plan)
    assert [s.name for s in steps] == ["work_dir", "install", "env_file", "service_file", "start", "verify"]
    assert (steps[1].check, steps[1].apply) == ("test -x /opt/sim", "cp /src/sim /opt/sim")


@pytest.mark.parametrize("service", ["pidfile", "systemd"])
def test_no_secret_in_any_command_or_repr(service: str) -> None:
    plan = make_plan(service=service)
    steps = plan_steps(plan)
    commands = [c for s in steps for c in (s.check, s.apply) if c is not None]
    commands += list(vars(engine_commands(plan)).values())
    for text in [*commands, repr(plan), repr(steps)]:
        assert "sk-replica" not in text
    # The env file is where the secret goes, and only there.
    assert [s.name for s in steps if s.file is not None and b"sk-replica" in s.file.content] == ["env_file"]


def test_env_file_quotes_values_for_the_shell() -> None:
    content = env_file({"B_KEY": "plain", "A_KEY": SECRET}).decode()
    lines = [line for line in content.splitlines(keepends=True) if not line.startswith("#")]
    # Sorted by name, each value one shell word that reads back exactly.
    assert "".join(lines).startswith("A_KEY=")
    assert shlex.split(content, comments=True) == [f"A_KEY={SECRET}", "B_KEY=plain"]


def test_run_script_quotes_odd_argv() -> None:
    argv = ("/usr/bin/engine", "--name", "it's", "$HOME", "`id`", "a b", "semi;colon", "", 'dq"')
    script = run_script(make_plan(serve_argv=argv)).decode()
    assert script.startswith("#!/bin/sh\n")
    exec_line = script.rstrip("\n").rsplit("\n", 1)[1]
    assert exec_line.startswith("exec ")
    assert tuple(shlex.split(exec_line)[1:]) == argv
    assert ". /opt/engine/engine.env" in script
    assert script.index("set -a") < script.index(". /opt/engine/engine.env") < script.index("set +a")
    assert "sk-replica" not in script


def test_systemd_unit_runs_the_script() -> None:
    unit = systemd_unit(make_plan(service="systemd")).decode()
    assert "ExecStart=/bin/sh /opt/engine/run.sh\n" in unit
    assert "WorkingDirectory=/opt/engine\n" in unit
    assert "WantedBy=multi-user.target" in unit
    assert "sk-replica" not in unit


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"serve_argv": ()}, "serve_argv"),
        ({"work_dir": "relative/dir"}, "work_dir"),
        ({"work_dir": "/opt/with space"}, "work_dir"),
        ({"unit_name": "bad unit;rm"}, "unit_name"),
        ({"secret_env": {"NOT-A-NAME": "x"}}, "secret_env"),
    ],
)
def test_invalid_plans_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_plan(**overrides)


# bootstrap's decisions, on a fake VM that knows which facts hold.


class FakeVm:
    """Answers a step's check by whether its fact holds; applying (or writing) a step's file makes it hold."""

    def __init__(self, plan: EnginePlan, holding: set[str], outputs: dict[str, str] | None = None) -> None:
        self.steps = plan_steps(plan)
        self.holding = set(holding)
        self.outputs = outputs or {}
        self.ran: list[str] = []

    def run(self, command: str, *, timeout_s: float = 60.0, stdin: bytes | None = None) -> CommandResult:
        self.ran.append(command)
        for step in self.steps:
            if command == step.apply:
                self.holding.add(step.name)
                return CommandResult(0, f"applied {step.name}\n")
            if command == step.check:
                held = step.name in self.holding
                return CommandResult(0 if held else 1, self.outputs.get(step.name, ""))
        raise AssertionError(f"unexpected command {command!r}")

    def write_file(self, path: str, content: bytes, mode: int = 0o600) -> None:
        self.ran.append(f"write {path}")
        self.holding |= {s.name for s in self.steps if s.file is not None and s.file.path == path}


def run_bootstrap(vm: FakeVm, plan: EnginePlan) -> list[StepReport]:
    return bootstrap(cast(SshSession, vm), plan)


ALL_FACTS = {"gpu", "work_dir", "install", "env_file", "service_file", "start", "verify"}


def test_a_vm_already_there_gets_only_checks() -> None:
    plan = make_plan()
    vm = FakeVm(plan, ALL_FACTS)
    reports = run_bootstrap(vm, plan)
    assert [r.changed for r in reports] == [False] * 7
    assert vm.ran == [s.check for s in plan_steps(plan)]


def test_a_new_install_restarts_an_engine_that_was_running() -> None:
    plan = make_plan()
    vm = FakeVm(plan, ALL_FACTS - {"install"})
    reports = run_bootstrap(vm, plan)
    assert [r.name for r in reports if r.changed] == ["install", "start"]
    start = next(s for s in plan_steps(plan) if s.name == "start")
    assert start.apply is not None
    assert vm.ran.count(start.apply) == 1  # applied although its check held: the engine must see the new install


def test_a_fresh_vm_gets_each_step_checked_applied_and_checked_again() -> None:
    plan = make_plan()
    vm = FakeVm(plan, {"gpu", "verify"})
    reports = run_bootstrap(vm, plan)
    assert [r.name for r in reports if r.changed] == ["work_dir", "install", "env_file", "service_file", "start"]
    steps = {s.name: s for s in plan_steps(plan)}
    env = steps["env_file"]
    assert env.file is not None
    i = vm.ran.index(f"write {env.file.path}")
    assert vm.ran[i - 1 : i + 2] == [env.check, f"write {env.file.path}", env.check]
    assert reports[3].output == "wrote /opt/engine/engine.env (mode 600)"


def test_a_secret_cut_by_the_output_cap_is_redacted_too() -> None:
    plan = make_plan()
    cut = f"[9000 {DROPPED_MARK}\n{SECRET[7:]} and then {shlex.quote(SECRET)} and {SECRET}\n"
    vm = FakeVm(plan, set(), outputs={"gpu": cut})
    with pytest.raises(CommandFailed) as caught:
        run_bootstrap(vm, plan)
    assert caught.value.output == f"[9000 {DROPPED_MARK}\n<redacted> and then <redacted> and <redacted>\n"
    assert caught.value.__cause__ is None
