"""Batched direct gets under one subscription, several in one round trip, in the order sent.

A direct get (``$JS.API.DIRECT.GET.<stream>``, streams with ``allow_direct``) is answered by
the stream itself, not by the JetStream API: a batched one (``batch``, ``multi_last``) with its
messages and then a status (``204`` with the count of what is left, or ``404`` when nothing
matches). Asked one at a time with a fresh inbox each (a SUB, the request, an UNSUB per read),
an executor's fence took two round trips per fetched group.

:class:`DirectGets` keeps one wildcard subscription (as :mod:`shared.acks` does) and numbers
each request under it. :meth:`DirectGets.read` sends several requests back to back, on this
one connection, before it waits for any answer. nats-server serves a direct get from a client
connection in that connection's read loop (``processDirectGetRequest`` in ``server/stream.go``:
inline for clients, queued only for routes, gateways and leaf nodes), which takes the
connection's messages one at a time in the order they came: the first request is answered
from the stream as it is before the second is read. So "read the reports queue, then the
checkpoints" keeps its order in one round trip. That holds for a single server (one replica);
with replicas any replica may answer, which :class:`~shared.bus.Bus` never uses this for.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .errors import BusUnavailable
from .jetstream import HDR_NUM_PENDING, HDR_SEQUENCE, HDR_STATUS, HDR_SUBJECT

__all__ = ["DirectGets", "Found", "Read"]

log = logging.getLogger(__name__)

Found = tuple[int, str, dict[str, str], bytes]  # sequence, subject, headers, data


@dataclass
class Read:
    """One batched direct get's answer: its messages in order, how many more match."""

    found: list[Found] = field(default_factory=list)
    left: int = 0
    status: str = ""
    ended: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class DirectGets:
    """One connection's batched direct gets (``await start()`` once connected)."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._numbers = itertools.count()
        self._reads: dict[str, Read] = {}
        self._sub: Subscription | None = None

    async def start(self) -> DirectGets:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_answer)
        return self

    async def _on_answer(self, msg: Msg) -> None:
        read = self._reads.get(msg.subject[len(self._prefix) + 1 :])
        if read is None or read.ended.done():
            return  # answered after its deadline
        headers = msg.headers or {}
        if code := headers.get(HDR_STATUS):
            read.status = str(code)
            read.left = int(headers.get(HDR_NUM_PENDING) or 0)
            read.ended.set_result(None)
            return
        seq = int(headers[HDR_SEQUENCE])
        read.found.append((seq, headers.get(HDR_SUBJECT, ""), headers, msg.data))

    async def read(
        self, requests: list[tuple[str, dict[str, Any]]], *, timeout_s: float
    ) -> list[Read]:
        """Send each ``(stream, request)`` (batched: ``batch`` or ``multi_last`` set) in order,
        then wait, at most ``timeout_s`` in all, for every answer. Raises nats'
        ``TimeoutError`` when one did not end in time and ``BusUnavailable`` for a status
        other than the end of a batch (``204``) or nothing found (``404``)."""
        sent: list[tuple[str, Read]] = []
        try:
            for stream, request in requests:
                token = str(next(self._numbers))
                read = Read()
                self._reads[token] = read
                sent.append((token, read))
                await self._nc.publish(
                    f"$JS.API.DIRECT.GET.{stream}",
                    json.dumps(request).encode(),
                    reply=f"{self._prefix}.{token}",
                )
            if sent:
                await asyncio.wait([read.ended for _, read in sent], timeout=timeout_s)
        finally:
            for token, read in sent:
                self._reads.pop(token, None)
                read.ended.cancel()  # no effect on an ended one
        if not all(read.ended.done() and not read.ended.cancelled() for _, read in sent):
            raise nats.errors.TimeoutError
        for (stream, _), (_, read) in zip(requests, sent, strict=True):
            if read.status == "404":  # nothing (more) matches
                read.left = 0
            elif read.status != "204":  # 204: the end of this batch, and how many are left
                raise BusUnavailable(f"direct get from {stream} failed: status {read.status}")
        return [read for _, read in sent]
