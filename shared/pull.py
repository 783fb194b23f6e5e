"""Pulling from a durable JetStream consumer without sitting on what arrived.

nats-py's ``fetch(batch, timeout)`` with ``batch > 1`` sends, when nothing is waiting, one
lingering pull request for the whole batch; once the first message arrives it keeps waiting
for the rest of the batch until the timeout. A task dispatched to an idle executor then waited
up to the fetch timeout (one second) before it started: measured 650-950 ms in 5 of 60 fetches
(docs/performance.md), the submit-to-start p99 of 322-352 ms and the chain's first link of
0.96 s.

:class:`Puller` asks in two ways, each ending as soon as it has something:

- ``no_wait`` for up to ``batch`` messages: the server sends what is there now and ends the
  request (a 404 status when it had fewer);
- when that found nothing, one lingering request for a single message, for up to the timeout:
  it ends with the first message (or a 408 status at expiry).

The client waits for the end of each request before it sends the next, so no request is left
open on the server to deliver messages nobody asked for. Messages arriving beyond ``batch``
(possible only after a reconnection) are kept for the next call.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .jetstream import HDR_STATUS

__all__ = ["Puller"]

log = logging.getLogger(__name__)

_END = ("404", "408")  # no messages (no_wait), request expired (lingering)
_HEARTBEAT = "100"
_MARGIN_S = 1.0  # past the request's own expiry, the server's 408 is overdue


class Puller:
    """One process's pulls from one durable consumer (``await start()`` first, ``stop()``
    last). One caller of :meth:`fetch` at a time."""

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._msgs: collections.deque[Msg] = collections.deque()
        self._status: str | None = None  # the last request's end, or an error status
        self._description = ""
        self._arrived = asyncio.Event()

    async def start(self) -> Puller:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribe failed: %s", exc)

    async def _on_msg(self, msg: Msg) -> None:
        status = (msg.headers or {}).get(HDR_STATUS) if not msg.data else None
        if status == _HEARTBEAT:
            return
        if status:
            self._status = status
            self._description = str((msg.headers or {}).get("Description", ""))
        else:
            self._msgs.append(msg)
        self._arrived.set()

    async def fetch(self, batch: int, wait_s: float) -> list[Msg]:
        """Up to ``batch`` messages, as soon as there is at least one; raises ``TimeoutError``
        (nats' own, a ``TimeoutError``) when none came within ``wait_s``, and an
        ``APIError`` for an error status (the consumer gone, a leader change)."""
        if self._sub is None:
            raise nats.errors.ConnectionClosedError
        if not self._msgs:
            await self._request({"batch": batch, "no_wait": True}, 5.0, until=batch)
        if not self._msgs:
            expires = int(wait_s * 1e9)
            await self._request({"batch": 1, "expires": expires}, wait_s + _MARGIN_S, until=1)
        if not self._msgs:
            raise nats.errors.TimeoutError
        return [self._msgs.popleft() for _ in range(min(batch, len(self._msgs)))]

    async def _request(self, request: dict[str, object], wait_s: float, *, until: int) -> None:
        """Send one pull request and wait for its end: ``until`` messages, or a status."""
        self._status = None
        self._arrived.clear()
        await self._nc.publish(self._api, json.dumps(request).encode(), reply=self._inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while len(self._msgs) < until and self._status is None:
            left = deadline - loop.time()
            if left <= 0:
                break  # no answer in time: what came is returned, the next request goes out
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
        status = self._status
        if status is not None and status not in _END:
            raise nats.js.errors.APIError(code=int(status), description=self._description)
