"""Every stream, subject, consumer and bucket name in one place."""

from __future__ import annotations

__all__ = [
    "BUCKET_ACTIVE",
    "BUCKET_EXECUTORS",
    "BUCKET_LEASES",
    "BUCKET_PROGRESS",
    "BUCKET_TASKS",
    "BUCKET_WORKFLOWS",
    "CONSUMER_COMMANDS",
    "CONSUMER_REPORTS",
    "LEASE_SCHEDULER",
    "STREAM_COMMANDS",
    "STREAM_DISPATCH",
    "STREAM_DLQ",
    "STREAM_EVENTS",
    "STREAM_LOGS",
    "STREAM_REPORTS",
    "cancel_subject",
    "command_subject",
    "dispatch_filter",
    "dispatch_subject",
    "dlq_subject",
    "event_subject",
    "executor_consumer",
    "log_filter",
    "log_subject",
    "report_subject",
]

PREFIX = "prov"

# Work queues (WorkQueue retention: a message is removed when acked).
STREAM_COMMANDS = "PROV_COMMANDS"  # gateway -> scheduler: submit, cancel, retry
STREAM_DISPATCH = "PROV_DISPATCH"  # scheduler -> executors: one message per task attempt
STREAM_REPORTS = "PROV_REPORTS"  # executors -> scheduler: started, finished
# Histories (Limits retention: kept by age and size).
STREAM_EVENTS = "PROV_EVENTS"  # state changes and progress, per workflow (SSE, monitors)
STREAM_LOGS = "PROV_LOGS"  # task stdout/stderr, per task
STREAM_DLQ = "PROV_DLQ"  # undecodable or undeliverable messages, with their payload

CONSUMER_COMMANDS = "scheduler-commands"
CONSUMER_REPORTS = "scheduler-reports"

BUCKET_WORKFLOWS = "prov_workflows"  # <workflow_id> -> WorkflowRecord
BUCKET_TASKS = "prov_tasks"  # <workflow_id>.<task_id> -> TaskRecord
BUCKET_ACTIVE = "prov_active"  # <workflow_id> -> b"" while the workflow is not finished
BUCKET_PROGRESS = "prov_progress"  # <workflow_id>.<task_id> -> Progress (last reported)
BUCKET_EXECUTORS = "prov_executors"  # <executor_id> -> ExecutorBeat, expires by TTL
BUCKET_LEASES = "prov_leases"  # LEASE_SCHEDULER -> SchedulerLease of the active scheduler
LEASE_SCHEDULER = "scheduler"


def command_subject(kind: str, workflow_id: str) -> str:
    """``prov.cmd.<submit|cancel|retry>.<workflow_id>``: one subject per workflow and kind."""
    return f"{PREFIX}.cmd.{kind}.{workflow_id}"


def dispatch_subject(pool: str, workflow_id: str, task_id: str) -> str:
    return f"{PREFIX}.dispatch.{pool}.{workflow_id}.{task_id}"


def dispatch_filter(pool: str) -> str:
    return f"{PREFIX}.dispatch.{pool}.>"


def executor_consumer(pool: str) -> str:
    return f"executors-{pool}"


def report_subject(workflow_id: str, task_id: str) -> str:
    return f"{PREFIX}.report.{workflow_id}.{task_id}"


def event_subject(workflow_id: str) -> str:
    return f"{PREFIX}.evt.{workflow_id}"


def log_subject(workflow_id: str, task_id: str) -> str:
    return f"{PREFIX}.log.{workflow_id}.{task_id}"


def log_filter(workflow_id: str, task_id: str) -> str:
    return log_subject(workflow_id, task_id)


def cancel_subject(workflow_id: str) -> str:
    """Core NATS (not persisted): tells executors to stop a workflow's running tasks now."""
    return f"{PREFIX}.kill.{workflow_id}"


def dlq_subject(source: str) -> str:
    return f"{PREFIX}.dlq.{source}"
