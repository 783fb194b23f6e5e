"""JSON views of records for API responses."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import msgspec

from shared.messages import (
    Progress,
    TaskRecord,
    WorkflowDefinition,
    WorkflowRecord,
    display_order,
)

__all__ = ["pending_summary", "pending_view", "task_view", "workflow_summary", "workflow_view"]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


def task_view(record: TaskRecord, progress: Progress | None) -> dict[str, Any]:
    spec = record.spec
    percent = 100 if record.status == "completed" else 0
    message = ""
    if progress is not None and progress.attempt == record.attempt and record.status != "completed":
        percent, message = progress.percent, progress.message
    return {
        "id": spec.id,
        "task_id": f"{record.workflow_id}.{spec.id}",
        "workflow_id": record.workflow_id,
        "action": spec.action,
        "args": record.args if record.args is not None else spec.args,
        "status": record.status,
        "attempt": record.attempt,
        "max_attempts": spec.retries + 1,
        "progress": percent,
        "progress_message": message,
        "executor_id": record.executor_id,
        "exit_code": record.exit_code,
        "reason": record.reason,
        "error": record.error,
        "output": record.output,
        "depends_on": spec.depends_on,
        "priority": spec.priority,
        "pool": spec.pool,
        "queued_at": _iso(record.queued_at),
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "next_attempt_at": _iso(record.next_attempt_at),
        "duration_seconds": _duration(record.started_at, record.finished_at),
        "attempts": msgspec.to_builtins(record.attempts),
        "handbacks": record.handbacks,
        "note": record.note,
        "keys": record.keys,
        "parent": record.parent,
        "children": record.children,
        "waiting_for": record.waiting_for,
        "waiting_since": _iso(record.waiting_since),
        "approved_by": record.approved_by,
        "approval_deadline": _iso(record.approval_deadline),
        "compensates": record.compensates,
    }


def workflow_summary(record: WorkflowRecord) -> dict[str, Any]:
    summary = {
        "workflow_id": record.id,
        "name": record.name,
        "status": record.status,
        "tasks_total": len(record.task_ids),
        "created_at": _iso(record.created_at),
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "duration_seconds": _duration(record.started_at or record.created_at, record.finished_at),
        "source": record.source,
        "runs": record.runs,
        "trace_id": record.trace_id,
        "error": record.error,
        "mode": record.mode,
    }
    if record.plan_id:
        summary["plan_id"] = record.plan_id
    if record.counts is not None:  # written by the scheduler since it took the workflow
        summary["counts"] = dict(record.counts)
        done = record.counts.get("completed", 0)
        summary["progress"] = round(100 * done / max(1, len(record.task_ids)))
    return summary


def workflow_view(
    record: WorkflowRecord,
    tasks: dict[str, TaskRecord] | None,
    progress: dict[str, Progress],
) -> dict[str, Any]:
    """The workflow with its tasks, or (``tasks`` None) its summary from the record alone."""
    view = workflow_summary(record)
    counts: dict[str, int]
    if tasks is not None:
        counts = dict(Counter(str(t.status) for t in tasks.values()))
    else:
        counts = dict(record.counts or {})
    view.update(
        priority=record.priority,
        on_failure=record.on_failure,
        description=record.description,
        cancel_requested=record.cancel_requested,
        counts=counts,
        submitted_by=record.submitted_by,
        approval=msgspec.to_builtins(record.approval) if record.approval else None,
        approval_deadline=_iso(record.approval_deadline),
        approvals=msgspec.to_builtins(record.approvals),
    )
    if tasks is not None:
        view["tasks"] = [
            task_view(tasks[t], progress.get(t)) for t in display_order(record.task_ids, tasks)
        ]
    view["progress"] = round(100 * counts.get("completed", 0) / max(1, len(record.task_ids)))
    return view


def pending_summary(
    workflow_id: str, name: str, tasks_total: int, submitted_at: datetime
) -> dict[str, Any]:
    """The summary of a workflow whose submission waits for the scheduler."""
    return {
        "workflow_id": workflow_id,
        "name": name,
        "status": "queued",
        "tasks_total": tasks_total,
        "created_at": _iso(submitted_at),
        "started_at": None,
        "finished_at": None,
        "trace_id": None,
        "counts": {"pending": tasks_total},
        "progress": 0,
    }


def pending_view(
    workflow_id: str,
    definition: WorkflowDefinition,
    submitted_at: datetime,
    *,
    include_tasks: bool = True,
) -> dict[str, Any]:
    """A workflow whose submission is durable but not yet taken by the scheduler."""
    view = pending_summary(workflow_id, definition.name, len(definition.tasks), submitted_at)
    if include_tasks:
        view["tasks"] = [
            {
                "id": t.id,
                "task_id": f"{workflow_id}.{t.id}",
                "action": t.action,
                "args": t.args,
                "status": "pending",
                "attempt": 0,
                "progress": 0,
                "depends_on": t.depends_on,
            }
            for t in definition.tasks
        ]
    return view
