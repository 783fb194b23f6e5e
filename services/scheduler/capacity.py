"""Executor capacity, per pool, from the executors' heartbeats.

A pool's capacity is the task slots of its live executors (a heartbeat not older than three
intervals, not draining). The scheduler dispatches only into that capacity (plus headroom), so
ready work waits in its priority heap rather than in an executor's queue, and a higher-priority
task always goes before a lower-priority one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors

from shared.store import Store

__all__ = ["POLL_EMPTY_S", "POLL_S", "read_slots", "watch_capacity"]

log = logging.getLogger(__name__)
POLL_S = 1.0
# while no executor is known (a stack starting: the scheduler is often active before the first
# heartbeat), look again sooner: work accepted meanwhile waited up to POLL_S for its first slot
POLL_EMPTY_S = 0.05


async def read_slots(store: Store) -> dict[str, int]:
    """Task slots of the live executors, per pool."""
    slots: dict[str, int] = defaultdict(int)
    now = time.time()
    for beat in await store.executors():
        if beat.draining or now - beat.at.timestamp() > 3 * beat.interval_seconds:
            continue
        slots[beat.pool] += beat.max_concurrent_tasks
    return dict(slots)


async def watch_capacity(
    store: Store,
    current: Callable[[], dict[str, int]],
    changed: Callable[[dict[str, int]], Awaitable[None]],
    stop: asyncio.Event,
) -> None:
    """Read the heartbeats every :data:`POLL_S` (:data:`POLL_EMPTY_S` while there is no slot
    at all); call ``changed`` when the slots differ from ``current()``."""
    while not stop.is_set():
        await asyncio.sleep(POLL_S if any(current().values()) else POLL_EMPTY_S)
        try:
            slots = await read_slots(store)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("cannot read executor heartbeats: %s", exc)
            continue
        if slots != current():
            log.info("executor capacity now %s", slots)
            await changed(slots)
