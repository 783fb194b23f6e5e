"""The record store: the only code that reads and writes the JetStream KV buckets.

Workflow and task checkpoints, the active-workflow index, task progress, executor heartbeats
and the scheduler lease. Keys come from :mod:`shared.subjects`; values are the msgspec records
of :mod:`shared.messages`. Writes that must not overwrite another writer's change are
compare-and-swap on the revision the writer last saw (``last=``); every write is sent again
while the bucket's stream elects a leader (:meth:`shared.bus.Bus.write`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import subjects
from .bus import NOT_STORED, Bus
from .errors import MessageError
from .jetstream import (
    ERR_WRONG_LAST_SEQUENCE,
    HDR_EXPECTED_LAST_SUBJECT_SEQUENCE,
    HDR_KV_OPERATION,
    HDR_MARKER_REASON,
    KV_REMOVED,
)
from .messages import (
    ExecutorBeat,
    KeyState,
    Progress,
    SchedulerLease,
    TaskRecord,
    WorkflowRecord,
    decode_beat,
    decode_key_state,
    decode_lease,
    decode_progress,
    decode_task,
    decode_workflow,
    encode,
)

__all__ = ["Conflict", "Store", "read_bucket"]

log = logging.getLogger(__name__)

READ_BATCH = 1000
# A compare-and-swap found another revision (or a create found the key): someone else wrote.
Conflict = nats.js.errors.KeyWrongLastSequenceError


async def read_bucket(
    js: JetStreamContext, bucket: str, keys: str = ">", *, values: bool = True
) -> list[tuple[str, bytes, int]]:
    """``(key, value, revision)`` of every key of ``bucket`` matching ``keys`` (a subject
    pattern such as ``<workflow_id>.*``), deleted keys left out; ``values=False`` reads keys only
    (values are then ``b""``).

    One ephemeral *pull* consumer delivering the last message of each key. Nothing reaches a pull
    consumer before it asks, so its ``num_pending`` right after creation counts the keys exactly.
    (nats-py's ``KeyValue.keys()`` and ``watch()`` decide "nothing more" from a consumer-info
    reply that can overtake the first deliveries of their push consumer, and then answer with
    no keys at all, under load: a listing or a recovery would silently miss records.)
    """
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    sub = await js.pull_subscribe(
        prefix + keys,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            headers_only=not values,
            inactive_threshold=60.0,
            mem_storage=True,
        ),
    )
    out: list[tuple[str, bytes, int]] = []
    name = None
    try:
        info = await sub.consumer_info()
        name, pending = info.name, info.num_pending or 0
        while pending > 0:
            try:
                msgs = await sub.fetch(min(pending, READ_BATCH), timeout=5)
            except nats.errors.TimeoutError:  # keys expired since: what there is
                break
            for msg in msgs:
                meta = msg.metadata
                pending = meta.num_pending
                headers = msg.headers or {}
                if headers.get(HDR_KV_OPERATION) in KV_REMOVED or HDR_MARKER_REASON in headers:
                    continue
                out.append((msg.subject[len(prefix) :], msg.data, meta.sequence.stream))
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        if name:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await js.delete_consumer(stream, name)
    return out


class Store:
    """Typed reads and writes of the checkpointed records."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    # -- workflows --------------------------------------------------------------------------------

    async def workflow(self, workflow_id: str) -> tuple[WorkflowRecord, int] | None:
        try:
            entry = await self.bus.kv.workflows.get(workflow_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode_workflow(entry.value), entry.revision or 0

    async def workflows(self, ids: list[str]) -> list[WorkflowRecord]:
        found = await asyncio.gather(*(self.workflow(i) for i in ids))
        return [f[0] for f in found if f is not None]

    async def workflow_ids(self) -> list[str]:
        found = await read_bucket(self.bus.js, subjects.BUCKET_WORKFLOWS, values=False)
        return sorted((key for key, _, _ in found), reverse=True)

    async def create_workflow(self, record: WorkflowRecord) -> int:
        """Write a new workflow's record; raises :data:`Conflict` when it exists already."""
        return await self.bus.write(self.bus.kv.workflows.create, record.id, encode(record))

    async def update_workflow(self, record: WorkflowRecord, last: int) -> int:
        return await self.bus.write(
            self.bus.kv.workflows.update, record.id, encode(record), last=last
        )

    # -- tasks ------------------------------------------------------------------------------------

    async def task(self, workflow_id: str, task_id: str) -> tuple[TaskRecord, int] | None:
        try:
            entry = await self.bus.kv.tasks.get(subjects.task_key(workflow_id, task_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode_task(entry.value), entry.revision or 0

    @staticmethod
    def latest_tasks_read(keys: list[str]) -> tuple[str, list[str]]:
        """The stream and subjects that hold the newest checkpoints of several tasks (by task
        key), for one batched read of their last messages (``Bus.read_last``), made together
        with another by ``Streams.pending_reports_then_tasks``."""
        prefix = f"$KV.{subjects.BUCKET_TASKS}."
        return f"KV_{subjects.BUCKET_TASKS}", [prefix + k for k in keys]

    @staticmethod
    def latest_tasks_from(
        found: dict[str, tuple[int, dict[str, str], bytes]],
    ) -> dict[str, tuple[TaskRecord, int]]:
        """The checkpoints among the last messages read of :meth:`latest_tasks_read`'s subjects,
        by task key, with their revisions: those that exist and decode."""
        prefix = f"$KV.{subjects.BUCKET_TASKS}."
        out: dict[str, tuple[TaskRecord, int]] = {}
        for subject, (seq, headers, data) in found.items():
            if headers.get(HDR_KV_OPERATION) in KV_REMOVED or HDR_MARKER_REASON in headers:
                continue
            try:
                out[subject.removeprefix(prefix)] = (decode_task(data), seq)
            except MessageError:  # left out: read alone, it raises as it would have
                continue
        return out

    async def tasks(self, workflow_id: str) -> dict[str, tuple[TaskRecord, int]]:
        out: dict[str, tuple[TaskRecord, int]] = {}
        found = await read_bucket(self.bus.js, subjects.BUCKET_TASKS, f"{workflow_id}.*")
        for key, value, rev in found:
            try:
                record = decode_task(value)
            except MessageError:
                log.error("undecodable task record %s", key)
                continue
            out[record.spec.id] = (record, rev)
        return out

    async def put_task(self, record: TaskRecord) -> int:
        key = subjects.task_key(record.workflow_id, record.spec.id)
        return await self.bus.write(self.bus.kv.tasks.put, key, encode(record))

    async def update_task(self, record: TaskRecord, last: int) -> int:
        key = subjects.task_key(record.workflow_id, record.spec.id)
        return await self.bus.write(self.bus.kv.tasks.update, key, encode(record), last=last)

    async def write_tasks(self, writes: list[tuple[TaskRecord, int | None]]) -> list[int]:
        """Write several task records at once, pipelined under one deadline
        (:mod:`shared.acks`); each ``(record, last)`` is a compare-and-swap on revision
        ``last``, or a plain put with ``None``. Their new revisions, in order.

        Raises :data:`Conflict` when a record was changed by someone else, and what
        :meth:`Bus.publish` raises; a write that stored nothing (no stream answered) is sent
        again on its own, as :meth:`update_task` would."""
        messages = [
            (
                f"$KV.{subjects.BUCKET_TASKS}.{subjects.task_key(r.workflow_id, r.spec.id)}",
                encode(r),
                None if last is None else {HDR_EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)},
            )
            for r, last in writes
        ]
        outcomes = await self.bus.acks.publish(messages, timeout_s=5.0)
        revisions = []
        for (record, last), outcome in zip(writes, outcomes, strict=True):
            if isinstance(outcome, nats.js.errors.APIError) and (
                outcome.err_code in ERR_WRONG_LAST_SEQUENCE
            ):
                raise Conflict(description=outcome.description)
            if isinstance(outcome, NOT_STORED):
                outcome = await (
                    self.put_task(record) if last is None else self.update_task(record, last)
                )
            if isinstance(outcome, BaseException):
                raise outcome
            revisions.append(outcome)
        return revisions

    # -- the index of active workflows (the scheduler's recovery list) ---------------------------

    async def active_ids(self) -> list[str]:
        found = await read_bucket(self.bus.js, subjects.BUCKET_ACTIVE, values=False)
        return sorted(key for key, _, _ in found)

    async def mark_active(self, workflow_id: str) -> None:
        await self.bus.write(self.bus.kv.active.put, workflow_id, b"")

    async def unmark_active(self, workflow_id: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.bus.write(self.bus.kv.active.delete, workflow_id)

    # -- progress ---------------------------------------------------------------------------------

    async def progress(self, workflow_id: str) -> dict[str, Progress]:
        out: dict[str, Progress] = {}
        found = await read_bucket(self.bus.js, subjects.BUCKET_PROGRESS, f"{workflow_id}.*")
        for key, value, _ in found:
            try:
                out[subjects.task_of_token(key.partition(".")[2])] = decode_progress(value)
            except MessageError:
                log.error("undecodable progress record %s", key)
        return out

    async def task_progress(self, workflow_id: str, task_id: str) -> Progress | None:
        try:
            entry = await self.bus.kv.progress.get(subjects.task_key(workflow_id, task_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_progress(entry.value) if entry.value else None

    async def put_progress(self, workflow_id: str, task_id: str, progress: Progress) -> None:
        await self.bus.kv.progress.put(subjects.task_key(workflow_id, task_id), encode(progress))

    # -- executor heartbeats ----------------------------------------------------------------------

    async def executors(self) -> list[ExecutorBeat]:
        """The last heartbeat of every executor whose key has not expired."""
        beats = []
        for key, value, _ in await read_bucket(self.bus.js, subjects.BUCKET_EXECUTORS):
            try:
                beats.append(decode_beat(value))
            except MessageError:
                log.error("undecodable executor heartbeat %s", key)
        return beats

    async def put_beat(self, beat: ExecutorBeat) -> None:
        await self.bus.kv.executors.put(beat.id, encode(beat))

    async def remove_beat(self, executor_id: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self.bus.kv.executors.delete(executor_id)

    # -- the scheduler lease ----------------------------------------------------------------------

    async def lease(self) -> SchedulerLease | None:
        """The active scheduler's lease, if one is held (raises :class:`MessageError` for an
        unreadable one)."""
        try:
            entry = await self.bus.kv.leases.get(subjects.LEASE_SCHEDULER)
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_lease(entry.value) if entry.value else None

    async def create_lease(self, lease: SchedulerLease) -> int:
        """Take the lease; raises :data:`Conflict` while another scheduler holds it."""
        return await self.bus.kv.leases.create(subjects.LEASE_SCHEDULER, encode(lease))

    async def renew_lease(self, lease: SchedulerLease, last: int) -> int:
        """Renew it; raises :data:`Conflict` when someone else took it meanwhile."""
        return await self.bus.kv.leases.update(subjects.LEASE_SCHEDULER, encode(lease), last=last)

    async def release_lease(self, last: int) -> None:
        await self.bus.kv.leases.delete(subjects.LEASE_SCHEDULER, last=last)

    # -- concurrency keys in use ---------------------------------------------------------------

    async def key_states(self) -> list[tuple[KeyState, int]]:
        """Every concurrency key in use, with the revision of its record."""
        out = []
        for key, value, rev in await read_bucket(self.bus.js, subjects.BUCKET_KEYS):
            try:
                out.append((decode_key_state(value), rev))
            except MessageError:
                log.error("undecodable concurrency key record %s", key)
        return out

    async def write_key_state(self, state: KeyState, last: int | None) -> int:
        """Create (``last`` None) or compare-and-swap a key's record; returns its revision."""
        kv_key = subjects.concurrency_kv_key(state.key)
        if last is None:
            return await self.bus.write(self.bus.kv.keys.create, kv_key, encode(state))
        return await self.bus.write(self.bus.kv.keys.update, kv_key, encode(state), last=last)

    async def remove_key_state(self, key: str, last: int) -> None:
        await self.bus.write(self.bus.kv.keys.delete, subjects.concurrency_kv_key(key), last=last)
