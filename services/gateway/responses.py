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

from shared.ids import CHILD_RE
from shared.messages import Approval, Decision, Mode, OnFailure, TaskStatus, WorkflowStatus

__all__ = [
    "MAX_OFFSET",
    "MAX_PAGE",
    "RESPONSES",
    "TASK_KEY_PATTERN",
    "WORKFLOW_ID_PATTERN",
    "Accepted",
    "AppliedBy",
    "Approving",
    "AttemptView",
    "Cancelling",
    "Concurrency",
    "Error",
    "ErrorBody",
    "ExecutorView",
    "Executors",
    "Health",
    "KeyView",
    "LogLine",
    "NatsHealth",
    "PlanNode",
    "PlanView",
    "PlannedChange",
    "ProgressAccepted",
    "RateView",
    "Rejecting",
    "RetryAccepted",
    "SchedulerHealth",
    "TaskLogs",
    "TaskView",
    "TracingHealth",
    "WorkflowList",
    "WorkflowSummary",
    "WorkflowView",
    "json_response",
]

MAX_PAGE = 500  # GET /workflows?limit=
MAX_OFFSET = 2**63 - 1  # GET /workflows?offset=
LOG_PAGE_DEFAULT = 1000  # GET /tasks/{id}/logs?limit=
LOG_PAGE_MAX = 10_000
MAX_ATTEMPT = 1_000_000  # GET /tasks/{id}/logs?attempt=
LOG_CURSOR_PATTERN = r"^[0-9]{1,19}\.[0-9]{1,6}$"  # <stream sequence>.<line index>
WORKFLOW_ID_PATTERN = r"^[0-9a-f]{32}$"  # shared.ids: 32 lowercase hex digits
# A task's id: a name, or one the engine made: a fan-out child's ``<name>[<index>]``, a
# compensation's ``<task>[undo]`` (shared.ids.CHILD_RE).
TASK_ID_PATTERN = CHILD_RE.pattern
TASK_KEY_PATTERN = r"^[0-9a-f]{32}\." + CHILD_RE.pattern.removeprefix("^")

WorkflowId = Annotated[str, msgspec.Meta(pattern=WORKFLOW_ID_PATTERN)]
TaskId = Annotated[
    str,
    msgspec.Meta(
        pattern=TASK_ID_PATTERN,
        description="A task's id; a fan-out child's is <name>[<index>], a compensation's "
        "<task>[undo]",
    ),
]
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
    when the workflow was stored by an earlier submission). A plan (``?plan=true``) is
    ``planning`` and names its ``plan_id`` (the id of the run that makes it)."""

    workflow_id: WorkflowId
    status: WorkflowStatus | Literal["planning"]
    name: str | UnsetType = UNSET
    tasks: Annotated[int, msgspec.Meta(ge=1)] | UnsetType = UNSET
    trace_id: str | UnsetType | None = UNSET
    idempotent_replay: bool | UnsetType = UNSET
    plan_id: WorkflowId | UnsetType = UNSET


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


class TracingHealth(msgspec.Struct, kw_only=True):
    """Where trace ids open (``[tracing] ui_url``); the console links them there."""

    ui_url: str


class Health(msgspec.Struct, kw_only=True):
    status: Literal["healthy", "unhealthy"]
    version: str
    api_version: str
    nats: NatsHealth
    scheduler: SchedulerHealth
    tracing: TracingHealth | UnsetType = UNSET


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
    have no ``UNSET`` default only. ``args``: as the current attempt was dispatched, references
    to dependency results resolved (before that, as written). ``keys``: the concurrency keys
    the current attempt holds; ``waiting_for``/``waiting_since``: while ``waiting``, for what
    and since when. ``parent``/``children``: fan-out. ``compensates``: the task a compensation
    undoes. ``approval_deadline``/``approved_by``: its approval gate. ``handbacks``: attempts
    an executor shutting down gave back. ``note``: how it ended although its workflow was
    cancelled or stopped meanwhile."""

    id: TaskId
    task_id: TaskKey
    workflow_id: WorkflowId | UnsetType = UNSET
    action: str
    args: dict[str, Any]
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
    depends_on: list[TaskId]
    priority: int | UnsetType | None = UNSET
    pool: str | UnsetType = UNSET
    queued_at: Timestamp | UnsetType | None = UNSET
    started_at: Timestamp | UnsetType | None = UNSET
    finished_at: Timestamp | UnsetType | None = UNSET
    next_attempt_at: Timestamp | UnsetType | None = UNSET
    duration_seconds: Seconds | UnsetType | None = UNSET
    attempts: list[AttemptView] | UnsetType = UNSET
    handbacks: Count | UnsetType = UNSET
    note: str | UnsetType | None = UNSET
    keys: list[str] | UnsetType = UNSET
    parent: TaskId | UnsetType | None = UNSET
    children: Count | UnsetType | None = UNSET
    waiting_for: str | UnsetType | None = UNSET
    waiting_since: Timestamp | UnsetType | None = UNSET
    approved_by: str | UnsetType | None = UNSET
    approval_deadline: Timestamp | UnsetType | None = UNSET
    compensates: TaskId | UnsetType | None = UNSET


class WorkflowSummary(msgspec.Struct, kw_only=True):
    """A workflow in a list. ``counts`` and ``progress`` once the scheduler has taken it;
    ``duration_seconds``, ``source``, ``runs``, ``error`` and ``mode`` once it has a record;
    ``plan_id`` when it applies a plan. ``counts`` include fan-out children and compensations,
    and ``progress`` is the share of all of them that completed."""

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
    mode: Mode | UnsetType = UNSET
    plan_id: WorkflowId | UnsetType = UNSET


class WorkflowView(WorkflowSummary, kw_only=True):
    """A workflow with its tasks (``?tasks=false``: without them), fan-out children right after
    their parent and compensations last. ``priority``, ``on_failure``, ``description``,
    ``cancel_requested``, ``submitted_by`` (the caller's name), ``approval`` (its own gate,
    while it waits), ``approval_deadline`` and ``approvals`` (every decision taken on a gate of
    the workflow or of its tasks) once it has a record."""

    counts: TaskCounts
    progress: Percent
    priority: int | UnsetType = UNSET
    on_failure: OnFailure | UnsetType = UNSET
    description: str | UnsetType = UNSET
    cancel_requested: bool | UnsetType = UNSET
    submitted_by: str | UnsetType | None = UNSET
    approval: Approval | UnsetType | None = UNSET
    approval_deadline: Timestamp | UnsetType | None = UNSET
    approvals: list[Decision] | UnsetType = UNSET
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
    """One page of a task's lines, oldest first (of ``attempt``, or of every attempt when it
    is null). ``next_cursor`` continues after the last line (send it back as ``cursor``); it
    is null when there were no more lines when the page was read."""

    task_id: TaskKey
    attempt: Annotated[int, msgspec.Meta(ge=1, le=MAX_ATTEMPT)] | None
    lines: list[LogLine]
    next_cursor: Annotated[str, msgspec.Meta(pattern=LOG_CURSOR_PATTERN)] | None


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


class RateView(msgspec.Struct, kw_only=True):
    """A key's rate: at most ``count`` starts per ``window_seconds``; ``next_free_at`` when the
    window is full (null otherwise)."""

    count: Annotated[int, msgspec.Meta(ge=1)]
    window_seconds: Annotated[float, msgspec.Meta(gt=0)]
    started_in_window: Count
    next_free_at: Timestamp | None


class KeyView(msgspec.Struct, kw_only=True):
    """A concurrency key in use: its limit (null: none), the tasks that hold it (as
    ``<workflow_id>.<task id>``) and those that wait for it, in order, and its rate."""

    key: str
    limit: Count | None
    holders: list[str]
    waiters: list[str]
    rate: RateView | None


class Concurrency(msgspec.Struct, kw_only=True):
    keys: list[KeyView]


class PlannedChange(msgspec.Struct, kw_only=True):
    """What one task of a plan would change: its plan function's ``change`` (``create``,
    ``update``, ``delete``, ``none`` or ``unknown``; null until planned) and ``detail``."""

    task: TaskId
    action: str
    change: Any
    detail: Any
    status: TaskStatus
    error: str | None


class PlanNode(msgspec.Struct, kw_only=True):
    id: TaskId
    action: str
    depends_on: list[TaskId]


class AppliedBy(msgspec.Struct, kw_only=True):
    """The workflow that applies the plan (a plan is applied once)."""

    workflow_id: WorkflowId
    status: WorkflowStatus


class PlanView(msgspec.Struct, kw_only=True):
    """A plan (``POST /workflows?plan=true``): ``planning``, then ``ready`` or ``failed``.
    ``summary``: tasks per change (``pending`` until planned). A plan the scheduler has not
    taken yet has no ``age_seconds``, ``expires_in_seconds``, hashes, ``dag`` or ``error``."""

    plan_id: WorkflowId
    name: str
    status: Literal["planning", "ready", "failed"]
    created_at: Timestamp
    age_seconds: Seconds | UnsetType = UNSET
    expires_in_seconds: Seconds | UnsetType = UNSET
    definition_hash: str | UnsetType | None = UNSET
    infra_hashes: dict[str, str] | UnsetType = UNSET
    summary: dict[str, Count]
    tasks: list[PlannedChange]
    dag: list[PlanNode] | UnsetType = UNSET
    error: str | UnsetType | None = UNSET
    applied_by: AppliedBy | None


class Approving(msgspec.Struct, kw_only=True):
    """An approval sent to the scheduler: by whom (the caller's name), and the gates it
    decides (``workflow``, or task ids)."""

    workflow_id: WorkflowId
    status: Literal["approving"]
    by: str
    gates: list[str]


class Rejecting(msgspec.Struct, kw_only=True):
    workflow_id: WorkflowId
    status: Literal["rejecting"]
    by: str
    reason: str


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
    Concurrency,
    PlanView,
    Approving,
    Rejecting,
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
