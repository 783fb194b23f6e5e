"""Every JSON body the API answers, as msgspec Structs.

The handlers answer these (``views.py`` builds them from records) and ``openapi.py`` generates
the document's response schemas from them, so the two cannot drift: a new field on a Struct is
in both at once. Statuses come from the Literals of ``shared.messages.records``.

Fields default to ``UNSET`` only where an answer leaves the key out (a workflow the scheduler has
not taken yet knows less than its record does); everything else is always present, ``null``
included. Timestamps are RFC 3339: ``datetime.isoformat()`` (``+00:00``) in views, as the
records encode them (``Z``) in a task's ``attempts``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from shared.ids import NAME_RE
from shared.messages import OnFailure, TaskStatus, WorkflowStatus

__all__ = [
    "MAX_OFFSET",
    "MAX_PAGE",
    "RESPONSES",
    "TASK_KEY_PATTERN",
    "WORKFLOW_ID_PATTERN",
    "Accepted",
    "AttemptView",
    "Cancelling",
    "Error",
    "ErrorBody",
    "ExecutorView",
    "Executors",
    "Health",
    "LogLine",
    "NatsHealth",
    "ProgressAccepted",
    "RetryAccepted",
    "SchedulerHealth",
    "TaskLogs",
    "TaskView",
    "WorkflowList",
    "WorkflowSummary",
    "WorkflowView",
    "json_response",
]

MAX_PAGE = 500  # GET /workflows?limit=
MAX_OFFSET = 2**63 - 1  # GET /workflows?offset=
WORKFLOW_ID_PATTERN = r"^[0-9a-f]{32}$"  # shared.ids: 32 lowercase hex digits
TASK_KEY_PATTERN = r"^[0-9a-f]{32}\." + NAME_RE.pattern.removeprefix("^")

WorkflowId = Annotated[str, msgspec.Meta(pattern=WORKFLOW_ID_PATTERN)]
TaskKey = Annotated[
    str, msgspec.Meta(pattern=TASK_KEY_PATTERN, description="<workflow_id>.<task id>")
]
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
TaskCounts = Annotated[
    dict[TaskStatus, Count],
    msgspec.Meta(
        description="Tasks per status",
        extra_json_schema={"propertyNames": {"enum": list(get_args(TaskStatus))}},
    ),
]


class Error(msgspec.Struct, kw_only=True):
    """Every 4xx and 5xx answer."""

    error: ErrorBody


class ErrorBody(msgspec.Struct, kw_only=True):
    code: Annotated[str, msgspec.Meta(description="Stable, e.g. invalid_definition")]
    message: str
    details: dict[str, Any] | UnsetType = UNSET


class Accepted(msgspec.Struct, kw_only=True):
    """A submission is durable in JetStream. A repeated ``Idempotency-Key`` answers the
    workflow's current status with ``idempotent_replay`` (and without name, tasks, trace_id
    when the workflow was stored by an earlier submission)."""

    workflow_id: WorkflowId
    status: WorkflowStatus
    name: str | UnsetType = UNSET
    tasks: Annotated[int, msgspec.Meta(ge=1)] | UnsetType = UNSET
    trace_id: str | UnsetType | None = UNSET
    idempotent_replay: bool | UnsetType = UNSET


class NatsHealth(msgspec.Struct, kw_only=True):
    connected: bool
    jetstream: bool
    detail: str


class SchedulerHealth(msgspec.Struct, kw_only=True):
    """Whether a scheduler holds the lease (submissions wait in JetStream until one does)."""

    active: bool
    holder: str | UnsetType = UNSET
    since: Timestamp | UnsetType = UNSET
    renewed_seconds_ago: Seconds | UnsetType = UNSET
    detail: str | UnsetType = UNSET


class Health(msgspec.Struct, kw_only=True):
    status: Literal["healthy", "unhealthy"]
    version: str
    api_version: str
    nats: NatsHealth
    scheduler: SchedulerHealth


class AttemptView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One attempt of a task (keys without a value are left out)."""

    attempt: Annotated[int, msgspec.Meta(ge=1)]
    executor_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    error: str | None = None


class TaskView(msgspec.Struct, kw_only=True):
    """A task. A workflow still waiting for the scheduler lists its tasks with the keys that
    have no ``UNSET`` default only."""

    id: Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
    task_id: TaskKey
    workflow_id: WorkflowId | UnsetType = UNSET
    action: str
    status: TaskStatus
    attempt: Count
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] | UnsetType = UNSET
    progress: Percent
    progress_message: str | UnsetType = UNSET
    executor_id: str | UnsetType | None = UNSET
    exit_code: int | UnsetType | None = UNSET
    reason: str | UnsetType | None = UNSET
    error: str | UnsetType | None = UNSET
    output: Any | UnsetType = UNSET
    depends_on: list[str]
    priority: int | UnsetType | None = UNSET
    pool: str | UnsetType = UNSET
    queued_at: Timestamp | UnsetType | None = UNSET
    started_at: Timestamp | UnsetType | None = UNSET
    finished_at: Timestamp | UnsetType | None = UNSET
    next_attempt_at: Timestamp | UnsetType | None = UNSET
    duration_seconds: Seconds | UnsetType | None = UNSET
    attempts: list[AttemptView] | UnsetType = UNSET


class WorkflowSummary(msgspec.Struct, kw_only=True):
    """A workflow in a list. ``counts`` and ``progress`` once the scheduler has taken it;
    ``duration_seconds``, ``source``, ``runs`` and ``error`` once it has a record."""

    workflow_id: WorkflowId
    name: str
    status: WorkflowStatus
    tasks_total: Count
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_seconds: Seconds | UnsetType | None = UNSET
    source: str | UnsetType = UNSET
    runs: Annotated[int, msgspec.Meta(ge=1)] | UnsetType = UNSET
    trace_id: str | None
    error: str | UnsetType | None = UNSET
    counts: TaskCounts | UnsetType = UNSET
    progress: Percent | UnsetType = UNSET


class WorkflowView(WorkflowSummary, kw_only=True):
    """A workflow with its tasks (``?tasks=false``: without them). ``priority``,
    ``on_failure``, ``description`` and ``cancel_requested`` once it has a record."""

    counts: TaskCounts
    progress: Percent
    priority: int | UnsetType = UNSET
    on_failure: OnFailure | UnsetType = UNSET
    description: str | UnsetType = UNSET
    cancel_requested: bool | UnsetType = UNSET
    tasks: list[TaskView] | UnsetType = UNSET


class WorkflowList(msgspec.Struct, kw_only=True):
    """Workflows, newest first; ``next_offset`` is null on the last page."""

    workflows: list[WorkflowSummary]
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)]
    offset: Annotated[int, msgspec.Meta(ge=0, le=MAX_OFFSET)]
    next_offset: Count | None


class Cancelling(msgspec.Struct, kw_only=True):
    workflow_id: WorkflowId
    status: Literal["cancelling"]


class RetryAccepted(msgspec.Struct, kw_only=True):
    workflow_id: WorkflowId
    status: Literal["queued"]
    run: Annotated[int, msgspec.Meta(ge=2, description="The run this retry starts")]


class LogLine(msgspec.Struct, kw_only=True):
    attempt: int
    stream: Literal["stdout", "stderr", "system"]
    line: str
    at: Timestamp


class TaskLogs(msgspec.Struct, kw_only=True):
    task_id: TaskKey
    lines: list[LogLine]


class ProgressAccepted(msgspec.Struct, kw_only=True):
    task_id: TaskKey
    progress: Percent


class ExecutorView(msgspec.Struct, kw_only=True):
    """An executor that sent a heartbeat recently; ``alive`` while its beats keep coming."""

    id: str
    pool: str
    hostname: str
    pid: int
    slots: Annotated[int, msgspec.Meta(ge=0, description="max_concurrent_tasks")]
    running: Count
    running_tasks: list[str]
    draining: bool
    alive: bool
    last_beat: Timestamp
    last_beat_age_seconds: float
    started_at: Timestamp
    version: str


class Executors(msgspec.Struct, kw_only=True):
    executors: list[ExecutorView]


RESPONSES: tuple[type[msgspec.Struct], ...] = (
    Error,
    Accepted,
    Health,
    WorkflowList,
    WorkflowView,
    Cancelling,
    RetryAccepted,
    TaskView,
    TaskLogs,
    ProgressAccepted,
    Executors,
)
"""The top-level answers (their parts come along): ``openapi.py`` generates their schemas."""

_encoder = msgspec.json.Encoder()


def json_response(
    body: msgspec.Struct, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """``body`` as ``application/json; charset=utf-8``."""
    try:
        data = _encoder.encode(body)
    except UnicodeEncodeError:  # a lone surrogate from the request echoed in an error message
        data = json.dumps(msgspec.to_builtins(body)).encode()
    return web.Response(
        body=data, status=status, headers=headers, content_type="application/json", charset="utf-8"
    )
