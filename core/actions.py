"""Running one attempt of an action: the built-ins in process, Nushell functions and plain
commands in a fresh subprocess (:mod:`core.runner`).

Shared by the executor service and direct mode, so both refuse, run and report an action the
same way: an unknown action and a plain command where commands are not allowed are refused
(``reason: refused``, never retried); the task's environment names the task, its workflow and
attempt, the gateway, the trace and (with auth on) the task's own capability token.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

from shared.errors import ActionNotFound

from .registry import Registry
from .runner import LineHandler, ProgressHandler, Runner, RunResult

__all__ = ["run_action", "run_builtin", "task_environment"]


def task_environment(
    workflow_id: str,
    task_id: str,
    attempt: int,
    *,
    gateway_url: str,
    traceparent: str | None = None,
    task_token: str | None = None,
) -> dict[str, str]:
    """The variables that tell a task subprocess who it is (see docs/executors.md)."""
    env = {
        "PROVISIONING_TASK_ID": f"{workflow_id}.{task_id}",
        "PROVISIONING_WORKFLOW_ID": workflow_id,
        "PROVISIONING_ATTEMPT": str(attempt),
        "PROVISIONING_GATEWAY_URL": gateway_url,
    }
    if traceparent:
        env["TRACEPARENT"] = traceparent
    if task_token:  # a capability for this task's progress, never the gateway's secret
        env["PROVISIONING_TASK_TOKEN"] = task_token
    return env


async def run_action(
    registry: Registry,
    runner: Runner,
    name: str,
    args: dict[str, Any],
    *,
    allow_commands: bool,
    task_env: dict[str, str],
    timeout_s: float,
    cancel: asyncio.Event,
    on_line: LineHandler,
    on_progress: ProgressHandler,
    mode: str = "run",
    expect_change: str | None = None,
) -> RunResult:
    """Run the action ``name`` once with ``args``; never raises for the action's own failures.

    ``mode="plan"``: run its read-only plan function instead; the result is
    ``{"change": "create" | "update" | "delete" | "none" | "unknown", "detail": ...}``.
    ``expect_change`` (applying a plan): plan first, and run only if the change is still the
    planned one; otherwise fail with ``reason: plan_changed`` and both plans in the error."""
    try:
        action = registry.get(name)
    except ActionNotFound:
        return RunResult("failed", reason="refused", error=f"unknown action {name!r}")
    if action.kind == "command" and not allow_commands:
        return RunResult(
            "failed",
            reason="refused",
            error="plain-command tasks are disabled here ([executor] allow_commands)",
        )

    async def run(plan: bool) -> RunResult:
        if plan:
            if action.kind == "builtin" or action.read_only:
                what = "a built-in" if action.kind == "builtin" else "read-only"
                return RunResult(
                    "completed", exit_code=0, output={"change": "none", "detail": what}
                )
            if action.kind == "command" or not action.plan_function:
                detail = f"{action.name} has no plan function: what it would change is unknown"
                return RunResult(
                    "completed", exit_code=0, output={"change": "unknown", "detail": detail}
                )
        elif action.kind == "builtin":
            return await run_builtin(action.name, args, timeout_s=timeout_s, cancel=cancel)
        return await runner.run(
            action,
            args,
            task_env=task_env,
            timeout_s=timeout_s,
            on_line=on_line,
            on_progress=on_progress,
            cancel=cancel,
            plan=plan,
        )

    if mode == "plan":
        return await run(plan=True)
    if expect_change is not None:
        checked = await run(plan=True)
        if checked.outcome != "completed":
            return checked
        now = checked.output if isinstance(checked.output, dict) else {}
        if now.get("change") != expect_change:
            return RunResult(
                "failed",
                reason="plan_changed",
                error=(
                    f"the plan no longer holds: planned {expect_change!r}, "
                    f"now {now.get('change')!r}: {now.get('detail')}"
                )[:2000],
                output={"planned": expect_change, "now": now},
            )
    return await run(plan=False)


async def run_builtin(
    action: str, args: dict[str, Any], *, timeout_s: float, cancel: asyncio.Event
) -> RunResult:
    """``builtin.noop``, ``builtin.echo`` (its arguments are its result), ``builtin.sleep``
    (``{"seconds": x}``), ``builtin.fail`` (``{"message": ...}``): for tests, demos and
    benchmarks, with no subprocess."""
    if action == "builtin.noop":
        return RunResult("completed", exit_code=0, output={})
    if action == "builtin.echo":
        return RunResult("completed", exit_code=0, output=args)
    if action == "builtin.fail":
        message = args.get("message", "failed on purpose")
        return RunResult("failed", exit_code=1, reason="error", error=str(message)[:2000])
    if action == "builtin.sleep":
        seconds = args.get("seconds", 1)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            return RunResult(
                "failed", reason="refused", error='builtin.sleep needs {"seconds": number}'
            )
        if not math.isfinite(seconds) or not 0 <= seconds <= 86400:
            return RunResult("failed", reason="refused", error="seconds must be within 0..86400")
        if seconds > timeout_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), timeout_s)
            if cancel.is_set():
                return RunResult("cancelled", reason="cancelled", error="cancelled")
            return RunResult("failed", reason="timeout", error=f"timed out after {timeout_s:g}s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel.wait(), seconds)
        if cancel.is_set():
            return RunResult("cancelled", reason="cancelled", error="cancelled")
        return RunResult("completed", exit_code=0, output={"slept": seconds})
    return RunResult("failed", reason="refused", error=f"unknown builtin {action!r}")
