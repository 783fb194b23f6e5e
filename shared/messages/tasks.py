"""Task dispatch (scheduler -> executors) and reports (executors -> scheduler)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

__all__ = [
    "FailureReason",
    "Outcome",
    "Report",
    "ReportBatch",
    "ReportMessage",
    "TaskDispatch",
    "TaskFinished",
    "TaskHandedBack",
    "TaskStarted",
]

Outcome = Literal["completed", "failed", "cancelled"]
FailureReason = Literal[
    "exit_code",  # the subprocess exited non-zero
    "timeout",  # timeout_seconds elapsed; the process group was killed
    "cancelled",  # the workflow was cancelled while the task ran
    "error",  # the action raised (builtins) or could not be started
    "refused",  # the executor refused the task (unknown action, commands disabled, ...)
    "max_deliveries",  # the task was delivered too often without a result (crashing executors)
    "lost",  # the scheduler gave up waiting (reserved)
]


class TaskDispatch(msgspec.Struct, tag="dispatch", forbid_unknown_fields=True):
    """One attempt of one task. ``attempt`` counts from 1; retries publish a new attempt."""

    workflow_id: str
    task_id: str
    attempt: int
    action: str
    args: dict[str, Any]
    timeout_seconds: float
    pool: str = "default"
    dispatched_at: datetime | None = None
    # "plan": run the action's read-only plan function instead; with expect_change (applying
    # a plan), plan first and run only if the change is still the one planned
    mode: Literal["run", "plan"] = "run"
    expect_change: str | None = None
    v: int = 1


class TaskStarted(msgspec.Struct, tag="started", forbid_unknown_fields=True):
    workflow_id: str
    task_id: str
    attempt: int
    delivery: int
    executor_id: str
    started_at: datetime
    v: int = 1


class TaskFinished(msgspec.Struct, tag="finished", forbid_unknown_fields=True):
    workflow_id: str
    task_id: str
    attempt: int
    delivery: int
    executor_id: str
    outcome: Outcome
    started_at: datetime
    finished_at: datetime
    exit_code: int | None = None
    reason: FailureReason | None = None
    error: str | None = None
    output: Any = None
    retryable: bool = True
    v: int = 1


class TaskHandedBack(msgspec.Struct, tag="handed_back", forbid_unknown_fields=True):
    """An executor shutting down gracefully stopped the attempt and gave its message back for
    redelivery: not a crash, so the delivery does not count toward ``max_deliveries``."""

    workflow_id: str
    task_id: str
    attempt: int
    delivery: int
    executor_id: str
    at: datetime
    v: int = 1


Report = TaskStarted | TaskFinished | TaskHandedBack


class ReportBatch(msgspec.Struct, tag="report_batch", forbid_unknown_fields=True):
    """Several reports of one executor in one message: what it had to say while its previous
    report was being stored (group commit). Each report keeps its own attempt and delivery and
    is fenced on its own, in order, exactly as if it had come alone; ``traceparents[i]`` is the
    trace context of ``reports[i]`` (empty without tracing).

    Sent only to a scheduler whose lease says it reads batches (``SchedulerLease.reads``), so
    an older scheduler never receives one."""

    executor_id: str
    reports: list[Report]
    traceparents: list[str] = []
    v: int = 1


ReportMessage = Report | ReportBatch
"""What can arrive on the reports stream."""
