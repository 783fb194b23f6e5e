"""The scheduler lease, kept in a KV bucket whose TTL expires a lease nobody renews."""

from __future__ import annotations

import msgspec

__all__ = ["SchedulerLease"]


class SchedulerLease(msgspec.Struct):
    """Who is the active scheduler, since when, and when it last renewed (Unix seconds)."""

    holder: str
    acquired_at: float
    renewed_at: float
    v: int = 1
