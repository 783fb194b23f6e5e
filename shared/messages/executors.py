"""Executor heartbeats, kept in a KV bucket whose TTL expires silent executors."""

from __future__ import annotations

from datetime import datetime

import msgspec

__all__ = ["ExecutorBeat"]


class ExecutorBeat(msgspec.Struct, omit_defaults=True):
    id: str
    pool: str
    hostname: str
    pid: int
    max_concurrent_tasks: int
    running: int
    started_at: datetime
    at: datetime
    version: str
    running_tasks: list[str] = msgspec.field(default_factory=list)
    draining: bool = False
    interval_seconds: float = 5.0
    v: int = 1
