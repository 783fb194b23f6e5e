"""Identifiers: time-ordered workflow ids and validated task, pool and action names."""

from __future__ import annotations

import os
import re
import time
import uuid

__all__ = [
    "ACTION_RE",
    "CHILD_RE",
    "NAME_RE",
    "child_id",
    "idempotent_workflow_id",
    "is_task_id",
    "is_workflow_id",
    "new_workflow_id",
    "split_task_key",
]

# Task ids, pool names: safe as NATS subject tokens, KV keys, file names and URL segments.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Action names: dotted lowercase words, e.g. "server.create", "builtin.sleep".
ACTION_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$")
# A task made by the engine: a fan-out child ``install[3]``, a compensation ``install[undo]``
# (``install[3][undo]`` for a child's).
CHILD_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,63})(\[(0|[1-9][0-9]{0,4})\])?(\[undo\])?$")
_WORKFLOW_RE = re.compile(r"^[0-9a-f]{32}$")
_IDEMPOTENCY_NS = uuid.UUID("6f1d3c8e-2b7a-4d5e-9a41-0c7b2f9e8d13")


def new_workflow_id() -> str:
    """A UUIDv7-style id as 32 hex digits: sortable by creation time, unique without a registry."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | (0x7 << 76) | (rand & ((1 << 76) - 1))
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"{value:032x}"


def idempotent_workflow_id(key: str) -> str:
    """The workflow id owned by an ``Idempotency-Key``: the same key always maps to the same id."""
    return uuid.uuid5(_IDEMPOTENCY_NS, key).hex


def is_workflow_id(value: str) -> bool:
    return bool(_WORKFLOW_RE.match(value))


def child_id(parent: str, index: int) -> str:
    return f"{parent}[{index}]"


def is_task_id(value: str) -> bool:
    """A task's id: a name, a fan-out child's ``<name>[<index>]``, a compensation's."""
    return bool(CHILD_RE.match(value))


def split_task_key(key: str) -> tuple[str, str]:
    """Split a global task id (``<workflow_id>.<task_id>``, see ``subjects.task_key``);
    raises ValueError when it is not one."""
    workflow_id, sep, task_id = key.partition(".")
    if not sep or not is_workflow_id(workflow_id) or not is_task_id(task_id):
        raise ValueError(f"not a task id: {key!r}")
    return workflow_id, task_id
