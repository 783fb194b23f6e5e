"""Stopping helper tasks whose cancellation may be swallowed.

Python 3.11's ``asyncio.wait_for``, which nats-py uses for every request, returns the result
instead of raising ``CancelledError`` when the cancellation arrives in the same loop iteration
as the awaited reply. The cancelled task then goes on as if nothing had happened: a loop that
was meant to stop (an executor's keep-alive, a lease renewal, a heartbeat) runs on, and whoever
awaits it waits for ever. ``cancel_and_wait`` cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)
_RETRY_S = 0.1


async def cancel_and_wait(task: asyncio.Task[Any], timeout_s: float = 10.0) -> bool:
    """Cancel ``task`` until it ends, for at most ``timeout_s``; True if it has ended.

    Whatever the task ended with (its cancellation or an error) is consumed here."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.warning("task %s did not stop within %.0fs", task.get_name(), timeout_s)
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(_RETRY_S, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())
    return True
