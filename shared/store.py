"""Typed access to the checkpointed records in JetStream KV."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from . import subjects
from .bus import Bus
from .messages import (
    DecodeError,
    ExecutorBeat,
    Progress,
    TaskRecord,
    WorkflowRecord,
    decode_beat,
    decode_progress,
    decode_task,
    decode_workflow,
)

__all__ = ["Store", "read_bucket"]

log = logging.getLogger(__name__)

READ_BATCH = 1000
_REMOVED = ("DEL", "PURGE")


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
                if headers.get("KV-Operation") in _REMOVED or "Nats-Marker-Reason" in headers:
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
    """Reads (and, for the scheduler, writes) workflow and task records."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def workflow(self, workflow_id: str) -> tuple[WorkflowRecord, int] | None:
        try:
            entry = await self.bus.kv.workflows.get(workflow_id)
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode_workflow(entry.value), entry.revision or 0

    async def task(self, workflow_id: str, task_id: str) -> tuple[TaskRecord, int] | None:
        try:
            entry = await self.bus.kv.tasks.get(f"{workflow_id}.{task_id}")
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode_task(entry.value), entry.revision or 0

    async def tasks(self, workflow_id: str) -> dict[str, tuple[TaskRecord, int]]:
        out: dict[str, tuple[TaskRecord, int]] = {}
        found = await read_bucket(self.bus.js, subjects.BUCKET_TASKS, f"{workflow_id}.*")
        for key, value, rev in found:
            try:
                out[key.partition(".")[2]] = (decode_task(value), rev)
            except DecodeError:
                log.error("undecodable task record %s", key)
        return out

    async def progress(self, workflow_id: str) -> dict[str, Progress]:
        out: dict[str, Progress] = {}
        found = await read_bucket(self.bus.js, subjects.BUCKET_PROGRESS, f"{workflow_id}.*")
        for key, value, _ in found:
            try:
                out[key.partition(".")[2]] = decode_progress(value)
            except DecodeError:
                log.error("undecodable progress record %s", key)
        return out

    async def task_progress(self, workflow_id: str, task_id: str) -> Progress | None:
        try:
            entry = await self.bus.kv.progress.get(f"{workflow_id}.{task_id}")
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_progress(entry.value) if entry.value else None

    async def workflow_ids(self) -> list[str]:
        found = await read_bucket(self.bus.js, subjects.BUCKET_WORKFLOWS, values=False)
        return sorted((key for key, _, _ in found), reverse=True)

    async def active_ids(self) -> list[str]:
        found = await read_bucket(self.bus.js, subjects.BUCKET_ACTIVE, values=False)
        return sorted(key for key, _, _ in found)

    async def executors(self) -> list[ExecutorBeat]:
        """The last heartbeat of every executor whose key has not expired."""
        beats = []
        for key, value, _ in await read_bucket(self.bus.js, subjects.BUCKET_EXECUTORS):
            try:
                beats.append(decode_beat(value))
            except DecodeError:
                log.error("undecodable executor heartbeat %s", key)
        return beats

    async def workflows(self, ids: list[str]) -> list[WorkflowRecord]:
        found = await asyncio.gather(*(self.workflow(i) for i in ids))
        return [f[0] for f in found if f is not None]
