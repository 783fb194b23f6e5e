"""Leader election for schedulers: a lease in JetStream KV.

More than one scheduler may run; exactly one is active. The active one holds the key
``scheduler`` in the ``prov_leases`` bucket and renews it every ``renew_s``; the bucket's TTL
removes a lease that is not renewed, and a standby's ``create`` then succeeds within about
``ttl_s``. Every renewal is a compare-and-swap on the revision the holder last wrote: a holder
that was paused and lost its lease finds out on its next renewal and steps down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors
import nats.js.errors

from shared.cancellation import cancel_and_wait
from shared.messages import READS_REPORT_BATCHES, SchedulerLease
from shared.store import Conflict, Store

__all__ = ["Lease"]

log = logging.getLogger(__name__)


class Lease:
    """``await lease.acquire(stop)``; then ``lease.lost`` is set if it is ever lost."""

    def __init__(self, store: Store, holder: str, *, ttl_s: float, renew_s: float) -> None:
        self.store = store
        self.holder = holder
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.lost = asyncio.Event()
        self._revision = 0
        self._renewed = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def valid(self) -> bool:
        """Held and renewed recently enough that no standby can have taken it yet."""
        return (
            not self.lost.is_set()
            and self._revision > 0
            and time.monotonic() - self._renewed < self.ttl_s - self.renew_s
        )

    def _value(self, acquired_at: float) -> SchedulerLease:
        # executors send batches of reports only to a scheduler that says it reads them
        return SchedulerLease(self.holder, acquired_at, time.time(), reads=[READS_REPORT_BATCHES])

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until this process holds the lease (True) or ``stop`` is set (False)."""
        announced = False
        while not stop.is_set():
            try:
                self._revision = await self.store.create_lease(self._value(time.time()))
            except Conflict:
                if not announced:
                    log.info("another scheduler is active; standing by")
                    announced = True
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.warning("cannot reach the lease bucket: %s", exc or type(exc).__name__)
            else:
                self._renewed = time.monotonic()
                self._task = asyncio.create_task(self._keep(time.time()), name="lease")
                log.info("acquired the scheduler lease as %s", self.holder)
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.renew_s)
        return False

    async def _keep(self, acquired_at: float) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                self._revision = await self.store.renew_lease(
                    self._value(acquired_at), last=self._revision
                )
                self._renewed = time.monotonic()
            except Conflict:
                log.error("lost the scheduler lease to another scheduler; stepping down")
                self.lost.set()
                return
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                log.warning("lease renewal failed: %s", exc or type(exc).__name__)
                if time.monotonic() - self._renewed > self.ttl_s:
                    log.error("lease expired while NATS was unreachable; stepping down")
                    self.lost.set()
                    return

    async def release(self) -> None:
        """Give the lease up at once so a standby need not wait for the TTL."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._revision and not self.lost.is_set():
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, OSError):
                await self.store.release_lease(last=self._revision)
                log.info("released the scheduler lease")
        self._revision = 0
