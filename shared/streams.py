"""Reading the JetStream streams: event replay, task logs (paged and followed), commands still
waiting for the scheduler, and what is still queued for a task.

The gateway's handlers, the scheduler's recovery and the executors' fencing read streams only
through here; the record store (:mod:`shared.store`) owns the KV buckets.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from . import subjects
from .bus import Bus
from .errors import MessageError
from .messages import (
    LogChunk,
    Report,
    ReportBatch,
    SubmitWorkflow,
    TaskRecord,
    decode_command,
    decode_log,
    decode_report_message,
)
from .store import Store

__all__ = ["LogLine", "LogPage", "Streams"]

log = logging.getLogger(__name__)

MAX_CHUNKS_PER_PAGE = 1000  # stream reads one page of logs may cost, whatever its size


def _by_task(queue: list[tuple[int, bytes]]) -> dict[str, Report]:
    found: dict[str, Report] = {}
    for _, data in queue:
        try:
            message = decode_report_message(data)
        except MessageError:
            continue
        for report in message.reports if isinstance(message, ReportBatch) else [message]:
            found[subjects.task_key(report.workflow_id, report.task_id)] = report
    return found


class LogLine(msgspec.Struct):
    attempt: int
    stream: str
    line: str
    at: str


class LogPage(msgspec.Struct):
    """Lines of one task, oldest first; ``next_cursor`` continues after the last one (None
    when there were no more when the page was read)."""

    lines: list[LogLine]
    next_cursor: str | None


def _cursor(value: str | None) -> tuple[int, int]:
    """``<stream sequence>.<line index in that chunk>``; raises ValueError when malformed."""
    if not value:
        return 1, 0
    seq, _, index = value.partition(".")
    if not (seq.isdigit() and index.isdigit() and len(seq) <= 19 and len(index) <= 6):
        raise ValueError(f"not a log cursor: {value[:40]!r}")
    return max(1, int(seq)), int(index)


def _lines(chunk: LogChunk, start: int, count: int) -> list[LogLine]:
    at = chunk.at.isoformat()
    return [
        LogLine(chunk.attempt, chunk.stream, line, at)
        for line in chunk.lines[start : start + count]
    ]


class Streams:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    # -- commands waiting for the scheduler ------------------------------------------------------

    async def pending_command(self, kind: str, workflow_id: str) -> bytes | None:
        """The payload of a ``kind`` command for the workflow still in the queue, if any."""
        try:
            raw = await self.bus.js.get_last_msg(
                subjects.STREAM_COMMANDS, subjects.command_subject(kind, workflow_id)
            )
        except nats.js.errors.NotFoundError:
            return None
        return raw.data or b""

    async def pending_submission(self, workflow_id: str) -> SubmitWorkflow | None:
        """A submission accepted (durable) but not yet taken by the scheduler."""
        data = await self.pending_command("submit", workflow_id)
        if data is None:
            return None
        try:
            command = decode_command(data)
        except MessageError:  # poison: the scheduler will dead-letter it
            return None
        return command if isinstance(command, SubmitWorkflow) else None

    async def pending_submission_ids(self) -> list[str]:
        """Ids of every workflow whose submission waits in the queue."""
        info = await self.bus.js.stream_info(
            subjects.STREAM_COMMANDS, subjects_filter=subjects.command_filter("submit")
        )
        return [subjects.workflow_of_command(s) for s in (info.state.subjects or {})]

    async def submission_waits(self, workflow_id: str) -> bool:
        """Whether the workflow's submission is still in the queue, without reading it."""
        subject = subjects.command_subject("submit", workflow_id)
        info = await self.bus.js.stream_info(subjects.STREAM_COMMANDS, subjects_filter=subject)
        return bool((info.state.subjects or {}).get(subject))

    # -- what is out for a task ------------------------------------------------------------------

    async def dispatch_waits(self, pool: str, workflow_id: str, task_id: str) -> bool:
        """Whether the task's dispatch is still in the queue."""
        subject = subjects.dispatch_subject(pool, workflow_id, task_id)
        try:
            await self.bus.js.get_last_msg(subjects.STREAM_DISPATCH, subject)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def pending_reports(self) -> dict[str, Report]:
        """The last report of every task that is still waiting for the scheduler, alone or in
        a batch, by task key: the whole reports queue in one batched read (it holds only what
        the scheduler has not consumed yet). Undecodable messages are left to the scheduler,
        which dead-letters them.

        The scheduler checkpoints a report's effect before it consumes the report: a report
        missing here is in the checkpoints read after this."""
        return _by_task(
            await self.bus.read_stream(
                subjects.STREAM_REPORTS, subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS]
            )
        )

    async def pending_reports_then_tasks(
        self, keys: list[str]
    ) -> tuple[dict[str, Report], dict[str, tuple[TaskRecord, int]] | None]:
        """:meth:`pending_reports`, then the newest checkpoints of the tasks ``keys`` (by task
        key, with their revisions), in that order (see :meth:`pending_reports`), in one round
        trip where the server keeps the order of two reads (one replica:
        :meth:`Bus.read_stream_then_last`). With replicas, the reports alone and None for the
        checkpoints: they are read one by one then (``Store.task``), after the reports."""
        if self.bus.config.replicas > 1:
            return await self.pending_reports(), None
        stream, last = Store.latest_tasks_read(keys)
        queue, found = await self.bus.read_stream_then_last(
            subjects.STREAM_REPORTS, subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS], stream, last
        )
        return _by_task(queue), Store.latest_tasks_from(found)

    # -- events ----------------------------------------------------------------------------------

    async def replay_events(
        self, workflow_id: str, *, idle_s: float
    ) -> AsyncIterator[tuple[int, int, bytes]]:
        """Every event of a workflow from the start, then live: ``(seq, pending, data)``; a
        ``(0, 0, b"")`` after each ``idle_s`` without one (for keepalives)."""
        sub = await self.bus.js.subscribe(
            subjects.event_subject(workflow_id),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_s)
                except nats.errors.TimeoutError:
                    yield 0, 0, b""
                    continue
                meta = msg.metadata
                yield meta.sequence.stream, meta.num_pending, msg.data
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    # -- logs ------------------------------------------------------------------------------------

    async def log_page(
        self,
        workflow_id: str,
        task_id: str,
        *,
        attempt: int | None,
        cursor: str | None,
        limit: int,
    ) -> LogPage:
        """Up to ``limit`` lines of a task (of one ``attempt``, or of all in order), from
        ``cursor``. Reads chunk by chunk, so memory is bounded by the page, not by the log."""
        seq, index = _cursor(cursor)
        subject = (
            subjects.log_subject(workflow_id, task_id, attempt)
            if attempt is not None
            else subjects.log_filter(workflow_id, task_id)
        )
        lines: list[LogLine] = []
        for _ in range(MAX_CHUNKS_PER_PAGE):
            if len(lines) >= limit:
                break
            try:
                raw = await self.bus.js.get_msg(
                    subjects.STREAM_LOGS, seq=seq, subject=subject, next=True
                )
            except nats.js.errors.NotFoundError:
                return LogPage(lines, None)
            found = raw.seq or seq
            try:
                chunk = decode_log(raw.data)
            except MessageError:
                seq, index = found + 1, 0
                continue
            taken = _lines(chunk, index, limit - len(lines))
            lines += taken
            if index + len(taken) < len(chunk.lines):
                return LogPage(lines, f"{found}.{index + len(taken)}")
            seq, index = found + 1, 0
        return LogPage(lines, f"{seq}.{index}")

    async def follow_logs(
        self, workflow_id: str, task_id: str, *, attempt: int | None, cursor: str | None
    ) -> AsyncGenerator[bytes | None, None]:
        """The task's log chunks from ``cursor`` on, then live, as raw ``LogChunk`` JSON;
        ``None`` after each quiet half second (so the caller can check whether the task ended)."""
        seq, _ = _cursor(cursor)
        subject = (
            subjects.log_subject(workflow_id, task_id, attempt)
            if attempt is not None
            else subjects.log_filter(workflow_id, task_id)
        )
        sub = await self.bus.js.subscribe(
            subject,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq
            ),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    yield None
                    continue
                yield msg.data
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def purge_logs(self, workflow_id: str, task_id: str, attempt: int) -> None:
        """Drop the stored lines of one attempt of a task."""
        await self.bus.js.purge_stream(
            subjects.STREAM_LOGS, subject=subjects.log_subject(workflow_id, task_id, attempt)
        )
