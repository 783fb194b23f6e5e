"""Direct mode: run a workflow's actions locally through the same Nushell runner, no NATS.

Same semantics as the orchestrator: dependencies first, independent tasks in parallel,
retries with backoff, timeouts, dependents of a failed task skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from core.providers import check_providers
from core.registry import Registry
from core.runner import Runner, RunResult
from services.executor.builtins import run_builtin
from shared.config import Config
from shared.messages import TaskSpec, WorkflowDefinition
from shared.workflow import validate_definition

__all__ = ["run_direct"]

Reporter = Callable[[str, str, dict[str, Any]], None]  # (task id, kind, data)


async def _run_task(
    spec: TaskSpec,
    registry: Registry,
    runner: Runner,
    config: Config,
    report: Reporter,
    cancel: asyncio.Event,
) -> RunResult:
    action = registry.get(spec.action, task=spec.id)
    timeout = spec.timeout_seconds or action.timeout_seconds or config.executor.task_timeout_seconds
    attempt = 0
    while True:
        attempt += 1
        report(spec.id, "task", {"status": "running", "attempt": attempt})
        if action.kind == "builtin":
            result = await run_builtin(action.name, spec.args, timeout_s=timeout, cancel=cancel)
        elif action.kind == "command" and not config.executor.allow_commands:
            result = RunResult("failed", reason="refused", error="plain-command tasks are disabled")
        else:

            async def on_line(stream: str, line: str) -> None:
                report(spec.id, "log", {"stream": stream, "line": line})

            async def on_progress(percent: int, message: str) -> None:
                report(spec.id, "progress", {"percent": percent, "message": message})

            result = await runner.run(
                action,
                spec.args,
                task_env={
                    "PROVISIONING_TASK_ID": f"direct.{spec.id}",
                    "PROVISIONING_WORKFLOW_ID": "direct",
                    "PROVISIONING_GATEWAY_URL": config.orchestrator.endpoint,
                },
                timeout_s=timeout,
                on_line=on_line,
                on_progress=on_progress,
                cancel=cancel,
            )
        if result.outcome != "failed" or attempt > spec.retries or result.reason == "refused":
            return result
        delay = spec.backoff.delay(attempt)
        report(spec.id, "task", {"status": "retrying", "attempt": attempt, "error": result.error})
        await asyncio.sleep(delay)


async def run_direct(
    definition: WorkflowDefinition,
    registry: Registry,
    runner: Runner,
    config: Config,
    report: Reporter,
) -> dict[str, dict[str, Any]]:
    """Run every task; return ``{task id: {"status", "output", "error", ...}}``."""
    validate_definition(definition, registry, max_tasks=config.gateway.max_tasks_per_workflow)
    check_providers(definition, config)
    specs = {t.id: t for t in definition.tasks}
    results: dict[str, dict[str, Any]] = {}
    running: dict[str, asyncio.Task[RunResult]] = {}
    cancel = asyncio.Event()
    limit = asyncio.Semaphore(config.executor.max_concurrent_tasks)
    stop = False

    async def guarded(spec: TaskSpec) -> RunResult:
        async with limit:
            return await _run_task(spec, registry, runner, config, report, cancel)

    while len(results) < len(specs):
        for task_id, spec in specs.items():
            if task_id in results or task_id in running:
                continue
            deps = [results.get(d, {}).get("status") for d in spec.depends_on]
            if stop or any(s in ("failed", "skipped", "cancelled") for s in deps):
                status = "cancelled" if stop and all(s == "completed" for s in deps) else "skipped"
                results[task_id] = {"status": status, "output": None, "error": None}
                report(task_id, "task", {"status": status})
            elif all(s == "completed" for s in deps):
                running[task_id] = asyncio.create_task(guarded(spec))
        if not running:
            continue
        done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
        for task_id, task in list(running.items()):
            if task in done:
                del running[task_id]
                result = task.result()
                results[task_id] = {
                    "status": result.outcome,
                    "output": result.output,
                    "error": result.error,
                    "exit_code": result.exit_code,
                    "reason": result.reason,
                    "duration_seconds": round(result.duration_s, 3),
                }
                report(task_id, "task", {"status": result.outcome, "error": result.error})
                if result.outcome == "failed" and definition.on_failure == "stop":
                    stop = True
    return results
