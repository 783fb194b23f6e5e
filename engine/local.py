"""Direct mode: the engine run in memory, each task run here by :func:`core.actions.run_action`.

The same :class:`~engine.engine.Engine` as the scheduler's decides what runs when, what is
retried, skipped, stopped or cancelled; this driver performs its effects in process instead of
over JetStream: a dispatch starts the action as an asyncio task (at most
``max_concurrent_tasks`` per pool, as one executor would), its start and end come back as the
same reports an executor sends, timers are event-loop timers, kills set the task's cancel
event, events go to the caller's reporter. Checkpoints need no writing: the records are here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from core.actions import run_action, task_environment
from core.registry import Registry
from core.runner import Runner, RunResult
from shared.config import Config
from shared.errors import ProvisioningError
from shared.ids import new_workflow_id
from shared.messages import (
    Report,
    SubmitWorkflow,
    TaskDispatch,
    TaskEvent,
    TaskFinished,
    TaskStarted,
    WorkflowDefinition,
)

from .bindings import claims_for, compensation_for, timeout_for
from .effects import Effects, Timer
from .engine import Engine
from .state import WorkflowState

__all__ = ["EXECUTOR_ID", "LocalRun", "Reporter", "run_local"]

log = logging.getLogger(__name__)

EXECUTOR_ID = "direct"
# (task id, kind, data): kind "task" (a status change), "progress" or "log"
Reporter = Callable[[str, str, dict[str, Any]], None]


def _now() -> datetime:
    return datetime.now(UTC)


class _Cancel:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Tick:
    """A rate window may have opened."""


class LocalRun:
    """One workflow run here: ``await run.run()`` to its end; ``run.cancel()`` from another
    task of the same event loop cancels it as ``POST /workflows/{id}/cancel`` would."""

    def __init__(
        self,
        definition: WorkflowDefinition,
        registry: Registry,
        runner: Runner,
        config: Config,
        report: Reporter,
    ) -> None:
        self.registry = registry
        self.runner = runner
        self.config = config
        self.report = report
        self.engine = Engine(
            timeout_for=timeout_for(registry, config),
            claims_for=claims_for(registry, config),
            max_fanout=config.scheduler.max_fanout,
            compensation_for=compensation_for(registry),
        )
        slots = config.executor.max_concurrent_tasks
        self.engine.set_capacity({t.pool: slots for t in definition.tasks})
        self.command = SubmitWorkflow(
            workflow_id=new_workflow_id(),
            definition=definition,
            submitted_at=_now(),
            source="direct",
        )
        self.inbox: asyncio.Queue[Report | Timer | _Cancel | _Tick] = asyncio.Queue()
        self.cancels: dict[str, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: set[asyncio.TimerHandle] = set()
        self.state: WorkflowState | None = None
        self.ended = False

    async def run(self) -> WorkflowState:
        self.state = self.engine.accept(self.command, _now())
        try:
            while True:
                self.engine.pump(_now())
                self._perform(self.engine.take())
                if self.ended:
                    break
                self._apply(await self.inbox.get())
                while not self.inbox.empty():
                    self._apply(self.inbox.get_nowait())
        except asyncio.CancelledError:  # Ctrl-C: stop what runs, as a cancel would
            for cancel in self.cancels.values():
                cancel.set()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            raise
        finally:
            for handle in self.timers:
                handle.cancel()
        return self.state

    @property
    def workflow_id(self) -> str:
        return self.command.workflow_id

    def cancel(self, reason: str = "cancelled by request") -> None:
        self.inbox.put_nowait(_Cancel(reason))

    def _apply(self, item: Report | Timer | _Cancel | _Tick) -> None:
        if isinstance(item, _Tick):
            self.engine.tick(_now())
        elif isinstance(item, Timer):
            self.engine.timer_due(item, _now())
        elif isinstance(item, _Cancel):
            self.engine.cancel(self.workflow_id, item.reason, _now())
        else:
            self.engine.report(item, _now())

    def _perform(self, effects: Effects) -> None:
        for event in effects.events:
            if isinstance(event, TaskEvent):
                data: dict[str, Any] = {"status": event.status, "attempt": event.attempt}
                if event.error:
                    data["error"] = event.error
                if event.reason:
                    data["reason"] = event.reason
                self.report(event.task_id, "task", data)
        for task_ids in effects.kills.values():
            for task_id in task_ids:
                if (cancel := self.cancels.get(task_id)) is not None:
                    cancel.set()
        loop = asyncio.get_running_loop()
        for timer in effects.timers:
            delay = max(0.0, (timer.at - _now()).total_seconds())
            handle = loop.call_later(delay, self.inbox.put_nowait, timer)
            self.timers.add(handle)
        for at in effects.wakeups:
            delay = max(0.0, (at - _now()).total_seconds())
            self.timers.add(loop.call_later(delay, self.inbox.put_nowait, _Tick()))
        for dispatch in effects.dispatches:
            message = dispatch.message
            cancel = self.cancels[message.task_id] = asyncio.Event()
            task = asyncio.create_task(self._execute(message, cancel))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if effects.ended:
            self.ended = True

    async def _execute(self, dispatch: TaskDispatch, cancel: asyncio.Event) -> None:
        """One attempt, reported as an executor would: started, then finished."""
        wf_id, task_id, attempt = dispatch.workflow_id, dispatch.task_id, dispatch.attempt
        started = _now()
        self.inbox.put_nowait(TaskStarted(wf_id, task_id, attempt, 1, EXECUTOR_ID, started))

        async def on_line(stream: str, line: str) -> None:
            self.report(task_id, "log", {"stream": stream, "line": line})

        async def on_progress(percent: int, message: str) -> None:
            self.report(task_id, "progress", {"percent": percent, "message": message})

        try:
            result = await run_action(
                self.registry,
                self.runner,
                dispatch.action,
                dispatch.args,
                allow_commands=self.config.executor.allow_commands,
                task_env=task_environment(
                    wf_id, task_id, attempt, gateway_url=self.config.orchestrator.endpoint
                ),
                timeout_s=dispatch.timeout_seconds,
                cancel=cancel,
                on_line=on_line,
                on_progress=on_progress,
                mode=dispatch.mode,
                expect_change=dispatch.expect_change,
            )
        except ProvisioningError as exc:  # the action could not be started at all
            result = RunResult("failed", reason="error", error=exc.message)
        self.inbox.put_nowait(
            TaskFinished(
                workflow_id=wf_id,
                task_id=task_id,
                attempt=attempt,
                delivery=1,
                executor_id=EXECUTOR_ID,
                outcome=result.outcome,  # type: ignore[arg-type]
                started_at=started,
                finished_at=_now(),
                exit_code=result.exit_code,
                reason=result.reason,  # type: ignore[arg-type]
                error=result.error,
                output=result.output,
            )
        )


async def run_local(
    definition: WorkflowDefinition,
    registry: Registry,
    runner: Runner,
    config: Config,
    report: Reporter,
) -> WorkflowState:
    """Run a (validated) workflow here, to its end; returns its final state."""
    return await LocalRun(definition, registry, runner, config, report).run()
