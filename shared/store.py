"""Typed access to the checkpointed records in JetStream KV."""

from __future__ import annotations

import asyncio
import logging

import nats.js.errors
from nats.js.kv import KeyValue

from .bus import Bus
from .messages import (
    DecodeError,
    Progress,
    TaskRecord,
    WorkflowRecord,
    decode_progress,
    decode_task,
    decode_workflow,
)

__all__ = ["Store", "read_prefix"]

log = logging.getLogger(__name__)


async def read_prefix(kv: KeyValue, prefix: str) -> list[tuple[str, bytes, int]]:
    """Every ``(key, value, revision)`` under ``<prefix>.*`` (one ordered consumer, no listing)."""
    out: list[tuple[str, bytes, int]] = []
    watcher = await kv.watch(f"{prefix}.*", ignore_deletes=True)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=10)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                break
            if entry is None:
                break
            if entry.value:
                out.append((entry.key, entry.value, entry.revision or 0))
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
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
        for key, value, rev in await read_prefix(self.bus.kv.tasks, workflow_id):
            try:
                out[key.partition(".")[2]] = (decode_task(value), rev)
            except DecodeError:
                log.error("undecodable task record %s", key)
        return out

    async def progress(self, workflow_id: str) -> dict[str, Progress]:
        out: dict[str, Progress] = {}
        for key, value, _ in await read_prefix(self.bus.kv.progress, workflow_id):
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
        try:
            return sorted(await self.bus.kv.workflows.keys(), reverse=True)
        except nats.js.errors.NoKeysError:
            return []

    async def active_ids(self) -> list[str]:
        try:
            return sorted(await self.bus.kv.active.keys())
        except nats.js.errors.NoKeysError:
            return []

    async def workflows(self, ids: list[str]) -> list[WorkflowRecord]:
        found = await asyncio.gather(*(self.workflow(i) for i in ids))
        return [f[0] for f in found if f is not None]
