"""An executor's reports to the scheduler, stored in as few acknowledged publishes as possible.

Every report (``started``, ``finished``, ``handed_back``) must be stored in JetStream before the
executor acts on it: it runs a task only once its ``started`` is stored, and acks a dispatch only
once its ``finished`` is. Each caller of :meth:`ReportSender.send` waits for exactly that.

What changes is how many publishes it takes (group commit). A report sent while none is being
stored goes out at once, alone, as it always did (its own subject and message id). Reports sent
while one is being stored wait for it and then go out together, in order, as one
:class:`~shared.messages.ReportBatch` (one acknowledged publish, one message for the scheduler
to fetch and ack). Nothing waits for a timer: an idle executor's report is not delayed, a busy
one's reports share the round trips. The scheduler fences each report of a batch on its own
(attempt, delivery), exactly as if it had come alone, and executors find reports inside
batches when they fence a delivery (``Streams.pending_reports``).

Batches go only to a scheduler whose lease says it reads them (``SchedulerLease.reads``), so
during an upgrade an older scheduler never receives one: :attr:`ReportSender.batches` is set
from the lease by the executor's heartbeat loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field

from shared import subjects
from shared.bus import Bus
from shared.messages import Report, ReportBatch, encode

__all__ = ["MAX_BATCH", "ReportSender"]

log = logging.getLogger(__name__)

MAX_BATCH = 256  # reports in one message (a few hundred bytes each: far under max payload)


@dataclass
class _Pending:
    report: Report
    msg_id: str | None
    traceparent: str | None
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ReportSender:
    def __init__(self, bus: Bus, executor_id: str) -> None:
        self.bus = bus
        self.executor_id = executor_id
        self.token = secrets.token_hex(8)  # this process's batch subject and message ids
        self.batches = False  # the scheduler reads batches (from its lease)
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._numbers = 0

    async def send(
        self, report: Report, *, msg_id: str | None = None, traceparent: str | None = None
    ) -> None:
        """Store ``report`` in JetStream; returns once it is stored (raises what
        :meth:`Bus.publish` raises when it cannot be)."""
        if not self.batches:
            await self._publish_one(report, msg_id, traceparent)
            return
        pending = _Pending(report, msg_id, traceparent)
        self._queue.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="reports")
        await asyncio.shield(pending.done)

    async def _flush(self) -> None:
        """Store what is queued, one message at a time, until nothing is."""
        while self._queue:
            group, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                if len(group) == 1:
                    only = group[0]
                    await self._publish_one(only.report, only.msg_id, only.traceparent)
                else:
                    await self._publish_batch(group)
            except asyncio.CancelledError:
                for pending in [*group, *self._queue]:
                    pending.done.cancel()
                self._queue = []
                raise
            except Exception as exc:  # each sender decides what its report's loss means
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            for pending in group:
                if not pending.done.done():
                    pending.done.set_result(None)

    async def _publish_one(self, report: Report, msg_id: str | None, parent: str | None) -> None:
        await self.bus.publish_many(
            [
                (
                    subjects.report_subject(report.workflow_id, report.task_id),
                    encode(report),
                    msg_id,
                    {"traceparent": parent} if parent else None,
                )
            ]
        )

    async def _publish_batch(self, group: list[_Pending]) -> None:
        self._numbers += 1
        batch = ReportBatch(
            executor_id=self.executor_id,
            reports=[p.report for p in group],
            traceparents=[p.traceparent or "" for p in group]
            if any(p.traceparent for p in group)
            else [],
        )
        await self.bus.publish_many(
            [
                (
                    subjects.report_batch_subject(self.token),
                    encode(batch),
                    subjects.report_batch_msg_id(self.token, self._numbers),
                    None,
                )
            ]
        )
        log.debug("stored %d reports in one message", len(group))
