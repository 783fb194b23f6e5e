"""The scheduler lease, kept in a KV bucket whose TTL expires a lease nobody renews."""

from __future__ import annotations

import msgspec

__all__ = ["READS_REPORT_BATCHES", "SchedulerLease"]

READS_REPORT_BATCHES = "report_batch"


class SchedulerLease(msgspec.Struct):
    """Who is the active scheduler, since when, and when it last renewed (Unix seconds)."""

    holder: str
    acquired_at: float
    renewed_at: float
    v: int = 1
    # message kinds this scheduler reads beyond those of v1 (executors send a kind only to a
    # scheduler that reads it; a lease without the field is an older scheduler's)
    reads: list[str] = []
