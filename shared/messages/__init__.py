"""Messages and records as tagged msgspec Structs, one module per concern."""

from .codec import (
    DecodeError,
    decode_beat,
    decode_command,
    decode_dispatch,
    decode_event,
    decode_lease,
    decode_log,
    decode_progress,
    decode_report,
    decode_task,
    decode_workflow,
    encode,
    from_builtins,
)
from .commands import CancelWorkflow, Command, RetryWorkflow, SubmitWorkflow
from .definition import Backoff, OnFailure, TaskSpec, WorkflowDefinition
from .events import Event, LogChunk, ProgressEvent, TaskEvent, WorkflowEvent
from .executors import ExecutorBeat
from .leases import SchedulerLease
from .records import (
    TERMINAL_TASK,
    TERMINAL_WORKFLOW,
    AttemptRecord,
    Progress,
    TaskRecord,
    TaskStatus,
    WorkflowRecord,
    WorkflowStatus,
)
from .tasks import FailureReason, Outcome, Report, TaskDispatch, TaskFinished, TaskStarted

__all__ = [
    "TERMINAL_TASK",
    "TERMINAL_WORKFLOW",
    "AttemptRecord",
    "Backoff",
    "CancelWorkflow",
    "Command",
    "DecodeError",
    "Event",
    "ExecutorBeat",
    "FailureReason",
    "LogChunk",
    "OnFailure",
    "Outcome",
    "Progress",
    "ProgressEvent",
    "Report",
    "RetryWorkflow",
    "SchedulerLease",
    "SubmitWorkflow",
    "TaskDispatch",
    "TaskEvent",
    "TaskFinished",
    "TaskRecord",
    "TaskSpec",
    "TaskStarted",
    "TaskStatus",
    "WorkflowDefinition",
    "WorkflowEvent",
    "WorkflowRecord",
    "WorkflowStatus",
    "decode_beat",
    "decode_command",
    "decode_dispatch",
    "decode_event",
    "decode_lease",
    "decode_log",
    "decode_progress",
    "decode_report",
    "decode_task",
    "decode_workflow",
    "encode",
    "from_builtins",
]
