"""Events: what happened to a workflow, on PROV_EVENTS (SSE and monitors read them)."""

from __future__ import annotations

from datetime import datetime

import msgspec

__all__ = ["Event", "LogChunk", "ProgressEvent", "TaskEvent", "WorkflowEvent"]


class WorkflowEvent(msgspec.Struct, tag="workflow", omit_defaults=True):
    workflow_id: str
    status: str
    at: datetime
    message: str = ""
    v: int = 1


class TaskEvent(msgspec.Struct, tag="task", omit_defaults=True):
    workflow_id: str
    task_id: str
    status: str
    at: datetime
    attempt: int = 0
    executor_id: str | None = None
    error: str | None = None
    reason: str | None = None
    detail: str | None = None  # e.g. what a waiting task waits for
    v: int = 1


class ProgressEvent(msgspec.Struct, tag="progress", omit_defaults=True):
    workflow_id: str
    task_id: str
    percent: int
    at: datetime
    message: str = ""
    attempt: int = 0
    v: int = 1


class LogChunk(msgspec.Struct, tag="log", omit_defaults=True):
    """A batch of lines of one task's output, on PROV_LOGS."""

    workflow_id: str
    task_id: str
    attempt: int
    stream: str  # "stdout" | "stderr" | "system"
    lines: list[str]
    at: datetime
    v: int = 1


Event = WorkflowEvent | TaskEvent | ProgressEvent
