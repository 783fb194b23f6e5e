"""What reaches the scheduler, and what it will not take.

Fetch loops pull commands and executor reports from their durable consumers into the engine's
inbox. Each message is decoded strictly and checked to be something a gateway or an executor
could have sent (:func:`read_command`, :func:`read_reports`); anything else is :class:`Poison`,
dead-lettered at once. An input whose processing keeps failing for reasons of its own is
dead-lettered after :data:`POISON_DELIVERIES` deliveries (:func:`poisonous`); failures that are
not the input's fault (NATS away, a leader election, a checkpoint changed under us) are retried
however often they happen, so a long outage never loses an accepted workflow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors

from shared import subjects
from shared.bus import TRANSIENT
from shared.config import Config
from shared.errors import DefinitionError, MessageError, ProvisioningError
from shared.ids import is_task_id, is_workflow_id
from shared.messages import (
    ApproveWorkflow,
    CancelWorkflow,
    Command,
    RejectWorkflow,
    Report,
    ReportBatch,
    RetryWorkflow,
    SubmitWorkflow,
    decode_command,
    decode_report_message,
)
from shared.pull import Puller
from shared.store import Conflict
from shared.workflow import validate_definition

__all__ = [
    "NOT_THE_INPUT",
    "POISON_DELIVERIES",
    "Later",
    "Poison",
    "fetch_loop",
    "poisonous",
    "read_command",
    "read_reports",
]

log = logging.getLogger(__name__)

POISON_DELIVERIES = 5  # a command or report that crashed the engine this often is dead-lettered
# Failures that are not the input's fault: NATS out of reach or electing a leader, the
# connection closed under a stopping scheduler, or a checkpoint changed under us (another
# scheduler took over).
NOT_THE_INPUT: tuple[type[BaseException], ...] = (
    *TRANSIENT,
    nats.errors.ConnectionClosedError,
    Conflict,
)


class Poison(ProvisioningError):
    """Raised for an input no service could have sent: dead-lettered at once, never retried."""

    code = "poison"


class Later(ProvisioningError):
    """Raised for an input that arrived before what it refers to (a cancel whose submission is
    being redelivered): handed back to come again shortly, never counted as poison."""

    code = "later"


def poisonous(exc: BaseException, deliveries: int) -> bool:
    """Whether an input whose processing failed with ``exc`` on its ``deliveries``-th delivery
    is to be dead-lettered rather than retried."""
    return deliveries >= POISON_DELIVERIES and not isinstance(exc, (*NOT_THE_INPUT, Later))


class _AnyAction:
    """Actions are checked by the gateway against its registry and refused by executors that do
    not know them; the scheduler checks a submission's shape only."""

    def __contains__(self, action: object) -> bool:
        return True


_KINDS: dict[type, str] = {
    SubmitWorkflow: "submit",
    CancelWorkflow: "cancel",
    RetryWorkflow: "retry",
    ApproveWorkflow: "approve",
    RejectWorkflow: "reject",
}


def read_command(subject: str, data: bytes | None, config: Config) -> Command:
    """Decode a command and check it could come from a gateway: a workflow id that is one, on
    the subject of its kind and workflow, and (a submission) a definition the gateway would
    have accepted: a cycle or an unknown dependency would otherwise never reach an end."""
    try:
        command = decode_command(data)
    except MessageError as exc:
        raise Poison(exc.message) from None
    if not is_workflow_id(command.workflow_id):
        raise Poison(f"not a command: workflow id {command.workflow_id[:80]!r}")
    if subject != subjects.command_subject(_KINDS[type(command)], command.workflow_id):
        raise Poison("not a command: the subject does not match the workflow")
    if isinstance(command, SubmitWorkflow):
        try:
            validate_definition(
                command.definition, _AnyAction(), max_tasks=config.gateway.max_tasks_per_workflow
            )
        except DefinitionError as exc:
            raise Poison(f"invalid definition: {exc.message}") from None
    return command


def read_reports(
    subject: str, data: bytes | None, headers: dict[str, str] | None
) -> list[tuple[Report, dict[str, str]]]:
    """Decode what an executor sent (one report, or a batch of them), check that it could come
    from one, and return each report with the trace context it was sent in.

    A single report's ids must be ids and match its subject; a batch must be on a batch
    subject, hold at least one report, and every report in it must have ids that are ids and
    be its executor's. Anything else is :class:`Poison`, the whole message."""
    try:
        message = decode_report_message(data)
    except MessageError as exc:
        raise Poison(exc.message) from None
    if not isinstance(message, ReportBatch):
        if not (is_workflow_id(message.workflow_id) and is_task_id(message.task_id)) or (
            subject != subjects.report_subject(message.workflow_id, message.task_id)
        ):
            raise Poison("not a report: its ids are not ids or do not match its subject")
        return [(message, headers or {})]
    if not message.reports or not subject.startswith(subjects.report_batch_subject("")):
        raise Poison("not a batch of reports: empty, or not on a batch subject")
    for report in message.reports:
        if not (is_workflow_id(report.workflow_id) and is_task_id(report.task_id)):
            raise Poison("not a batch of reports: ids that are not ids")
        if report.executor_id != message.executor_id:
            raise Poison("not a batch of reports: a report of another executor")
    parents = message.traceparents
    return [
        (report, {"traceparent": parents[i]} if i < len(parents) and parents[i] else {})
        for i, report in enumerate(message.reports)
    ]


async def fetch_loop(
    sub: Puller,
    kind: str,
    put: Callable[[tuple[str, Any]], Awaitable[None]],
    stop: asyncio.Event,
    *,
    batch: int,
    check_consumers: Callable[[], Awaitable[None]],
) -> None:
    """Fetch up to ``batch`` messages at a time and ``put`` each as ``(kind, msg)`` until
    ``stop`` is set (checked each round, as nats-py's fetch may swallow a cancellation)."""
    backoff, errors = 0.1, 0
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch, 1.0)
        except TimeoutError:  # nothing to do (nats' TimeoutError is a TimeoutError too)
            continue
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            # ServiceUnavailable while a consumer leader moves (a NATS node died), but also
            # when the consumer is gone: after a few failures make sure it exists.
            errors += 1
            log.warning("fetching %ss failed: %s; retrying", kind, exc or type(exc).__name__)
            if errors % 5 == 0:
                try:
                    await check_consumers()
                except (nats.errors.Error, nats.js.errors.Error) as check:
                    log.debug("consumer check failed: %s", check or type(check).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            continue
        backoff, errors = 0.1, 0
        for msg in msgs:
            await put((kind, msg))
