"""Idempotent engine bootstrap over SSH: check each fact, apply only what is missing, verify; outputs redacted."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass

from provisioning.errors import CommandFailed
from provisioning.plan import CHECK_TIMEOUT_S, ENGINE_TIMEOUT_S, EnginePlan, Step, engine_commands, plan_steps
from provisioning.ssh import DROPPED_MARK, CommandResult, SshSession

__all__ = [
    "EnginePlan",
    "Step",
    "StepReport",
    "bootstrap",
    "engine_log",
    "plan_steps",
    "restart_engine",
    "stop_engine",
]

REDACTED = "<redacted>"
_MIN_FRAGMENT = 4  # shorter leftovers of a secret cut by the output cap say nothing about it


@dataclass(frozen=True)
class StepReport:
    name: str  # "gpu", "work_dir", "install", "env_file", "service_file", "unit_file", "start", "verify", ...
    changed: bool  # False when the fact already held and nothing was applied
    output: str  # what the step's commands printed, every secret_env value replaced by REDACTED


class _Runner:
    """Runs a plan's commands on one session: failures named after the step, every output redacted."""

    def __init__(self, session: SshSession, plan: EnginePlan) -> None:
        self._session = session
        # Each value also as the env file spells it (shell-quoted), longest first so none is replaced in part.
        forms = {form for v in plan.secret_env.values() if v for form in (v, shlex.quote(v))}
        self._secrets = sorted(forms, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        head, sep, rest = text.partition("\n")
        if sep and head.endswith(DROPPED_MARK):  # the output cap may have cut a secret: redact its leftover tail
            for secret in self._secrets:
                for n in range(len(secret) - 1, _MIN_FRAGMENT - 1, -1):
                    if rest.startswith(secret[-n:]):
                        return f"{head}{sep}{REDACTED}{rest[n:]}"
        return text

    def run(self, step: str, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        try:
            result = self._session.run(command, timeout_s=timeout_s, stdin=stdin)
        except CommandFailed as e:
            # Not chained: the original's message quotes unredacted output.
            raise CommandFailed(step, e.exit_status, self.redact(e.output)) from None
        return CommandResult(result.exit_status, self.redact(result.output))

    def must(self, step: str, command: str, *, timeout_s: float = CHECK_TIMEOUT_S) -> str:
        result = self.run(step, command, timeout_s=timeout_s)
        if result.exit_status != 0:
            raise CommandFailed(step, result.exit_status, result.output)
        return result.output

    def write(self, path: str, content: bytes, mode: int) -> None:
        self._session.write_file(path, content, mode)


def bootstrap(
    session: SshSession, plan: EnginePlan, *, on_step: Callable[[StepReport], None] | None = None
) -> list[StepReport]:
    """Brings the VM to `plan`; on a VM already there every report is unchanged and no apply command runs."""
    runner = _Runner(session, plan)
    reports: list[StepReport] = []
    engine_stale = False  # an input of the engine changed: an engine already running must restart to see it
    for step in plan_steps(plan):
        report = _converge(runner, step, engine_stale=engine_stale)
        engine_stale = engine_stale or (report.changed and step.feeds_engine)
        reports.append(report)
        if on_step is not None:
            on_step(report)
    return reports


def restart_engine(session: SshSession, plan: EnginePlan) -> StepReport:
    """Stops the engine if it runs, starts it, and checks that it runs."""
    runner = _Runner(session, plan)
    commands = engine_commands(plan)
    output = runner.must("restart", commands.restart, timeout_s=ENGINE_TIMEOUT_S)
    verified = runner.must("restart", commands.verify)
    return StepReport("restart", changed=True, output=_join(output, verified))


def stop_engine(session: SshSession, plan: EnginePlan) -> StepReport:
    """Stops the engine; unchanged when it was not running."""
    runner = _Runner(session, plan)
    commands = engine_commands(plan)
    if runner.run("stop", commands.running, timeout_s=CHECK_TIMEOUT_S).exit_status != 0:
        return StepReport("stop", changed=False, output="")
    output = runner.must("stop", commands.stop, timeout_s=ENGINE_TIMEOUT_S)
    still = runner.run("stop", commands.running, timeout_s=CHECK_TIMEOUT_S)
    if still.exit_status == 0:
        raise CommandFailed("stop (engine still running)", 0, _join(output, still.output))
    return StepReport("stop", changed=True, output=output)


def engine_log(session: SshSession, plan: EnginePlan) -> str:
    """The engine's last lines of output, every secret redacted."""
    return _Runner(session, plan).must("logs", engine_commands(plan).logs)


def _converge(runner: _Runner, step: Step, *, engine_stale: bool) -> StepReport:
    stdin = f"{step.file.sha256}\n".encode() if step.file is not None else None
    check = runner.run(step.name, step.check, timeout_s=CHECK_TIMEOUT_S, stdin=stdin)
    holds = check.exit_status == 0
    if holds and not (engine_stale and step.rerun):
        return StepReport(step.name, changed=False, output=check.output)
    if step.file is not None:
        runner.write(step.file.path, step.file.content, step.file.mode)
        output = f"wrote {step.file.path} (mode {step.file.mode:o})"
    else:
        if step.apply is None:  # a step that only verifies, and its fact does not hold
            raise CommandFailed(step.name, check.exit_status, check.output)
        output = runner.must(step.name, step.apply, timeout_s=step.timeout_s)
    recheck = runner.run(step.name, step.check, timeout_s=CHECK_TIMEOUT_S, stdin=stdin)
    if recheck.exit_status != 0:
        raise CommandFailed(f"{step.name} (check after apply)", recheck.exit_status, _join(output, recheck.output))
    return StepReport(step.name, changed=True, output=_join(output, recheck.output))


def _join(*outputs: str) -> str:
    return "\n".join(o.rstrip("\n") for o in outputs if o.strip())
