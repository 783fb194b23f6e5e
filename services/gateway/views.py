"""Records as API answers: builds the Structs of ``responses.py``."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any, cast

import msgspec

from shared.messages import (
    AttemptRecord,
    ExecutorBeat,
    OnFailure,
    Progress,
    TaskRecord,
    TaskStatus,
    WorkflowDefinition,
    WorkflowRecord,
    display_order,
)

from .responses import AttemptView, ExecutorView, TaskView, WorkflowSummary, WorkflowView

__all__ = [
    "executor_view",
    "pending_summary",
    "pending_view",
    "task_view",
    "workflow_summary",
    "workflow_view",
]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def _progress(counts: dict[TaskStatus, int], total: int) -> int:
    """Completed tasks in percent. Fan-out children and compensations are counted among the
    tasks once they exist (a workflow's ``tasks_total`` is its definition's), so the share is
    of all the tasks counted when there are more of them."""
    return round(100 * counts.get("completed", 0) / max(1, total, sum(counts.values())))


def _progress_of_tasks(tasks: dict[str, TaskRecord], progress: dict[str, Progress]) -> int:
    """Progress from the tasks themselves: a completed task counts 100, a running one what it
    last reported, any other 0; 100 only once every task completed."""
    if not tasks:
        return 0
    total = 0
    for task_id, task in tasks.items():
        if task.status == "completed":
            total += 100
        elif task.status in ("running", "cancelling") and (p := progress.get(task_id)):
            total += p.percent if p.attempt == task.attempt else 0
    percent = round(total / len(tasks))
    return 99 if percent == 100 and total < 100 * len(tasks) else percent


def _counts(counts: dict[str, int]) -> dict[TaskStatus, int]:
    # The scheduler keys them by TaskStatus; the record's type says str only.
    return cast(dict[TaskStatus, int], dict(counts))


def _summary_fields(summary: WorkflowSummary) -> dict[str, Any]:
    """A summary's fields, to build the view that extends it (but ``counts`` and ``progress``,
    which the view always has)."""
    fields = msgspec.structs.asdict(summary)
    del fields["counts"], fields["progress"]
    return fields


def _attempt_view(record: AttemptRecord) -> AttemptView:
    return AttemptView(
        attempt=record.attempt,
        executor_id=record.executor_id,
        started_at=record.started_at,
        finished_at=record.finished_at,
        outcome=record.outcome,
        exit_code=record.exit_code,
        reason=record.reason,
        error=record.error,
    )


def task_view(record: TaskRecord, progress: Progress | None) -> TaskView:
    spec = record.spec
    percent = 100 if record.status == "completed" else 0
    message = ""
    if progress is not None and progress.attempt == record.attempt:
        # a completed task keeps its last word ("server wuji-cp-1 running at 10.0.0.5")
        message = progress.message
        if record.status != "completed":
            percent = progress.percent
    return TaskView(
        id=spec.id,
        task_id=f"{record.workflow_id}.{spec.id}",
        workflow_id=record.workflow_id,
        action=spec.action,
        args=record.args if record.args is not None else spec.args,  # as dispatched: resolved
        status=record.status,
        attempt=record.attempt,
        max_attempts=spec.retries + 1,
        progress=percent,
        progress_message=message,
        executor_id=record.executor_id,
        exit_code=record.exit_code,
        reason=record.reason,
        error=record.error,
        output=record.output,
        depends_on=spec.depends_on,
        priority=spec.priority,
        pool=spec.pool,
        queued_at=_iso(record.queued_at),
        started_at=_iso(record.started_at),
        finished_at=_iso(record.finished_at),
        next_attempt_at=_iso(record.next_attempt_at),
        duration_seconds=_duration(record.started_at, record.finished_at),
        attempts=[_attempt_view(a) for a in record.attempts],
        handbacks=record.handbacks,
        note=record.note,
        keys=record.keys,
        parent=record.parent,
        children=record.children,
        waiting_for=record.waiting_for,
        waiting_since=_iso(record.waiting_since),
        approved_by=record.approved_by,
        approval_deadline=_iso(record.approval_deadline),
        compensates=record.compensates,
    )


def workflow_summary(record: WorkflowRecord) -> WorkflowSummary:
    summary = WorkflowSummary(
        workflow_id=record.id,
        name=record.name,
        status=record.status,
        tasks_total=len(record.task_ids),
        created_at=record.created_at.isoformat(),
        started_at=_iso(record.started_at),
        finished_at=_iso(record.finished_at),
        duration_seconds=_duration(record.started_at or record.created_at, record.finished_at),
        source=record.source,
        runs=record.runs,
        trace_id=record.trace_id,
        error=record.error,
        mode=record.mode,
    )
    if record.plan_id:
        summary.plan_id = record.plan_id
    if record.counts is not None:  # written by the scheduler since it took the workflow
        summary.counts = _counts(record.counts)
        summary.progress = _progress(summary.counts, len(record.task_ids))
    return summary


def workflow_view(
    record: WorkflowRecord,
    tasks: dict[str, TaskRecord] | None,
    progress: dict[str, Progress],
    *,
    include_tasks: bool = True,
) -> WorkflowView:
    """The workflow with its tasks, or (``tasks`` None) its summary from the record alone;
    ``include_tasks=False`` leaves the list out (the counts still come from ``tasks``)."""
    if tasks is not None:
        counts: dict[TaskStatus, int] = dict(Counter(t.status for t in tasks.values()))
    else:
        counts = _counts(record.counts or {})
    view = WorkflowView(
        **_summary_fields(workflow_summary(record)),
        counts=counts,
        progress=(
            _progress_of_tasks(tasks, progress)
            if tasks is not None
            else _progress(counts, len(record.task_ids))
        ),
        priority=record.priority,
        on_failure=cast(OnFailure, record.on_failure),  # as the definition said
        description=record.description,
        cancel_requested=record.cancel_requested,
        submitted_by=record.submitted_by,
        approval=record.approval,
        approval_deadline=_iso(record.approval_deadline),
        approvals=record.approvals,
    )
    if tasks is not None and include_tasks:  # fan-out children and compensations included
        order = display_order(record.task_ids, tasks)
        view.tasks = [task_view(tasks[t], progress.get(t)) for t in order]
    return view


def pending_summary(
    workflow_id: str, name: str, tasks_total: int, submitted_at: datetime
) -> WorkflowSummary:
    """The summary of a workflow whose submission waits for the scheduler."""
    return WorkflowSummary(
        workflow_id=workflow_id,
        name=name,
        status="queued",
        tasks_total=tasks_total,
        created_at=submitted_at.isoformat(),
        started_at=None,
        finished_at=None,
        trace_id=None,
        counts={"pending": tasks_total},
        progress=0,
    )


def pending_view(
    workflow_id: str,
    definition: WorkflowDefinition,
    submitted_at: datetime,
    *,
    include_tasks: bool = True,
) -> WorkflowView:
    """A workflow whose submission is durable but not yet taken by the scheduler."""
    total = len(definition.tasks)
    summary = pending_summary(workflow_id, definition.name, total, submitted_at)
    view = WorkflowView(**_summary_fields(summary), counts={"pending": total}, progress=0)
    if include_tasks:
        view.tasks = [
            TaskView(
                id=t.id,
                task_id=f"{workflow_id}.{t.id}",
                action=t.action,
                args=t.args,
                status="pending",
                attempt=0,
                progress=0,
                depends_on=t.depends_on,
            )
            for t in definition.tasks
        ]
    return view


def executor_view(beat: ExecutorBeat, now: datetime) -> ExecutorView:
    age = (now - beat.at).total_seconds()
    return ExecutorView(
        id=beat.id,
        pool=beat.pool,
        hostname=beat.hostname,
        pid=beat.pid,
        slots=beat.max_concurrent_tasks,
        running=beat.running,
        running_tasks=beat.running_tasks,
        draining=beat.draining,
        alive=age <= 3 * beat.interval_seconds,
        last_beat=beat.at.isoformat(),
        last_beat_age_seconds=round(age, 1),
        started_at=beat.started_at.isoformat(),
        version=beat.version,
    )
