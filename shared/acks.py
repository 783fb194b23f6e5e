"""Acknowledged publishes to streams, many at a time, without a timer, task or token each.

nats-py's ``js.publish`` is a request: per message a future, a random token, an
``asyncio.wait_for`` timer, a JSON decode into a dataclass, and (under ``asyncio.gather``) a
task. A scheduler step makes one per checkpoint, dispatch and event; py-spy found 28 % of the
scheduler's CPU in them during a 10,000-task fan-out (docs/performance.md).

:class:`Acks` sends each message with a reply subject under one wildcard subscription,
numbered in order, and waits for a whole group under one deadline; each answer is decoded by
msgspec. The outcome per message is what ``js.publish`` gives: the stream sequence, or the
exception it raises (an ``APIError`` by code, ``NoStreamResponseError`` when no stream
answers, nats' ``TimeoutError`` when no answer came in time), so callers keep their retry
rules.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .jetstream import HDR_STATUS

__all__ = ["Acks", "Outcome"]

log = logging.getLogger(__name__)

Outcome = int | BaseException  # a stream sequence, or why the message was not stored


class _Answer(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_answers = msgspec.json.Decoder(_Answer)


def _api_error(error: dict[str, Any]) -> BaseException:
    try:
        nats.js.errors.APIError.from_error(error)  # raises the subclass for the code
    except nats.js.errors.APIError as exc:
        return exc
    return nats.js.errors.APIError(**error)  # pragma: no cover - from_error always raises


class Acks:
    """One connection's acknowledged publishes (``await start()`` once connected)."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._numbers = itertools.count()
        self._waiting: dict[str, asyncio.Future[int]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> Acks:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_answer)
        return self

    async def _on_answer(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) + 1 :], None)
        if future is None or future.done():
            return  # answered after its deadline
        if not msg.data:
            status = (msg.headers or {}).get(HDR_STATUS)
            future.set_exception(
                nats.js.errors.NoStreamResponseError()
                if status == "503"
                else nats.js.errors.APIError(code=int(status or 0), description="no answer")
            )
            return
        try:
            answer = _answers.decode(msg.data)
        except msgspec.DecodeError:
            future.set_exception(nats.js.errors.APIError(description="undecodable answer"))
            return
        if answer.error is not None:
            future.set_exception(_api_error(answer.error))
        else:
            future.set_result(answer.seq)

    async def publish(
        self, messages: list[tuple[str, bytes, dict[str, str] | None]], *, timeout_s: float
    ) -> list[Outcome]:
        """Publish ``(subject, data, headers)`` messages in order and wait (at most
        ``timeout_s``) for every answer; one outcome per message."""
        loop = asyncio.get_running_loop()
        sent: list[tuple[str, asyncio.Future[int]]] = []
        try:
            for subject, data, headers in messages:
                token = str(next(self._numbers))
                future: asyncio.Future[int] = loop.create_future()
                self._waiting[token] = future
                sent.append((token, future))
                await self._nc.publish(
                    subject, data, reply=f"{self._prefix}.{token}", headers=headers
                )
            if sent:
                await asyncio.wait([f for _, f in sent], timeout=timeout_s)
        finally:
            outcomes: list[Outcome] = []
            for token, future in sent:
                self._waiting.pop(token, None)
                if not future.done():
                    future.cancel()
                    outcomes.append(nats.errors.TimeoutError())
                elif future.cancelled():
                    outcomes.append(asyncio.CancelledError())
                else:
                    outcomes.append(future.exception() or future.result())
        return outcomes
