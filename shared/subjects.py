"""Every stream, subject, subject filter, consumer, bucket, KV key and message id, built here.

No other module spells one of these formats: a change of layout is a change of this file.
"""

from __future__ import annotations

import base64
from datetime import datetime

__all__ = [
    "BUCKET_ACTIVE",
    "BUCKET_EXECUTORS",
    "BUCKET_KEYS",
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
    "STREAM_SUBJECTS",
    "cancel_subject",
    "command_filter",
    "command_subject",
    "concurrency_kv_key",
    "dispatch_filter",
    "dispatch_msg_id",
    "dispatch_subject",
    "dlq_subject",
    "end_event_msg_id",
    "event_subject",
    "executor_consumer",
    "finished_msg_id",
    "handback_msg_id",
    "kill_filter",
    "kill_workflow",
    "log_filter",
    "log_subject",
    "report_batch_msg_id",
    "report_batch_subject",
    "report_subject",
    "retry_msg_id",
    "submit_msg_id",
    "task_key",
    "task_of_token",
    "task_token",
    "workflow_of_command",
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

# The subjects each stream captures.
STREAM_SUBJECTS = {
    STREAM_COMMANDS: f"{PREFIX}.cmd.>",
    STREAM_DISPATCH: f"{PREFIX}.dispatch.>",
    STREAM_REPORTS: f"{PREFIX}.report.>",
    STREAM_EVENTS: f"{PREFIX}.evt.>",
    STREAM_LOGS: f"{PREFIX}.log.>",
    STREAM_DLQ: f"{PREFIX}.dlq.>",
}

CONSUMER_COMMANDS = "scheduler-commands"
CONSUMER_REPORTS = "scheduler-reports"

BUCKET_WORKFLOWS = "prov_workflows"  # <workflow_id> -> WorkflowRecord
BUCKET_TASKS = "prov_tasks"  # <workflow_id>.<task_id> -> TaskRecord
BUCKET_ACTIVE = "prov_active"  # <workflow_id> -> b"" while the workflow is not finished
BUCKET_PROGRESS = "prov_progress"  # <workflow_id>.<task_id> -> Progress (last reported)
BUCKET_EXECUTORS = "prov_executors"  # <executor_id> -> ExecutorBeat, expires by TTL
BUCKET_LEASES = "prov_leases"  # LEASE_SCHEDULER -> SchedulerLease of the active scheduler
BUCKET_KEYS = "prov_keys"  # concurrency_kv_key(<key>) -> KeyState of a concurrency key in use
LEASE_SCHEDULER = "scheduler"


def task_token(task_id: str) -> str:
    """A task id as one token of a subject or KV key: ``install[3]`` becomes ``install=3`` and
    ``install[3][undo]`` ``install=3=undo`` (brackets are not allowed in KV keys; ``=`` is not
    allowed in task names)."""
    return task_id.replace("]", "").replace("[", "=")


def task_of_token(token: str) -> str:
    """The task id a :func:`task_token` stands for."""
    name, *parts = token.split("=")
    return name + "".join(f"[{part}]" for part in parts)


def task_key(workflow_id: str, task_id: str) -> str:
    """A task's KV key in the task and progress buckets, ``<workflow_id>.<task token>``; also
    how services name the task in their logs (the API's global id is ``<workflow>.<task>``)."""
    return f"{workflow_id}.{task_token(task_id)}"


def concurrency_kv_key(key: str) -> str:
    """A concurrency key as a KV key: its UTF-8 in base64url (keys such as ``server:x`` hold
    characters a KV key cannot)."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def command_subject(kind: str, workflow_id: str) -> str:
    """``prov.cmd.<submit|cancel|retry>.<workflow_id>``: one subject per workflow and kind."""
    return f"{PREFIX}.cmd.{kind}.{workflow_id}"


def command_filter(kind: str) -> str:
    """Every workflow's commands of one kind, e.g. the submissions waiting for a scheduler."""
    return f"{PREFIX}.cmd.{kind}.*"


def workflow_of_command(subject: str) -> str:
    return subject.rsplit(".", 1)[-1]


def submit_msg_id(workflow_id: str) -> str:
    """JetStream deduplicates a submission repeated within its window by this id."""
    return f"submit.{workflow_id}"


def retry_msg_id(workflow_id: str, runs: int) -> str:
    """One retry per run of a workflow, however often it is asked for."""
    return f"retry.{workflow_id}.{runs}"


def dispatch_msg_id(workflow_id: str, task_id: str, attempt: int) -> str:
    """One dispatch per task attempt: a re-published one (recovery) is not stored twice."""
    return f"{task_key(workflow_id, task_id)}.{attempt}"


def finished_msg_id(workflow_id: str, task_id: str, attempt: int, delivery: int) -> str:
    """One result per delivery of an attempt."""
    return f"{task_key(workflow_id, task_id)}.{attempt}.{delivery}.done"


def handback_msg_id(workflow_id: str, task_id: str, attempt: int, delivery: int) -> str:
    return f"{task_key(workflow_id, task_id)}.{attempt}.{delivery}.back"


def dispatch_subject(pool: str, workflow_id: str, task_id: str) -> str:
    return f"{PREFIX}.dispatch.{pool}.{workflow_id}.{task_token(task_id)}"


def dispatch_filter(pool: str) -> str:
    return f"{PREFIX}.dispatch.{pool}.>"


def executor_consumer(pool: str) -> str:
    return f"executors-{pool}"


def report_subject(workflow_id: str, task_id: str) -> str:
    return f"{PREFIX}.report.{workflow_id}.{task_token(task_id)}"


def report_batch_subject(sender: str) -> str:
    """Where an executor sends batches of reports: ``sender`` is a token of its own (letters and
    digits); ``batch`` can never be a workflow id (32 hex digits), so no report subject of a
    task is ever a batch's."""
    return f"{PREFIX}.report.batch.{sender}"


def report_batch_msg_id(sender: str, number: int) -> str:
    """One id per batch of one executor process: a retried publish of it is stored once."""
    return f"reports.{sender}.{number}"


def event_subject(workflow_id: str) -> str:
    return f"{PREFIX}.evt.{workflow_id}"


def end_event_msg_id(
    workflow_id: str, task_id: str | None, attempt: int, status: str, finished_at: datetime
) -> str:
    """The one id of an end in a workflow's history (a task's attempt ending, the workflow's
    end), from what its checkpoint says: published again after a crash, it is stored once
    (within the duplicate window). A task run again (a retried workflow) ends at another time."""
    what = f"{task_key(workflow_id, task_id)}.{attempt}" if task_id else workflow_id
    return f"evt.{what}.{status}.{int(finished_at.timestamp() * 1_000_000)}"


def log_subject(workflow_id: str, task_id: str, attempt: int) -> str:
    """One subject per task attempt: an attempt's lines are read, paged and purged alone."""
    return f"{PREFIX}.log.{workflow_id}.{task_token(task_id)}.{attempt}"


def log_filter(workflow_id: str, task_id: str) -> str:
    """Every attempt's lines of a task."""
    return f"{PREFIX}.log.{workflow_id}.{task_token(task_id)}.*"


def cancel_subject(workflow_id: str) -> str:
    """Core NATS (not persisted): tells executors to stop a workflow's running tasks now."""
    return f"{PREFIX}.kill.{workflow_id}"


def kill_filter() -> str:
    """What every executor listens to: the kill requests of all workflows."""
    return f"{PREFIX}.kill.*"


def kill_workflow(subject: str) -> str:
    """The workflow a kill request on ``subject`` is for."""
    return subject.rsplit(".", 1)[-1]


def dlq_subject(source: str) -> str:
    return f"{PREFIX}.dlq.{source}"
