"""Performing the engine's effects against JetStream, in an order that survives any crash.

One step's :class:`~engine.effects.Effects` are applied in this order:

1. new workflows: every task record, the active marker, then the workflow record (created
   only if absent: the record is what says the submission was taken);
2. task checkpoints, each a compare-and-swap on the revision last written;
3. together: workflow checkpoints (with their counts of tasks per status) and what the task
   checkpoints allow: kill requests and dispatches. A workflow whose only change is its counts
   is written at most every :data:`COUNTS_INTERVAL_S` (the counts are for readers: recovery
   counts the task records); every other change of a workflow record is written in its step;
4. events (acknowledged publishes), after the records, so a client that sees a workflow's end
   event finds its final record;
5. the end of finished workflows (the active marker goes, memory is freed);
6. only then the acks of the inputs of the step.

A crash anywhere in between means the inputs are redelivered and re-applied from the last
checkpoints, never that a dispatch is ahead of its checkpoint. The revisions of every record
held in memory are kept here: the engine knows nothing of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

import nats.errors
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from engine import Effects, WorkflowState
from engine.effects import Dispatch
from shared import subjects
from shared.bus import Bus
from shared.messages import encode
from shared.metrics import Metrics
from shared.store import Store
from shared.tracing import headers_with_context, hot_span, tracing_enabled

__all__ = ["COUNTS_INTERVAL_S", "TRACER_NAME", "WRITE_CHUNK", "Flusher"]

log = logging.getLogger(__name__)
TRACER_NAME = "provisioning.scheduler"  # the scheduler's spans, here and in service.py

WRITE_CHUNK = 512  # concurrent KV writes or publishes at a time
# A workflow record holds every task id: 10,000 of them make it ~100 KB, and writing it again in
# every step of a large fan-out cost more than the steps' task checkpoints. Counts alone are
# written at most this often (the scheduler steps again to write the last ones).
COUNTS_INTERVAL_S = 0.1


class Flusher:
    def __init__(self, bus: Bus, store: Store, metrics: Metrics) -> None:
        self.bus = bus
        self.store = store
        self.metrics = metrics
        self.revisions: dict[str, int] = {}  # KV key -> revision last read or written
        self.key_revisions: dict[str, int] = {}  # concurrency key -> revision of its record
        self.deferred: dict[str, WorkflowState] = {}  # counts changed, not written yet
        self._written: dict[str, float] = {}  # workflow -> when its record was last written

    def remember(self, state: WorkflowState, revision: int, tasks: dict[str, int]) -> None:
        """The revisions of a workflow's records as loaded from their checkpoints."""
        self.revisions[state.id] = revision
        for task_id, rev in tasks.items():
            self.revisions[subjects.task_key(state.id, task_id)] = rev

    def forget(self, state: WorkflowState | None = None) -> None:
        """Drop the revisions of one workflow (all of them with no argument)."""
        if state is None:
            self.revisions.clear()
            self.key_revisions.clear()
            self.deferred.clear()
            self._written.clear()
            return
        self.revisions.pop(state.id, None)
        self.deferred.pop(state.id, None)
        self._written.pop(state.id, None)
        for task_id in state.order:
            self.revisions.pop(subjects.task_key(state.id, task_id), None)

    async def flush(self, effects: Effects, acks: list[Msg], *, active: int = 0) -> None:
        """Apply one step's effects, then ack its inputs. ``active``: workflows still in memory
        (for the log line of each one that ended)."""
        await self._create(effects)
        for wf_id in effects.reopened:
            await self.store.mark_active(wf_id)
        await self._write_tasks(effects)
        # what the task checkpoints allow (dispatches, kills) goes out together with the
        # workflow records and the keys' records: one round trip, not three, per task
        await asyncio.gather(
            self._write_workflows(effects), self._write_keys(effects), self._send_work(effects)
        )
        # Acknowledged publishes: in a NATS cluster, events sent while PROV_EVENTS elects a
        # leader would otherwise be lost (and an SSE stream would wait for its end forever).
        await self.bus.publish_all(
            [(subjects.event_subject(e.workflow_id), encode(e)) for e in effects.events],
            msg_ids=effects.event_ids,
        )
        for state in effects.ended.values():
            await self.store.unmark_active(state.id)
            self.forget(state)
            record = state.record
            log.info(
                "workflow %s %s: %d tasks in %.3fs; %d workflows active",
                record.id,
                record.status,
                len(record.task_ids),
                ((record.finished_at or record.created_at) - record.created_at).total_seconds(),
                active,
            )
        for msg in acks:
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()
        self._record_metrics(effects)

    async def _create(self, effects: Effects) -> None:
        for state in effects.created.values():
            tasks = [state.tasks[t] for t in state.record.task_ids]
            for start in range(0, len(tasks), WRITE_CHUNK):
                chunk = tasks[start : start + WRITE_CHUNK]
                revs = await self.store.write_tasks([(t, None) for t in chunk])
                for task, rev in zip(chunk, revs, strict=True):
                    self.revisions[subjects.task_key(state.id, task.spec.id)] = rev
            await self.store.mark_active(state.id)
            self.revisions[state.id] = await self.store.create_workflow(state.record)
            self._written[state.id] = time.monotonic()
            log.info(
                "accepted workflow %s %r with %d tasks",
                state.id,
                state.record.name,
                len(state.record.task_ids),
            )

    async def _write_tasks(self, effects: Effects) -> None:
        # fan-out children first: new records, then every change (parents say how many
        # children they have only once the children exist)
        new = {(state.id, task_id) for state, task_id in effects.new_tasks}
        children = list(effects.new_tasks)
        for start in range(0, len(children), WRITE_CHUNK):
            chunk = children[start : start + WRITE_CHUNK]
            revs = await self.store.write_tasks([(s.tasks[t], None) for s, t in chunk])
            for (state, task_id), rev in zip(chunk, revs, strict=True):
                self.revisions[subjects.task_key(state.id, task_id)] = rev
        writes = [
            (state, task_id)
            for (wf_id, task_id), state in effects.tasks.items()
            if wf_id not in effects.created and (wf_id, task_id) not in new  # written whole
        ]
        for start in range(0, len(writes), WRITE_CHUNK):
            chunk = writes[start : start + WRITE_CHUNK]
            keys = [subjects.task_key(state.id, task_id) for state, task_id in chunk]
            revisions = await self.store.write_tasks(
                [
                    (state.tasks[task_id], self.revisions[key])
                    for (state, task_id), key in zip(chunk, keys, strict=True)
                ]
            )
            self.revisions.update(zip(keys, revisions, strict=True))

    async def _write_workflows(self, effects: Effects) -> None:
        now = time.monotonic()
        due = {s.id: s for s in effects.workflows.values() if s.id not in effects.created}
        for state in effects.counts.values():
            if state.id not in effects.created and state.id not in due:
                self.deferred[state.id] = state
        for wf_id, state in list(self.deferred.items()):
            if wf_id in due or now - self._written.get(wf_id, 0.0) >= COUNTS_INTERVAL_S:
                due[wf_id] = state
                del self.deferred[wf_id]
        states = list(due.values())
        for state in states:
            state.record.counts = state.count_snapshot()
        revisions = await asyncio.gather(
            *(self.store.update_workflow(s.record, last=self.revisions[s.id]) for s in states)
        )
        for state, revision in zip(states, revisions, strict=True):
            self.revisions[state.id] = revision
            self._written[state.id] = now

    async def _write_keys(self, effects: Effects) -> None:
        """The concurrency keys whose state changed: shown by ``GET /concurrency``, and their
        rate windows kept across a failover."""
        for key, state in effects.keys.items():
            last = self.key_revisions.pop(key, None)
            if state is None:
                if last is not None:
                    await self.store.remove_key_state(key, last)
                continue
            self.key_revisions[key] = await self.store.write_key_state(state, last)

    async def _send_work(self, effects: Effects) -> None:
        """Kill requests and dispatches of the step (their task checkpoints are written)."""
        for wf_id, task_ids in effects.kills.items():
            await self.bus.nc.publish(subjects.cancel_subject(wf_id), encode(sorted(set(task_ids))))
        if not tracing_enabled():
            await self._publish_dispatches(effects.dispatches, {})
            return
        # One PRODUCER span per workflow and step for its dispatches, not one per task: the
        # spans cost more than the dispatches. Each execution is a child of the span of the
        # step that dispatched it, all in the workflow's one trace.
        by_workflow: dict[str, list[Dispatch]] = {}
        for dispatch in effects.dispatches:
            by_workflow.setdefault(dispatch.message.workflow_id, []).append(dispatch)
        for wf_id, dispatches in by_workflow.items():
            first = dispatches[0].message
            parent = {"traceparent": dispatches[0].traceparent} if dispatches[0].traceparent else {}
            many = len(dispatches) > 1
            with hot_span(
                TRACER_NAME,
                f"dispatch {len(dispatches)} tasks" if many else f"dispatch {first.task_id}",
                subjects.dispatch_subject(first.pool, wf_id, first.task_id),
                kind=SpanKind.PRODUCER,
                headers=parent,
                attributes={
                    "workflow.id": wf_id,
                    "messaging.batch.message_count": len(dispatches),
                    **(
                        {}
                        if many
                        else {
                            "task.id": first.task_id,
                            "task.attempt": first.attempt,
                            "task.action": first.action,
                        }
                    ),
                },
            ):
                await self._publish_dispatches(dispatches, headers_with_context())

    async def _publish_dispatches(
        self, dispatches: list[Dispatch], headers: dict[str, str]
    ) -> None:
        for start in range(0, len(dispatches), WRITE_CHUNK):
            await self.bus.publish_many(
                [
                    (
                        subjects.dispatch_subject(m.pool, m.workflow_id, m.task_id),
                        encode(m),
                        subjects.dispatch_msg_id(m.workflow_id, m.task_id, m.attempt),
                        headers or None,
                    )
                    for m in (d.message for d in dispatches[start : start + WRITE_CHUNK])
                ]
            )

    def _record_metrics(self, effects: Effects) -> None:
        # one add per (pool, status) and step: an add costs as much as a small publish
        for (pool, status), count in Counter(effects.transitions).items():
            self.metrics.tasks.add(count, {"status": status, "pool": pool})
            if status == "retrying":
                self.metrics.retries.add(count, {"pool": pool})
        for pool, latency in effects.start_latencies:
            self.metrics.dispatch_latency.record(latency, {"pool": pool})
