"""Checkpointed state in JetStream KV: one record per workflow and one per task."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from .definition import Approval, TaskSpec

__all__ = [
    "BUSY_TASK",
    "TERMINAL_TASK",
    "TERMINAL_WORKFLOW",
    "AttemptRecord",
    "Progress",
    "TaskRecord",
    "TaskStatus",
    "WorkflowRecord",
    "WorkflowStatus",
    "display_order",
]

WorkflowStatus = Literal[
    "queued",
    "awaiting_approval",  # stopped at an approval gate (of the workflow or of a task)
    "running",
    "compensating",  # the run failed; undoing what it did (on_failure = "compensate")
    "completed",
    "failed",
    "cancelled",
    "compensation_failed",  # an undo failed: resources may still be held (see error)
]
# What a workflow run does: runs its tasks, plans them (read-only), or applies a plan.
Mode = Literal["run", "plan", "apply"]
TaskStatus = Literal[
    "pending",
    "awaiting_approval",  # ready, stopped at its approval gate
    "waiting",  # ready, but held back by a concurrency key or rate (see waiting_for)
    "queued",
    "running",
    "cancelling",  # a cancel was asked for while an executor had the task: its fate is not known
    "retrying",
    "completed",
    "failed",
    "cancelled",
    "skipped",
]
TERMINAL_WORKFLOW: frozenset[str] = frozenset(
    {"completed", "failed", "cancelled", "compensation_failed"}
)
TERMINAL_TASK: frozenset[str] = frozenset({"completed", "failed", "cancelled", "skipped"})
# The current attempt is out with an executor: dispatched, and not yet reported finished.
BUSY_TASK: frozenset[str] = frozenset({"queued", "running", "cancelling"})


class AttemptRecord(msgspec.Struct, omit_defaults=True):
    attempt: int
    executor_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    error: str | None = None


class Decision(msgspec.Struct, omit_defaults=True):
    """An approval gate decided: by whom, when, for the workflow or one task."""

    decision: Literal["approved", "rejected", "timed_out"]
    by: str
    at: datetime
    task_id: str | None = None
    comment: str = ""


class TaskRecord(msgspec.Struct, omit_defaults=True):
    workflow_id: str
    spec: TaskSpec
    status: TaskStatus = "pending"
    attempt: int = 0
    delivery: int = 0
    executor_id: str | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    next_attempt_at: datetime | None = None
    exit_code: int | None = None
    reason: str | None = None
    error: str | None = None
    output: Any = None
    attempts: list[AttemptRecord] = msgspec.field(default_factory=list)
    cancel_requested: bool = False
    # attempts made in earlier runs of the workflow: each run (POST /retry) has the task's
    # whole retry budget again
    attempts_before_run: int = 0
    # set when the task finished although its workflow was cancelled or stopped meanwhile
    note: str | None = None
    # graceful hand-backs of the current attempt (an executor shutting down gave it back):
    # deliveries that are not crashes, so they do not count toward max_deliveries
    handbacks: int = 0
    handback_delivery: int = 0  # the delivery of the last hand-back counted
    # concurrency: the keys the current attempt holds (set at dispatch); while waiting, for
    # what (the key and its holders, or the rate) and since when (the order of waiters)
    keys: list[str] = msgspec.field(default_factory=list)
    waiting_for: str | None = None
    waiting_since: datetime | None = None
    # the arguments the current attempt was dispatched with, references resolved
    args: dict[str, Any] | None = None
    # fan-out: a parent's number of children once expanded; a child's parent and its item
    children: int | None = None
    parent: str | None = None
    item: Any = None
    # approval gate: until when it may wait, and who approved it
    approval_deadline: datetime | None = None
    approved_by: str | None = None
    # a compensation task: the task whose work it undoes
    compensates: str | None = None
    v: int = 1


class WorkflowRecord(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    status: WorkflowStatus
    created_at: datetime
    task_ids: list[str]
    priority: int = 0
    on_failure: str = "stop"
    description: str = ""
    source: str = "api"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    trace_id: str | None = None
    traceparent: str | None = None
    idempotency_key: str | None = None
    error: str | None = None
    runs: int = 1
    cancel_requested: bool = False
    # on_failure = "stop" took effect: no new attempt starts in this run
    stopped: bool = False
    mode: Mode = "run"
    # plan: what it was made from; apply: the plan applied and each task's planned change
    definition_hash: str | None = None
    infra_hashes: dict[str, str] | None = None
    plan_id: str | None = None
    expect: dict[str, str] | None = None
    submitted_by: str | None = None
    # the workflow's own approval gate (definition.approval) while it waits, its deadline,
    # and every decision taken on a gate of the workflow or of its tasks
    approval: Approval | None = None
    approval_deadline: datetime | None = None
    approvals: list[Decision] = msgspec.field(default_factory=list)
    # Tasks per status, written by the scheduler with each step that changes one: a summary
    # of the workflow costs one read, not one per task. None in records of older versions.
    counts: dict[str, int] | None = None
    v: int = 1


class Progress(msgspec.Struct, omit_defaults=True):
    percent: int
    at: datetime
    message: str = ""
    attempt: int = 0
    v: int = 1


def display_order(task_ids: list[str], tasks: dict[str, TaskRecord]) -> list[str]:
    """Every task of a workflow in the order of its definition, each fan-out's children (in
    index order) right after it, then the compensations of a compensated run."""
    order: list[str] = []
    for task_id in task_ids:
        order.append(task_id)
        record = tasks.get(task_id)
        if record is not None and record.children:
            order += [f"{task_id}[{i}]" for i in range(record.children)]
    # compensations, after everything, in the order their tasks ran
    order += [f"{t}[undo]" for t in list(order) if f"{t}[undo]" in tasks]
    return [t for t in order if t in tasks]
