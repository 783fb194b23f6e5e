"""The workflow state machine: inputs in, effects out, no I/O.

Inputs are method calls: a submission accepted (:meth:`Engine.accept`), a cancel
(:meth:`Engine.cancel`), a retry of a finished run (:meth:`Engine.retry`), an executor's report
(:meth:`Engine.report`: started, finished, handed back), a retry timer that fell due
(:meth:`Engine.retry_due`), executor capacity (:meth:`Engine.set_capacity`) and the end of a
step (:meth:`Engine.pump`, which dispatches ready tasks into free capacity, highest priority
first). Workflows rebuilt from checkpoints come back with :meth:`Engine.adopt`. Every input adds
to the pending :class:`~engine.effects.Effects`, which the driver takes with :meth:`Engine.take`.

The rules, in one place:

- A task is ready when all its dependencies completed; ready tasks wait in a priority heap per
  pool and are dispatched only while the pool has capacity (executor slots plus headroom).
- Reports are fenced: one for another attempt than the task's current one, for a delivery older
  than the one the task is at, or repeated, changes nothing (:class:`Verdict` says why).
- A failed attempt is retried after its backoff while the task has retries left in this run of
  the workflow, unless the failure was a refusal or a cancellation, or the workflow is being
  cancelled or was stopped. A task that ends failed, cancelled or skipped skips the tasks that
  depend on it.
- ``on_failure = "stop"``: the first task that fails for good stops the run: tasks not yet
  dispatched are cancelled; tasks dispatched but not started are asked not to start
  (``cancelling``); running ones finish. ``continue``: the rest of the graph goes on.
- Cancel: tasks not dispatched end ``cancelled`` at once; tasks out with an executor become
  ``cancelling`` and the executors are asked to stop them. Their report decides how they end: a
  task that finished anyway ends ``completed`` with its result and a note, so what the API says
  ran is what ran, and a retry of the workflow never runs it again.
- A graceful hand-back (an executor shutting down) puts the attempt back in the queue without
  counting as a crash.
- The workflow ends when every task has: ``completed`` if all completed, ``cancelled`` if a
  cancel was asked for, otherwise ``failed``.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec

from shared.errors import DefinitionError
from shared.ids import child_id
from shared.keys import Claim
from shared.messages import (
    BUSY_TASK,
    TERMINAL_TASK,
    TERMINAL_WORKFLOW,
    AttemptRecord,
    Compensation,
    Decision,
    KeyState,
    Report,
    SubmitWorkflow,
    TaskDispatch,
    TaskEvent,
    TaskFinished,
    TaskHandedBack,
    TaskRecord,
    TaskSpec,
    TaskStarted,
    WorkflowEvent,
    WorkflowRecord,
)
from shared.refs import MissingPath, resolve
from shared.subjects import end_event_msg_id

from .effects import Dispatch, Effects, Timer
from .keys import Blocked, KeyBook, Rank
from .state import WorkflowState

__all__ = ["ATTEMPTS_KEPT", "ClaimsFor", "CompensationFor", "Engine", "Verdict"]

ATTEMPTS_KEPT = 20  # attempt records kept per task (the newest)
CANCELLED_NOTE = "finished after its workflow was cancelled"
STOPPED_NOTE = "finished after its workflow was stopped (on_failure = stop)"
# A task's concurrency keys, from its spec and (resolved) arguments; raises DefinitionError.
ClaimsFor = Callable[[TaskSpec, dict[str, Any]], list[Claim]]
TaskRef = tuple[str, str]


# How to undo a task's work: its own ``compensate``, else its action's default, else None.
CompensationFor = Callable[[TaskSpec], Compensation | None]
_UNDO_VALUE = re.compile(r"^\{(args|result)((?:\.[^{}.]+)*)\}$")


def _no_claims(spec: TaskSpec, args: dict[str, Any]) -> list[Claim]:
    return []


def _no_compensation(spec: TaskSpec) -> Compensation | None:
    return spec.compensate


def _undo_args(template: Any, args: Any, result: Any) -> Any:
    """A compensation's arguments: each string that is exactly ``{args.<path>}`` or
    ``{result.<path>}`` becomes that value of the task's arguments or result (None when
    missing); nothing else is substituted."""

    def lookup(root: Any, path: str) -> Any:
        for part in [p for p in path.split(".") if p]:
            if isinstance(root, dict) and part in root:
                root = root[part]
            elif isinstance(root, list) and part.isdigit() and int(part) < len(root):
                root = root[int(part)]
            else:
                return None
        return root

    if isinstance(template, str) and (m := _UNDO_VALUE.match(template)) is not None:
        return lookup(args if m.group(1) == "args" else result, m.group(2))
    if isinstance(template, dict):
        return {k: _undo_args(v, args, result) for k, v in template.items()}
    if isinstance(template, list):
        return [_undo_args(v, args, result) for v in template]
    return template


def _ts(moment: datetime) -> float:
    return moment.timestamp()


T_ZERO = datetime(1970, 1, 1, tzinfo=UTC)


class Verdict(StrEnum):
    """What became of a report."""

    APPLIED = "applied"
    UNKNOWN = "unknown"  # no such active workflow or task
    STALE = "stale"  # another attempt, or already applied (a redelivered report)
    FENCED = "fenced"  # an older delivery of the current attempt: another executor took over


class Engine:
    """Every active workflow, the ready heaps and the in-flight counts of each pool.

    ``timeout_for`` gives a task's timeout in seconds (its own, else its action's, else the
    default); ``headroom`` is how far beyond the executors' slots a pool may be dispatched, as a
    fraction of them (dispatches then wait in the queue, ready for the next free slot);
    ``claims_for`` gives the concurrency keys a task holds (:mod:`shared.keys`).
    """

    def __init__(
        self,
        *,
        timeout_for: Callable[[TaskSpec], float],
        headroom: float = 0.0,
        claims_for: ClaimsFor = _no_claims,
        max_fanout: int = 10_000,
        compensation_for: CompensationFor = _no_compensation,
    ) -> None:
        self.timeout_for = timeout_for
        self.headroom = headroom
        self.claims_for = claims_for
        self.max_fanout = max_fanout
        self.compensation_for = compensation_for
        self.workflows: dict[str, WorkflowState] = {}
        self.inflight: dict[str, int] = defaultdict(int)
        self.slots: dict[str, int] = {}
        # per pool: (-priority, ready since, rank, workflow, task)
        self._ready: dict[str, list[tuple[int, float, Rank, str, str]]] = defaultdict(list)
        self._seq = itertools.count()
        self.keys = KeyBook()
        self._claims: dict[TaskRef, list[Claim]] = {}  # of tasks holding or waiting for keys
        self._queued: set[TaskRef] = set()  # in a ready heap
        self._unsettled: set[TaskRef] = set()  # fan-outs whose children changed
        self.effects = Effects()

    # -- the driver's side ------------------------------------------------------------------------

    def take(self) -> Effects:
        """The effects of every input since the last call, workflow counts brought up to date."""
        effects, self.effects = self.effects, Effects()
        for state in {**effects.workflows, **effects.counts, **effects.created}.values():
            state.record.counts = state.count_snapshot()
        for key in self.keys.take_changed():
            effects.keys[key] = self.keys.state(key) if self.keys.in_use(key) else None
        return effects

    def get(self, workflow_id: str) -> WorkflowState | None:
        """An active workflow, or one that ended since the last :meth:`take`."""
        return self.workflows.get(workflow_id) or self.effects.ended.get(workflow_id)

    def forget(self) -> None:
        """Drop everything (the driver rebuilds from checkpoints with :meth:`adopt`)."""
        self.workflows.clear()
        self.inflight.clear()
        self._ready.clear()
        self.keys.clear()
        self._claims.clear()
        self._queued.clear()
        self._unsettled.clear()
        self.effects = Effects()

    def set_capacity(self, slots: Mapping[str, int]) -> None:
        """Task slots of the live executors, per pool."""
        self.slots = dict(slots)

    def capacity(self, pool: str) -> int:
        return int(self.slots.get(pool, 0) * (1 + self.headroom))

    def ready_count(self, pool: str) -> int:
        return len(self._ready.get(pool, ()))

    def pools(self) -> set[str]:
        return set(self._ready) | set(self.inflight)

    def restore_key(self, state: KeyState) -> None:
        """A key's rate window, from its checkpoint (before adopting the workflows)."""
        self.keys.restore(state)

    # -- inputs -----------------------------------------------------------------------------------

    def accept(
        self,
        command: SubmitWorkflow,
        now: datetime,
        *,
        trace_id: str | None = None,
        traceparent: str | None = None,
        cancelled: str | None = None,
    ) -> WorkflowState:
        """Take a new workflow. ``cancelled``: a cancel for it is already waiting (its reason):
        then nothing of it is dispatched."""
        wf_id = command.workflow_id
        if (known := self.get(wf_id)) is not None:
            return known
        definition = command.definition
        tasks = {t.id: TaskRecord(workflow_id=wf_id, spec=t) for t in definition.tasks}
        record = WorkflowRecord(
            id=wf_id,
            name=definition.name,
            status="queued",
            created_at=command.submitted_at,
            task_ids=[t.id for t in definition.tasks],
            priority=definition.priority,
            on_failure=definition.on_failure,
            description=definition.description,
            source=command.source,
            idempotency_key=command.idempotency_key,
            trace_id=trace_id,
            traceparent=traceparent,
            counts={"pending": len(tasks)},
            mode=command.mode,
            submitted_by=command.submitted_by,
            definition_hash=command.definition_hash,
            infra_hashes=command.infra_hashes,
            plan_id=command.plan_id,
            expect=command.expect,
        )
        state = WorkflowState(record, tasks)
        self.workflows[wf_id] = state
        self.effects.created[wf_id] = state
        self._emit(WorkflowEvent(wf_id, "queued", now, f"{len(tasks)} tasks"))
        if cancelled is not None:
            self.cancel(wf_id, cancelled, now)
            return state
        record.approval = definition.approval
        if definition.approval is not None and command.mode != "plan":
            # the workflow's own gate: nothing runs until it is approved
            record.approval_deadline = now + timedelta(seconds=definition.approval.timeout_seconds)
            self.effects.timers.append(
                Timer(wf_id, "", 0, record.approval_deadline, kind="approval")
            )
            self._refresh_status(state, now)
            return state
        for task_id in state.ready():
            self._push_ready(state, task_id, now)
        return state

    def adopt(
        self, record: WorkflowRecord, tasks: dict[str, TaskRecord], now: datetime
    ) -> list[str]:
        """Bring a workflow rebuilt from its checkpoints back into motion. Returns the tasks
        whose attempt is out with an executor: the driver checks that each one's dispatch (or
        its report) is still in JetStream, and calls :meth:`redispatch` for those that are not."""
        if record.status in TERMINAL_WORKFLOW or record.id in self.workflows:
            return []
        state = WorkflowState(record, tasks)
        self.workflows[record.id] = state
        if record.approval_deadline is not None:  # the workflow's gate still waits
            timer = Timer(record.id, "", 0, record.approval_deadline, kind="approval")
            self.effects.timers.append(timer)
        busy: list[str] = []
        for task_id in state.order:
            task = state.tasks[task_id]
            if task.children is not None:  # an expanded fan-out: its children are the work
                if task.status == "running":
                    self._unsettled.add((state.id, task_id))
            elif task.status in BUSY_TASK:
                self.inflight[task.spec.pool] += 1
                busy.append(task_id)
                if task.keys:  # the keys it holds, as its dispatch took them
                    claims = self._claims_of(state, task_id)
                    if claims is not None:
                        started = task.status != "queued" or task.started_at is not None
                        self.keys.hold((state.id, task_id), claims, started=started)
                if task.cancel_requested and record.cancel_requested:
                    self._kill(state, task_id)
            elif task.status == "retrying":
                self._timer(state, task_id, task.next_attempt_at or now)
            elif task.status == "awaiting_approval":
                at = task.approval_deadline or now
                self.effects.timers.append(Timer(state.id, task_id, 0, at, kind="approval"))
            elif task.status == "waiting":
                # back in line, in its place (priority, then how long it has waited)
                state.set_status(task_id, "pending")
                self._save_task(state, task_id)
                if state.is_ready(task_id) and self._may_start(state):
                    self._push_ready(state, task_id, now)
            elif state.is_ready(task_id) and self._may_start(state):
                self._push_ready(state, task_id, now)
        self._finish_if_done(state, now)
        return busy

    def redispatch(self, workflow_id: str, task_id: str, now: datetime) -> None:
        """Send a task's current attempt again (its dispatch was lost before it was stored)."""
        state = self.workflows[workflow_id]
        self._send(state, task_id, now)

    def cancel(self, workflow_id: str, reason: str, now: datetime) -> bool:
        """Cancel a workflow; False when it is not active or a cancel is already under way."""
        state = self.workflows.get(workflow_id)
        if state is None or state.record.cancel_requested:
            return False
        state.record.cancel_requested = True
        state.record.approval_deadline = None
        self._save_workflow(state)
        self._stop_unstarted(state, reason, now, kill_running=True)
        self._finish_if_done(state, now)
        return True

    def retry(
        self,
        workflow_id: str,
        runs: int,
        now: datetime,
        *,
        loaded: tuple[WorkflowRecord, dict[str, TaskRecord]] | None = None,
    ) -> bool:
        """Start another run of a failed or cancelled workflow (``runs``: the run it follows,
        so a repeated retry is not applied twice): its failed, cancelled and skipped tasks run
        again, each with its whole retry budget; completed tasks stay completed. ``loaded``:
        the workflow's checkpoints, when it is no longer in memory."""
        state = self.get(workflow_id)
        if state is None:
            if loaded is None:
                return False
            state = WorkflowState(*loaded)
        record = state.record
        if record.runs != runs or record.status not in ("failed", "cancelled"):
            return False
        if any(t.compensates is not None for t in state.tasks.values()):
            return False  # its work was undone: a retry would redo half of it
        for task_id in state.order:
            task = state.tasks[task_id]
            if task.status in ("failed", "cancelled", "skipped"):
                expanded = task.children is not None
                self._set(state, task_id, "running" if expanded else "pending")
                if expanded:  # its children that did not complete run again
                    self._unsettled.add((state.id, task_id))
                task.attempts_before_run = task.attempt  # a fresh retry budget in this run
                task.cancel_requested = False
                task.args = None  # resolved again: what it refers to may run again too
                task.error = task.reason = task.note = None
                task.exit_code = None
                task.finished_at = None
                self._save_task(state, task_id)
        record.runs += 1
        record.status = "queued"
        record.cancel_requested = record.stopped = False
        record.error = None
        record.finished_at = None
        self.workflows[workflow_id] = state
        self.effects.ended.pop(workflow_id, None)
        self.effects.reopened.add(workflow_id)
        self._save_workflow(state)
        self._emit(WorkflowEvent(workflow_id, "queued", now, f"retry (run {record.runs})"))
        for task_id in state.ready():
            self._push_ready(state, task_id, now)
        return True

    def report(self, report: Report, now: datetime) -> Verdict:
        """Apply an executor's report, fenced by attempt and delivery."""
        state = self.workflows.get(report.workflow_id)
        if state is None or report.task_id not in state.tasks:
            return Verdict.UNKNOWN
        task = state.tasks[report.task_id]
        if report.attempt != task.attempt or task.status not in BUSY_TASK:
            return Verdict.STALE
        match report:
            case TaskStarted():
                if report.delivery <= task.delivery:
                    return Verdict.STALE if report.delivery == task.delivery else Verdict.FENCED
                self._started(state, report, now)
            case TaskFinished():
                if report.delivery < task.delivery:
                    return Verdict.FENCED
                self._finished(state, report, now)
            case TaskHandedBack():
                if report.delivery < task.delivery or report.delivery <= task.handback_delivery:
                    return Verdict.STALE
                self._handed_back(state, report, now)
        return Verdict.APPLIED

    def timer_due(self, timer: Timer, now: datetime) -> None:
        """A timer the engine asked for fell due (see :class:`~engine.effects.Timer`)."""
        if timer.kind == "approval":
            self.approval_due(timer.workflow_id, timer.task_id, timer.at, now)
        else:
            self.retry_due(timer.workflow_id, timer.task_id, timer.attempt, now)

    def approve(
        self, workflow_id: str, by: str, task_id: str | None, comment: str, now: datetime
    ) -> bool:
        """Open a gate: the workflow's own (``task_id`` None while it has one), else the named
        task's, else every task gate that waits. False when no such gate waits."""
        state = self.workflows.get(workflow_id)
        if state is None:
            return False
        record = state.record
        if record.approval_deadline is not None and task_id is None:
            record.approval_deadline = None
            record.approvals.append(Decision("approved", by, now, comment=comment))
            self._save_workflow(state)
            self._emit(WorkflowEvent(state.id, "approved", now, f"by {by}"))
            self._refresh_status(state, now)
            for ready in state.ready():
                self._push_ready(state, ready, now)
            return True
        gated = [
            t
            for t in state.order
            if state.tasks[t].status == "awaiting_approval" and task_id in (None, t)
        ]
        for gate in gated:
            task = state.tasks[gate]
            task.approved_by = by
            task.approval_deadline = None
            record.approvals.append(Decision("approved", by, now, task_id=gate, comment=comment))
            self._set(state, gate, "pending")
            self._save_task(state, gate)
            self._emit(TaskEvent(state.id, gate, "pending", now, detail=f"approved by {by}"))
            if state.is_ready(gate) and self._may_start(state):
                self._push_ready(state, gate, now)
        if gated:
            self._save_workflow(state)
            self._refresh_status(state, now)
        return bool(gated)

    def reject(
        self, workflow_id: str, by: str, reason: str, task_id: str | None, now: datetime
    ) -> bool:
        """Refuse a gate: the run ends cancelled, the refusal and its reason recorded."""
        state = self.workflows.get(workflow_id)
        if state is None:
            return False
        record = state.record
        waits = record.approval_deadline is not None or any(
            state.tasks[t].status == "awaiting_approval" and task_id in (None, t)
            for t in state.order
        )
        if not waits:
            return False
        record.approvals.append(Decision("rejected", by, now, task_id=task_id, comment=reason))
        self._emit(WorkflowEvent(state.id, "rejected", now, f"by {by}: {reason}"))
        return self.cancel(workflow_id, f"rejected by {by}: {reason}", now)

    def approval_due(self, workflow_id: str, task_id: str, at: datetime, now: datetime) -> None:
        """A gate's deadline passed: if it still waits, the run ends cancelled."""
        state = self.workflows.get(workflow_id)
        if state is None:
            return
        record = state.record
        if task_id == "":
            if record.approval_deadline is None or record.approval_deadline > now:
                return
        else:
            task = state.tasks.get(task_id)
            if (
                task is None
                or task.status != "awaiting_approval"
                or (task.approval_deadline is not None and task.approval_deadline > now)
            ):
                return
        record.approvals.append(Decision("timed_out", "orchestrator", now, task_id=task_id or None))
        self._emit(WorkflowEvent(state.id, "approval_timed_out", now, task_id or "workflow"))
        self.cancel(workflow_id, "approval timed out", now)

    def retry_due(self, workflow_id: str, task_id: str, attempt: int, now: datetime) -> None:
        """A retry timer fell due: the task is pending again (and ready if it may start)."""
        state = self.workflows.get(workflow_id)
        if state is None:
            return
        task = state.tasks[task_id]
        if task.status != "retrying" or task.attempt != attempt:
            return
        self._set(state, task_id, "pending")
        task.next_attempt_at = None
        self._save_task(state, task_id)
        if state.is_ready(task_id) and self._may_start(state):
            self._push_ready(state, task_id, now)

    def pump(self, now: datetime) -> None:
        """Dispatch ready tasks into free capacity, highest priority first, per pool; a task
        whose concurrency key is full or over its rate waits on it instead (or, by its key's
        strategy, is cancelled or cancels the holder)."""
        for wf_id in sorted({wf for wf, _ in self._unsettled}):
            if (unsettled := self.workflows.get(wf_id)) is not None:
                self._settle_fanouts(unsettled, now)
        for pool, heap in self._ready.items():
            capacity = self.capacity(pool)
            while heap and self.inflight[pool] < capacity:
                _, _, _, wf_id, task_id = heapq.heappop(heap)
                self._queued.discard((wf_id, task_id))
                state = self.workflows.get(wf_id)
                if state is None or not self._may_start(state) or not state.is_ready(task_id):
                    continue
                claims = self._claims_of(state, task_id, now=now)
                if claims is None:
                    continue  # refused: its keys cannot be made from its arguments
                blocked = self.keys.blocked((wf_id, task_id), claims, _ts(now))
                if blocked is None:
                    self.keys.hold((wf_id, task_id), claims, started=False)
                    self._dispatch(state, task_id, now)
                else:
                    self._blocked(state, task_id, blocked, now)

    # -- transitions ------------------------------------------------------------------------------

    def _started(self, state: WorkflowState, rep: TaskStarted, now: datetime) -> None:
        task = state.tasks[rep.task_id]
        if task.queued_at is not None:
            latency = max(0.0, (rep.started_at - task.queued_at).total_seconds())
            self.effects.start_latencies.append((task.spec.pool, latency))
        task.delivery = rep.delivery
        task.executor_id = rep.executor_id
        task.started_at = rep.started_at
        if task.attempts:
            task.attempts[-1].executor_id = rep.executor_id
            task.attempts[-1].started_at = rep.started_at
        if (claims := self._claims.get((state.id, rep.task_id))) is not None:
            self.keys.started((state.id, rep.task_id), claims, _ts(now))
        if task.status == "cancelling" and not state.record.cancel_requested:
            # asked not to start by on_failure = "stop", but it had started: a stop lets
            # running tasks finish
            task.cancel_requested = False
            self._set(state, rep.task_id, "running")
        elif task.status == "queued":
            self._set(state, rep.task_id, "running")
        self._save_task(state, rep.task_id)
        if task.status == "running":
            self._emit(
                TaskEvent(
                    state.id,
                    rep.task_id,
                    "running",
                    now,
                    attempt=rep.attempt,
                    executor_id=rep.executor_id,
                )
            )
        else:  # cancelling: the kill may have reached the executor before the task did
            self._kill(state, rep.task_id)
        if state.record.started_at is None:
            state.record.started_at = now
            self._save_workflow(state)
        self._refresh_status(state, now)

    def _finished(self, state: WorkflowState, rep: TaskFinished, now: datetime) -> None:
        task_id = rep.task_id
        task = state.tasks[task_id]
        record = state.record
        task.delivery = rep.delivery
        task.executor_id = rep.executor_id
        task.started_at = task.started_at or rep.started_at
        task.finished_at = rep.finished_at
        task.exit_code = rep.exit_code
        task.output = rep.output
        # a stop the engine asked for with a reason (a key taken over) keeps that reason
        if not (rep.outcome == "cancelled" and task.cancel_requested and task.error):
            task.error = rep.error
        task.reason = rep.reason
        task.next_attempt_at = None
        if task.attempts:
            a = task.attempts[-1]
            a.executor_id, a.started_at, a.finished_at = (
                rep.executor_id,
                rep.started_at,
                rep.finished_at,
            )
            a.outcome, a.exit_code, a.reason, a.error = (
                rep.outcome,
                rep.exit_code,
                rep.reason,
                rep.error,
            )
        if rep.outcome == "completed":
            status = "completed"
            if record.cancel_requested or task.cancel_requested:
                task.note = CANCELLED_NOTE
            elif record.stopped:
                task.note = STOPPED_NOTE
        elif rep.outcome == "failed" and self._may_retry(state, task, rep):
            status = "retrying"
        else:
            status = "cancelled" if rep.outcome == "cancelled" else "failed"
        task.cancel_requested = False
        self._set(state, task_id, status)
        event = TaskEvent(
            state.id,
            task_id,
            status,
            now,
            attempt=rep.attempt,
            executor_id=rep.executor_id,
            error=rep.error,
            reason=rep.reason,
        )
        if status == "retrying":
            delay = task.spec.backoff.delay(task.attempt - task.attempts_before_run)
            task.next_attempt_at = now + timedelta(seconds=delay)
            self._save_task(state, task_id)
            self._emit(event)
            self._timer(state, task_id, task.next_attempt_at)
            return
        self._save_task(state, task_id)
        self._emit(event)
        self._ended(state, task_id, now)

    def _ended(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        """What a task's end means for the rest: its dependents become ready (completed), or
        are skipped and, under ``on_failure = "stop"``, the run stops (failed)."""
        status = state.tasks[task_id].status
        record = state.record
        if status == "completed":
            if self._may_start(state):
                for child in state.dependents.get(task_id, ()):
                    if state.is_ready(child):
                        self._push_ready(state, child, now)
        else:
            self._skip_dependents(state, task_id, now)
            if (
                status == "failed"
                and record.on_failure in ("stop", "compensate")
                and not record.stopped
            ):
                record.stopped = True
                self._save_workflow(state)
                self._stop_unstarted(
                    state, f"stopped: task {task_id!r} failed", now, kill_running=False
                )
        self._finish_if_done(state, now)

    def _handed_back(self, state: WorkflowState, rep: TaskHandedBack, now: datetime) -> None:
        task = state.tasks[rep.task_id]
        task.handbacks += 1
        task.handback_delivery = rep.delivery
        task.delivery = rep.delivery
        if task.status == "running":
            self._set(state, rep.task_id, "queued")
        self._save_task(state, rep.task_id)
        self._emit(
            TaskEvent(
                state.id,
                rep.task_id,
                task.status,
                now,
                attempt=rep.attempt,
                executor_id=rep.executor_id,
                reason="handed_back",
            )
        )

    def _may_retry(self, state: WorkflowState, task: TaskRecord, rep: TaskFinished) -> bool:
        return (
            rep.retryable
            and rep.reason not in ("cancelled", "refused", "plan_changed")
            and task.attempt - task.attempts_before_run <= task.spec.retries
            and not task.cancel_requested
            and self._may_start(state)
        )

    @staticmethod
    def _may_start(state: WorkflowState) -> bool:
        """Whether new attempts may start in this workflow's run: not once a cancel was
        asked for, nor while its own approval gate waits, nor after a stop (but for the
        compensation of a failed run)."""
        record = state.record
        if record.cancel_requested or record.approval_deadline is not None:
            return False
        return not record.stopped or record.status == "compensating"

    def _skip_dependents(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        for child in state.descendants(task_id):
            task = state.tasks[child]
            if task.status in ("pending", "waiting", "retrying", "awaiting_approval"):
                self.keys.unwait((state.id, child))
                task.approval_deadline = None
                self._claims.pop((state.id, child), None)
                task.waiting_for = task.waiting_since = None
                self._set(state, child, "skipped")
                task.reason = "dependency_failed"
                task.error = f"dependency {task_id!r} did not complete"
                task.finished_at = now
                task.next_attempt_at = None
                self._save_task(state, child)
                self._emit(TaskEvent(state.id, child, "skipped", now, reason="dependency_failed"))

    def _stop_unstarted(
        self, state: WorkflowState, reason: str, now: datetime, *, kill_running: bool
    ) -> None:
        """Cancel what was not dispatched; ask executors not to start what they have not
        started; with ``kill_running``, ask them to stop what runs too."""
        for task_id in state.order:
            task = state.tasks[task_id]
            if task.children is not None:
                continue  # a fan-out ends with its children
            if task.status in ("pending", "waiting", "retrying", "awaiting_approval"):
                self.keys.unwait((state.id, task_id))
                self._claims.pop((state.id, task_id), None)
                task.approval_deadline = None
                self._set(state, task_id, "cancelled")
                task.error, task.reason, task.finished_at = reason, "cancelled", now
                task.next_attempt_at = task.waiting_for = task.waiting_since = None
                self._save_task(state, task_id)
                self._emit(
                    TaskEvent(
                        state.id,
                        task_id,
                        "cancelled",
                        now,
                        attempt=task.attempt,
                        reason="cancelled",
                    )
                )
            elif task.status == "queued" or (
                kill_running and task.status in ("running", "cancelling")
            ):
                if task.status == "cancelling" and task.cancel_requested:
                    continue
                task.cancel_requested = True
                self._set(state, task_id, "cancelling")
                self._save_task(state, task_id)
                self._emit(
                    TaskEvent(
                        state.id, task_id, "cancelling", now, attempt=task.attempt, error=reason
                    )
                )
                if kill_running:
                    self._kill(state, task_id)

    def _dispatch(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        task = state.tasks[task_id]
        task.attempt += 1
        task.delivery = task.handbacks = task.handback_delivery = 0
        task.queued_at = now
        task.started_at = task.finished_at = None
        claims = self._claims.get((state.id, task_id), [])
        task.keys = [claim.key for claim in claims]
        task.waiting_for = task.waiting_since = None
        task.attempts.append(AttemptRecord(attempt=task.attempt))
        del task.attempts[:-ATTEMPTS_KEPT]
        self._set(state, task_id, "queued")
        self._save_task(state, task_id)
        self._send(state, task_id, now)
        self._emit(TaskEvent(state.id, task_id, "queued", now, attempt=task.attempt))

    def _send(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        task = state.tasks[task_id]
        message = TaskDispatch(
            workflow_id=state.id,
            task_id=task_id,
            attempt=task.attempt,
            action=task.spec.action,
            args=task.args if task.args is not None else task.spec.args,
            timeout_seconds=self.timeout_for(task.spec),
            pool=task.spec.pool,
            dispatched_at=now,
            mode="plan" if state.record.mode == "plan" else "run",
            expect_change=(state.record.expect or {}).get(task_id)
            if state.record.mode == "apply"
            else None,
        )
        self.effects.dispatches.append(Dispatch(message, state.record.traceparent))

    def _finish_if_done(self, state: WorkflowState, now: datetime) -> None:
        """End the workflow when every task has; it leaves memory with this step's effects."""
        self._settle_fanouts(state, now)
        record = state.record
        if not state.all_terminal() or record.status in TERMINAL_WORKFLOW:
            return
        compensated = [t for t in state.order if state.tasks[t].compensates is not None]
        if (
            record.on_failure == "compensate"
            and not compensated
            and not record.cancel_requested
            and state.counts.get("failed", 0)
            and self._compensate(state, now)
        ):
            return
        status = state.final_status()
        if compensated:
            undone = [state.tasks[t] for t in compensated]
            held = [u.compensates for u in undone if u.status != "completed" and u.compensates]
            status = "compensation_failed" if held else "failed"
        record.status = status  # type: ignore[assignment]
        record.finished_at = now
        failed = [
            t
            for t in state.order
            if state.tasks[t].status == "failed" and state.tasks[t].compensates is None
        ]
        record.error = f"failed tasks: {', '.join(failed[:10])}" if failed else None
        if status == "compensation_failed":
            record.error = f"{record.error}; compensation failed: still held by " + ", ".join(
                held[:10]
            )
        elif compensated:
            record.error = f"{record.error}; compensated: {len(compensated)} tasks undone"
        self._save_workflow(state)
        self._emit(WorkflowEvent(record.id, status, now, record.error or ""))
        self.effects.ended[record.id] = state
        self.workflows.pop(record.id, None)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _set(self, state: WorkflowState, task_id: str, status: str) -> None:
        old = state.set_status(task_id, status)
        if old == status:
            return
        task = state.tasks[task_id]
        pool = task.spec.pool
        if task.children is not None:
            pass  # an expanded fan-out is never out with an executor: its children are
        elif old in BUSY_TASK and status not in BUSY_TASK:
            self.inflight[pool] -= 1
            self._release(state, task_id)
        elif old not in BUSY_TASK and status in BUSY_TASK:
            self.inflight[pool] += 1
        if task.parent is not None:
            self._unsettled.add((state.id, task.parent))
        self.effects.counts[state.id] = state  # its counts changed
        self.effects.transitions.append((pool, status))

    def _push_ready(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        """Queue a ready task for dispatch: priority first, then how long it has been ready
        (a task that waited on a key keeps its place: ``waiting_since``)."""
        task = state.tasks[task_id]
        mode = state.record.mode
        if task.spec.approval is not None and task.approved_by is None and mode != "plan":
            self._gate(state, task_id, now)
            return
        if task.spec.for_each is not None and task.children is None:
            if mode == "plan":  # its items are only known when it runs
                self._complete_unplanned(state, task_id, now)
            else:
                self._expand(state, task_id, now)
            return
        if task.parent is not None and state.tasks[task.parent].spec.parallelism is not None:
            self._unsettled.add((state.id, task.parent))  # its parent feeds it in turn
            return
        self._enqueue(state, task_id, now)

    def _rank(self, state: WorkflowState) -> Rank:
        """Breaks ties in the ready and waiting lines by what the record holds, so that a
        scheduler restarted from the checkpoints lines the tasks up as its predecessor did."""
        return (state.submitted, state.id, next(self._seq))

    def _enqueue(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        task = state.tasks[task_id]
        if (state.id, task_id) in self._queued:
            return
        since = _ts(task.waiting_since or now)
        item = (-state.priority(task_id), since, self._rank(state), state.id, task_id)
        heapq.heappush(self._ready[task.spec.pool], item)
        self._queued.add((state.id, task_id))

    # -- approval gates and plans -----------------------------------------------------------------

    def _gate(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        """A ready task with an approval gate stops before it until it is decided."""
        task = state.tasks[task_id]
        assert task.spec.approval is not None
        task.approval_deadline = now + timedelta(seconds=task.spec.approval.timeout_seconds)
        self._set(state, task_id, "awaiting_approval")
        self._save_task(state, task_id)
        approvers = ", ".join(task.spec.approval.approvers) or "any authenticated caller"
        self._emit(
            TaskEvent(
                state.id, task_id, "awaiting_approval", now, detail=f"approval by {approvers}"
            )
        )
        self.effects.timers.append(
            Timer(state.id, task_id, 0, task.approval_deadline, kind="approval")
        )
        self._refresh_status(state, now)

    def _complete_unplanned(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        """In a plan, a fan-out's children are not known before it runs: it is planned as
        ``unknown``, without a dispatch."""
        task = state.tasks[task_id]
        task.output = {
            "change": "unknown",
            "detail": f"one task per item of {task.spec.for_each}, known when it runs",
        }
        task.finished_at = now
        self._set(state, task_id, "completed")
        self._save_task(state, task_id)
        self._emit(TaskEvent(state.id, task_id, "completed", now, detail="planned: unknown"))
        self._ended(state, task_id, now)

    # -- compensation ------------------------------------------------------------------------------

    def _compensate(self, state: WorkflowState, now: datetime) -> bool:
        """A failed run under ``on_failure = "compensate"``: one undo task per completed task
        that has a compensation, ``<task>[undo]``, each after the undos of what depended on
        its task (reverse dependency order). Returns whether there is anything to undo."""
        done = [
            t
            for t in state.order
            if state.tasks[t].status == "completed"
            and state.tasks[t].children is None
            and state.tasks[t].compensates is None
        ]
        undo: dict[str, TaskRecord] = {}
        for task_id in done:
            task = state.tasks[task_id]
            how = self.compensation_for(task.spec)
            if how is None:
                continue
            args = task.args if task.args is not None else task.spec.args
            spec = TaskSpec(
                id=f"{task_id}[undo]",
                action=how.action,
                args=_undo_args(how.args, args, task.output),
                retries=how.retries,
                pool=task.spec.pool,
                priority=task.spec.priority,
                timeout_seconds=task.spec.timeout_seconds,
            )
            undo[task_id] = TaskRecord(workflow_id=state.id, spec=spec, compensates=task_id)
        if not undo:
            return False
        for task_id, record in undo.items():
            source = state.tasks[task_id].parent or task_id
            after = [
                f"{d}[undo]"
                for d in [*state.descendants(source), *state.children(source)]
                if d in undo and d != task_id
            ]
            record.spec.depends_on = sorted(set(after))
        records = [undo[t] for t in done if t in undo]
        state.add_tasks(records)
        self.effects.new_tasks.extend((state, r.spec.id) for r in records)
        state.record.status = "compensating"
        self._save_workflow(state)
        self._emit(WorkflowEvent(state.id, "compensating", now, f"undoing {len(records)} tasks"))
        for record in records:
            self._emit(TaskEvent(state.id, record.spec.id, "pending", now, detail="compensation"))
        for ready in state.ready():
            self._push_ready(state, ready, now)
        return True

    # -- fan-out ---------------------------------------------------------------------------------

    def _expand(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        """A ready ``for_each`` task becomes one child per item of the list it refers to:
        ``<task>[<index>]``, each with the item for ``${item}``; it then runs as long as they
        do. An empty list completes it at once; a list over the bound fails it."""
        task = state.tasks[task_id]
        spec = task.spec
        assert spec.for_each is not None
        try:
            items = self._resolve(state, task_id, spec.for_each)
        except MissingPath as exc:
            self._refuse(state, task_id, exc.message, now, reason="bad_reference")
            return
        if not isinstance(items, list):
            kind = type(items).__name__ if items is not None else "null"
            self._refuse(
                state,
                task_id,
                f"for_each {spec.for_each}: not a list ({kind})",
                now,
                reason="bad_reference",
            )
            return
        if len(items) > self.max_fanout:
            self._refuse(
                state,
                task_id,
                f"for_each {spec.for_each}: {len(items)} items, over the bound of "
                f"{self.max_fanout} ([scheduler] max_fanout)",
                now,
                reason="too_many_items",
            )
            return
        children = [
            TaskRecord(
                workflow_id=state.id,
                spec=msgspec.structs.replace(
                    spec,
                    id=child_id(task_id, index),
                    for_each=None,
                    parallelism=None,
                    depends_on=[],
                ),
                parent=task_id,
                item=item,
            )
            for index, item in enumerate(items)
        ]
        task.children = len(children)
        task.started_at = now
        state.add_children(task_id, children)
        self._save_workflow(state)  # its counts changed
        self._set(state, task_id, "running")
        self._save_task(state, task_id)
        self.effects.new_tasks.extend((state, child.spec.id) for child in children)
        self._emit(
            TaskEvent(state.id, task_id, "running", now, detail=f"fan-out of {len(children)}")
        )
        for child in children:
            self._emit(TaskEvent(state.id, child.spec.id, "pending", now, detail="fan-out"))
        self._unsettled.add((state.id, task_id))

    def _settle_fanouts(self, state: WorkflowState, now: datetime) -> None:
        """Fan-outs of this workflow whose children changed: feed them more children (up to
        ``parallelism``), or end them once every child has ended."""
        mine = sorted(ref for ref in self._unsettled if ref[0] == state.id)
        for ref in mine:
            self._unsettled.discard(ref)
            self._settle(state, ref[1], now)

    def _settle(self, state: WorkflowState, task_id: str, now: datetime) -> None:
        task = state.tasks[task_id]
        if task.children is None or task.status != "running":
            return
        children = state.children(task_id)
        statuses = [state.tasks[c].status for c in children]
        if all(status in TERMINAL_TASK for status in statuses):
            if all(status == "completed" for status in statuses):
                status = "completed"
                task.output = [state.tasks[c].output for c in children]
                task.error = task.reason = None
            else:
                failed = [c for c in children if state.tasks[c].status == "failed"]
                status = "failed" if failed else "cancelled"
                task.reason = "children_failed" if failed else "cancelled"
                task.error = (
                    f"{len(failed)} of {len(children)} children failed: {', '.join(failed[:5])}"
                    if failed
                    else "cancelled"
                )
            task.finished_at = now
            self._set(state, task_id, status)
            self._save_task(state, task_id)
            self._emit(
                TaskEvent(state.id, task_id, status, now, error=task.error, reason=task.reason)
            )
            self._ended(state, task_id, now)
            return
        if not self._may_start(state):
            return
        limit = task.spec.parallelism
        active = sum(
            1
            for c in children
            if state.tasks[c].status in BUSY_TASK
            or state.tasks[c].status == "waiting"
            or (state.id, c) in self._queued
        )
        for child in children:
            if limit is not None and active >= limit:
                break
            if state.is_ready(child) and (state.id, child) not in self._queued:
                self._enqueue(state, child, now)
                active += 1

    # -- concurrency keys -------------------------------------------------------------------------

    def _claims_of(
        self, state: WorkflowState, task_id: str, *, now: datetime | None = None
    ) -> list[Claim] | None:
        """The task's keys (kept while it holds or waits for them). None when they cannot be
        made from its arguments: then, given ``now``, the task is refused (fails)."""
        ref = (state.id, task_id)
        if (known := self._claims.get(ref)) is not None:
            return known
        task = state.tasks[task_id]
        if state.record.mode == "plan":  # read-only: no keys; references are not results yet
            self._claims[ref] = []
            return []
        if task.args is None:
            try:
                task.args = self._resolve(state, task_id, task.spec.args)
            except MissingPath as exc:
                if now is not None:
                    self._refuse(state, task_id, exc.message, now, reason="bad_reference")
                return None
        try:
            claims = self.claims_for(task.spec, task.args)
        except DefinitionError as exc:
            if now is not None:
                self._refuse(state, task_id, exc.message, now)
            return None
        self._claims[ref] = claims
        return claims

    def _resolve(self, state: WorkflowState, task_id: str, value: Any) -> Any:
        """``value`` with the references to other tasks' results (and, in a fan-out child, to
        its item) replaced (``shared.refs``)."""
        task = state.tasks[task_id]

        def result_of(other: str) -> Any:
            return state.tasks[other].output if other in state.tasks else None

        return resolve(value, result_of, item=task.item, has_item=task.parent is not None)

    def _blocked(self, state: WorkflowState, task_id: str, blocked: Blocked, now: datetime) -> None:
        """A ready task found a key full (or over its rate): by the key's strategy it waits,
        is cancelled (``cancel_newest``), or cancels the holders and waits first in line for
        their slot (``cancel_in_progress``). Rates always make a task wait."""
        ref = (state.id, task_id)
        task = state.tasks[task_id]
        strategy = blocked.claim.strategy if blocked.rate_free_at is None else "queue"
        if strategy == "cancel_newest":
            self._claims.pop(ref, None)
            self._set(state, task_id, "cancelled")
            task.reason = "cancelled"
            task.error = f"cancelled (cancel_newest): {blocked.describe()}"
            task.finished_at = now
            task.waiting_for = task.waiting_since = None
            self._save_task(state, task_id)
            self._emit(
                TaskEvent(state.id, task_id, "cancelled", now, reason="cancelled", error=task.error)
            )
            self._skip_dependents(state, task_id, now)
            self._finish_if_done(state, now)
            return
        if strategy == "cancel_in_progress":
            for holder in blocked.holders:
                self._take_over(holder, blocked.claim.key, ref, now)
        task.waiting_for = blocked.describe()
        task.waiting_since = task.waiting_since or now
        self.keys.wait(
            ref,
            blocked.claim.key,
            state.priority(task_id),
            _ts(task.waiting_since),
            self._rank(state),
            first=strategy == "cancel_in_progress",
        )
        if task.status != "waiting":
            self._set(state, task_id, "waiting")
            self._emit(
                TaskEvent(
                    state.id, task_id, "waiting", now, reason="concurrency", detail=task.waiting_for
                )
            )
        self._save_task(state, task_id)
        if blocked.rate_free_at is not None:
            self.effects.wakeups.append(datetime.fromtimestamp(blocked.rate_free_at, UTC))

    def _take_over(self, holder: TaskRef, key: str, by: TaskRef, now: datetime) -> None:
        """Cancel a holder of ``key`` so that ``by`` can take its slot."""
        state = self.workflows.get(holder[0])
        if state is None or holder[1] not in state.tasks:
            return
        task = state.tasks[holder[1]]
        if task.status not in BUSY_TASK or task.cancel_requested:
            return
        task.cancel_requested = True
        task.error = f"cancelled (cancel_in_progress): {key} taken over by {by[0]}.{by[1]}"
        self._set(state, holder[1], "cancelling")
        self._save_task(state, holder[1])
        self._emit(
            TaskEvent(
                state.id, holder[1], "cancelling", now, attempt=task.attempt, error=task.error
            )
        )
        self._kill(state, holder[1])

    def _release(self, state: WorkflowState, task_id: str) -> None:
        """The task's attempt ended: its keys are free of it, and their first waiters are ready
        again (in their place)."""
        ref = (state.id, task_id)
        claims = self._claims.pop(ref, None)
        if not claims:
            return
        for key in self.keys.release(ref, claims):
            for wf_id, waiter in self.keys.next_waiters(key, self.keys.room(key)):
                self._ready_again(wf_id, waiter)

    def _ready_again(self, wf_id: str, task_id: str) -> None:
        """A waiting task's key has room: back in line for dispatch, in its place."""
        state = self.workflows.get(wf_id)
        if state is None or state.tasks[task_id].status != "waiting":
            return
        task = state.tasks[task_id]
        self._set(state, task_id, "pending")
        self._save_task(state, task_id)
        if state.is_ready(task_id) and self._may_start(state):
            self._push_ready(state, task_id, task.waiting_since or T_ZERO)

    def tick(self, now: datetime) -> None:
        """A rate window may have opened: the first waiters of rate-limited keys try again."""
        for key, room in self.keys.rate_room(_ts(now)):
            for wf_id, task_id in self.keys.next_waiters(key, room):
                self._ready_again(wf_id, task_id)
        self.pump(now)

    def _refuse(
        self,
        state: WorkflowState,
        task_id: str,
        error: str,
        now: datetime,
        *,
        reason: str = "refused",
    ) -> None:
        """End a task that cannot be dispatched at all: its keys cannot be made, or a
        reference in its arguments points to nothing (``reason: bad_reference``)."""
        task = state.tasks[task_id]
        self._set(state, task_id, "failed")
        task.reason, task.error, task.finished_at = reason, error, now
        self._save_task(state, task_id)
        self._emit(TaskEvent(state.id, task_id, "failed", now, reason=reason, error=error))
        self._ended(state, task_id, now)

    def _save_task(self, state: WorkflowState, task_id: str) -> None:
        self.effects.tasks[(state.id, task_id)] = state

    def _save_workflow(self, state: WorkflowState) -> None:
        self.effects.workflows[state.id] = state

    def _emit(self, event: WorkflowEvent | TaskEvent) -> None:
        self.effects.events.append(event)
        self.effects.event_ids.append(self._end_id(event))

    def _end_id(self, event: WorkflowEvent | TaskEvent) -> str | None:
        """The message id of an end event, from the checkpoint it goes with (see
        :meth:`replay_ends`); None for every other event."""
        state = self.workflows.get(event.workflow_id) or self.effects.ended.get(event.workflow_id)
        if state is None:
            return None
        if isinstance(event, WorkflowEvent):
            record = state.record
            if event.status not in TERMINAL_WORKFLOW or record.finished_at is None:
                return None
            return end_event_msg_id(record.id, None, 0, event.status, record.finished_at)
        task = state.tasks.get(event.task_id)
        if task is None or task.status != event.status or task.finished_at is None:
            return None
        if task.status not in TERMINAL_TASK and task.status != "retrying":
            return None
        return end_event_msg_id(
            state.id, event.task_id, task.attempt, task.status, task.finished_at
        )

    def replay_ends(
        self, record: WorkflowRecord, tasks: Mapping[str, TaskRecord], since: datetime
    ) -> None:
        """Emit again the end events of what ended since ``since`` (tasks' attempts, the
        workflow), each under the message id it was first published with.

        A scheduler that dies between a step's checkpoints and its events leaves those ends
        checkpointed but never told; the reports that caused them come again and find nothing
        left to do. Replayed on every take-over, the ends that were published are dropped by
        JetStream's deduplication and the lost ones are stored, once."""
        for task_id, task in tasks.items():
            done = task.status in TERMINAL_TASK or task.status == "retrying"
            if not done or task.finished_at is None or task.finished_at < since:
                continue
            self.effects.events.append(
                TaskEvent(
                    record.id,
                    task_id,
                    task.status,
                    task.finished_at,
                    attempt=task.attempt,
                    executor_id=task.executor_id,
                    error=task.error,
                    reason=task.reason,
                )
            )
            self.effects.event_ids.append(
                end_event_msg_id(record.id, task_id, task.attempt, task.status, task.finished_at)
            )
        if record.status in TERMINAL_WORKFLOW and record.id not in self.workflows:
            # ended, but its end was not finished (the active marker is still there): the
            # driver ends it again, after these events
            self.effects.ended[record.id] = WorkflowState(record, dict(tasks))
        finished = record.finished_at
        if record.status in TERMINAL_WORKFLOW and finished is not None and finished >= since:
            self.effects.events.append(
                WorkflowEvent(record.id, record.status, finished, record.error or "")
            )
            self.effects.event_ids.append(
                end_event_msg_id(record.id, None, 0, record.status, finished)
            )

    def _kill(self, state: WorkflowState, task_id: str) -> None:
        self.effects.kills[state.id].append(task_id)

    def _timer(self, state: WorkflowState, task_id: str, at: datetime) -> None:
        attempt = state.tasks[task_id].attempt
        self.effects.timers.append(Timer(state.id, task_id, attempt, at))

    def _refresh_status(self, state: WorkflowState, now: datetime) -> None:
        """The status of a workflow that has not ended: ``awaiting_approval`` while a gate of
        it waits, ``compensating`` while it undoes a failed run, else ``running`` once a task
        has started, else ``queued``."""
        record = state.record
        if record.status in TERMINAL_WORKFLOW or record.status == "compensating":
            return
        gated = record.approval_deadline is not None or state.counts.get("awaiting_approval", 0)
        status = (
            "awaiting_approval"
            if gated
            else ("running" if record.started_at is not None else "queued")
        )
        if status != record.status:
            record.status = status  # type: ignore[assignment]
            self._save_workflow(state)
            self._emit(WorkflowEvent(state.id, status, now))
