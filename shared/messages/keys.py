"""Concurrency keys in use, as the scheduler checkpoints them (``prov_keys``) and
``GET /concurrency`` shows them."""

from __future__ import annotations

import msgspec

__all__ = ["KeyState"]


class KeyState(msgspec.Struct, omit_defaults=True):
    """One key in use: its limit and rate, who holds it, who waits for it (in order), and the
    starts within its rate window (these survive a failover; holders and waiters are rebuilt
    from the task checkpoints)."""

    key: str
    limit: int | None = None
    rate: str | None = None
    holders: list[str] = msgspec.field(default_factory=list)
    waiters: list[str] = msgspec.field(default_factory=list)
    starts: list[float] = msgspec.field(default_factory=list)  # Unix seconds
    v: int = 1
