"""What a replica VM must hold to serve: the engine plan, and the pure steps (check, desired file, apply) it implies."""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ENV_FILE = "engine.env"
RUN_SCRIPT = "run.sh"
PID_FILE = "engine.pid"
LOG_FILE = "engine.log"
STARTED_STAMP = "engine.started"  # systemd: touched at each (re)start, to tell whether the engine saw its files
UNIT_DIR = "/etc/systemd/system"
CHECK_TIMEOUT_S = 60.0
INSTALL_TIMEOUT_S = 1800.0  # a first pip install of vLLM downloads gigabytes of wheels
STOP_GRACE_TENTHS = 300  # a pidfile engine gets 30 s after SIGTERM before SIGKILL
ENGINE_TIMEOUT_S = 90.0  # start, stop or restart, the stop grace included
LOG_LINES = 40

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Paths and unit names also go into systemd unit lines, whose quoting differs from the shell's: keep them plain.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/@+-]*")
_UNIT_NAME = re.compile(r"[A-Za-z0-9@._-]+")


@dataclass(frozen=True)
class EnginePlan:
    """How to install, configure and run the inference engine on one VM."""

    serve_argv: tuple[str, ...]  # the engine's command line WITHOUT any secret
    secret_env: Mapping[str, str] = field(repr=False)  # into a 0600 env file by SFTP; never on a command line
    work_dir: str  # on the VM: env file, run script, pid and log live here
    service: Literal["systemd", "pidfile"] = "systemd"  # "pidfile": setsid/nohup + pid file (sandbox, no systemd)
    gpu_check: str | None = "nvidia-smi -L"  # None: skip (sandbox)
    runtime_check: str | None = None  # e.g. that Docker has the NVIDIA runtime; None: skip
    install_check: str = "command -v vllm"  # exits 0 when the engine is installed
    install: str = "python3 -m pip install vllm"  # run only when install_check fails
    unit_name: str = "orchestrator-engine"
    sudo: bool = False
    """The login is not root (a cloud image's `ubuntu`): every step that needs root goes through `sudo -n`."""

    def __post_init__(self) -> None:
        if not self.serve_argv:
            raise ValueError("serve_argv is empty")
        if not _PLAIN_PATH.fullmatch(self.work_dir):
            raise ValueError(f"work_dir must be an absolute path of plain characters, not {self.work_dir!r}")
        if not _UNIT_NAME.fullmatch(self.unit_name):
            raise ValueError(f"unit_name {self.unit_name!r} is not a plain systemd unit name")
        for name in self.secret_env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"secret_env name {name!r} is not a shell variable name")

    @property
    def root(self) -> str:
        """The prefix of a command that needs root."""
        return "sudo -n " if self.sudo else ""


@dataclass(frozen=True)
class DesiredFile:
    path: str
    content: bytes = field(repr=False)  # the env file's content holds secrets
    mode: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass(frozen=True)
class Step:
    """One fact: `check` exits 0 when it holds; otherwise write `file` or run `apply`, then check again."""

    name: str
    check: str
    apply: str | None = None  # None and no file: the step only verifies, a failed check is an error
    file: DesiredFile | None = None  # written by SFTP when the check fails; the check reads its sha256 on stdin
    rerun: bool = False  # apply even though the check holds when an earlier step that feeds the engine changed
    feeds_engine: bool = False  # a change here is only seen by the engine after a restart
    timeout_s: float = CHECK_TIMEOUT_S


@dataclass(frozen=True)
class EngineCommands:
    running: str  # exits 0 when the engine runs
    # Exits 0 when it runs and started after its files last changed; so a bootstrap that died between writing
    # a file and restarting the engine still restarts it on the next run.
    current: str
    restart: str  # stops it if it runs, then starts it
    stop: str  # idempotent: succeeds when nothing runs
    verify: str  # like running, but prints diagnostics when it fails
    logs: str  # prints the engine's last LOG_LINES lines of output


def plan_steps(plan: EnginePlan) -> list[Step]:
    """The ordered steps that take a VM from anything to serving `plan`; pure, so golden-testable."""
    wd = shlex.quote(plan.work_dir)
    steps = [Step("sudo", SUDO_CHECK)] if plan.sudo else []
    steps += [Step(name, check) for name, check in (("gpu", plan.gpu_check), ("runtime", plan.runtime_check)) if check]
    if plan.sudo:  # made by root, owned by the login, which writes the engine's files into it by SFTP
        make_dir = Step(
            "work_dir", f"test -d {wd} && test -O {wd}", apply=f'sudo -n install -d -m 0700 -o "$(id -un)" {wd}'
        )
    else:
        make_dir = Step("work_dir", f"test -d {wd}", apply=f"mkdir -p -m 0700 {wd}")
    steps += [
        make_dir,
        Step("install", plan.install_check, apply=plan.install, feeds_engine=True, timeout_s=INSTALL_TIMEOUT_S),
        _file_step("env_file", DesiredFile(f"{plan.work_dir}/{ENV_FILE}", env_file(plan.secret_env), 0o600)),
    ]
    steps.append(_file_step("service_file", DesiredFile(f"{plan.work_dir}/{RUN_SCRIPT}", run_script(plan), 0o700)))
    if plan.service == "systemd" and plan.sudo:
        # The login cannot write /etc/systemd/system: the unit is written beside the engine, then installed as root.
        staged = f"{plan.work_dir}/{plan.unit_name}.service"
        steps.append(_file_step("unit_file", DesiredFile(staged, systemd_unit(plan), 0o644)))
        unit, q_staged = shlex.quote(unit_path(plan)), shlex.quote(staged)
        install = f"sudo -n install -m 0644 {q_staged} {unit}"
        steps.append(Step("unit_installed", f"cmp -s {q_staged} {unit}", apply=install, feeds_engine=True))
    elif plan.service == "systemd":
        steps.append(_file_step("unit_file", DesiredFile(unit_path(plan), systemd_unit(plan), 0o644)))
    commands = engine_commands(plan)
    steps += [
        Step("start", commands.current, apply=commands.restart, rerun=True, timeout_s=ENGINE_TIMEOUT_S),
        Step("verify", commands.verify),
    ]
    return steps


SUDO_CHECK = (
    "sudo -n true 2>&1 || { echo \"sudo -n refused for $(id -un): the engine's systemd unit and files need root "
    'without a password (cloud images give their login passwordless sudo)"; exit 1; }'
)


def env_file(secret_env: Mapping[str, str]) -> bytes:
    lines = [f"{name}={shlex.quote(secret_env[name])}" for name in sorted(secret_env)]
    header = "# Written by the orchestrator; run.sh sources it with set -a. Holds secrets: mode 0600.\n"
    return (header + "".join(f"{line}\n" for line in lines)).encode()


def run_script(plan: EnginePlan) -> bytes:
    """The service's command: secrets reach the engine through its environment, never its argv."""
    wd = shlex.quote(plan.work_dir)
    return (
        "#!/bin/sh\n"
        "# Written by the orchestrator: runs the engine with engine.env in its environment.\n"
        "set -eu\n"
        f"cd {wd}\n"
        "set -a\n"
        f". {wd}/{ENV_FILE}\n"
        "set +a\n"
        f"exec {shlex.join(plan.serve_argv)}\n"
    ).encode()


def unit_path(plan: EnginePlan) -> str:
    return f"{UNIT_DIR}/{plan.unit_name}.service"


def systemd_unit(plan: EnginePlan) -> bytes:
    # ExecStart runs run.sh, so the argv and env file are quoted once, by shell rules, for both service kinds.
    return (
        "[Unit]\n"
        "Description=Inference engine managed by the orchestrator\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"WorkingDirectory={plan.work_dir}\n"
        f"ExecStart=/bin/sh {plan.work_dir}/{RUN_SCRIPT}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    ).encode()


def engine_commands(plan: EnginePlan) -> EngineCommands:
    if plan.service == "systemd":
        return _systemd_commands(plan)
    return _pidfile_commands(plan)


def _file_step(name: str, desired: DesiredFile) -> Step:
    path = shlex.quote(desired.path)
    # The desired sha256 comes on stdin: a hash of the env file's secrets stays off the command line.
    # The file is hashed through stdin because sha256sum escapes odd file names in its output.
    check = (
        f'read -r want && test "$(stat -c %a {path} 2>/dev/null)" = {desired.mode:o}'
        f' && test "$({{ sha256sum < {path}; }} 2>/dev/null | cut -c1-64)" = "$want"'
    )
    return Step(name, check, file=desired, feeds_engine=True)


def _systemd_commands(plan: EnginePlan) -> EngineCommands:
    unit = shlex.quote(plan.unit_name)
    stamp = shlex.quote(f"{plan.work_dir}/{STARTED_STAMP}")
    active = f"systemctl is-active --quiet {unit}"
    root = plan.root
    logs = f"{root}journalctl -u {unit} -n {LOG_LINES} --no-pager --output=cat"
    return EngineCommands(
        running=active,
        current=f"systemctl is-enabled --quiet {unit} && {active} && {_not_older(plan, stamp)}",
        # daemon-reload, enable and (re)start: "enable --now" when inactive, and a restart when running.
        restart=(
            f"{root}systemctl daemon-reload && {root}systemctl enable {unit} && {root}systemctl restart {unit}"
            f" && touch {stamp}"
        ),
        stop=f"{root}systemctl stop {unit}",
        verify=(
            f"{active} || {{ systemctl status --no-pager {unit};"
            f" {root}journalctl -u {unit} -n {LOG_LINES} --no-pager; exit 1; }}"
        ),
        logs=logs,
    )


def _pidfile_commands(plan: EnginePlan) -> EngineCommands:
    wd = shlex.quote(plan.work_dir)
    pid_file, log_file, script = (shlex.quote(f"{plan.work_dir}/{n}") for n in (PID_FILE, LOG_FILE, RUN_SCRIPT))
    logs = f"tail -n {LOG_LINES} {log_file}"
    # kill -0 alone also succeeds on a zombie, and an orphaned engine may stay one until init reaps it.
    running = (
        f'running() {{ pid=$(cat {pid_file} 2>/dev/null) && [ "$pid" -gt 0 ] 2>/dev/null'
        ' && [ "$(sed \'s/.*) //;s/ .*//\' /proc/$pid/stat 2>/dev/null)" != Z ] && kill -0 "$pid" 2>/dev/null; }'
    )
    # No job control in a non-interactive shell, so the child is no group leader: setsid does not fork and
    # $! is the engine's own pid (run.sh execs it); it leads its own process group, which stop signals
    # as "-$pid" (no "--": dash's kill rejects it, and with a signal given -PID already means a group).
    start = f"cd {wd} || exit 1; setsid nohup /bin/sh {script} >> {log_file} 2>&1 < /dev/null & echo $! > {pid_file}"
    stop = (
        f'{running}; if running; then kill -TERM "-$pid" 2>/dev/null || kill -TERM "$pid"; i=0;'
        f" while running && [ $i -lt {STOP_GRACE_TENTHS} ]; do sleep 0.1; i=$((i+1)); done;"
        f' if running; then kill -KILL "-$pid" 2>/dev/null || kill -KILL "$pid"; fi; fi; rm -f {pid_file}'
    )
    return EngineCommands(
        running=f"{running}; running",
        current=f"{running}; running && {_not_older(plan, pid_file)}",  # the pid file is written at start
        restart=f"{stop}; {start}",
        stop=stop,
        verify=f"{running}; running || {{ echo engine not running; {logs} 2>/dev/null; exit 1; }}",
        logs=logs,
    )


def _not_older(plan: EnginePlan, stamp: str) -> str:
    """Exits 0 when `stamp` exists and no file the engine reads is newer ("-nt" is in dash and bash)."""
    inputs = [f"{plan.work_dir}/{ENV_FILE}", f"{plan.work_dir}/{RUN_SCRIPT}"]
    if plan.service == "systemd":
        inputs.append(unit_path(plan))
    # An explicit -f: with a missing stamp, bash's -nt says "newer" and dash's says "not newer".
    return " && ".join([f"[ -f {stamp} ]", *(f"! [ {shlex.quote(i)} -nt {stamp} ]" for i in inputs)])
