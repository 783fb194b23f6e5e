"""Pulls from a durable consumer (shared/pull.py) against a real NATS server: a pull returns
with the first message instead of waiting out its batch, takes at most what it asked for,
and leaves no request open on the server to deliver messages to a puller that did not ask."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import pytest

from shared import subjects
from shared.bus import Bus
from shared.config import load_config
from shared.pull import Puller


def _config(url: str) -> object:
    config = load_config(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    return msgspec.structs.replace(config.nats, url=url)


@pytest.mark.parametrize("batch", [1, 5])
async def test_a_pull_returns_with_the_first_message_and_leaves_no_request_open(
    nats_url: str, batch: int
) -> None:
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        durable = await bus.ensure_pool_consumer("p", 30)

        async def put(*data: bytes) -> None:
            await bus.publish_many(
                [
                    (subjects.dispatch_subject("p", "w", f"t{d.decode()}"), d, None, None)
                    for d in data
                ]
            )

        puller = await Puller(bus.nc, subjects.STREAM_DISPATCH, durable).start()
        other = await Puller(bus.nc, subjects.STREAM_DISPATCH, durable).start()
        try:
            # nothing waits: the pull lingers, and ends with the first message, long before
            # its batch is full or its 30 s are up
            pulling = asyncio.create_task(puller.fetch(batch, 30.0))
            await asyncio.sleep(0.2)
            assert not pulling.done()
            await put(b"1")
            assert [m.data for m in await asyncio.wait_for(pulling, 5)] == [b"1"]

            # that request is over: what comes next waits for whoever asks, not for it
            await put(b"2")
            assert [m.data for m in await other.fetch(1, 5.0)] == [b"2"]

            # several waiting: a pull takes up to what it asked for, in order, at once
            await put(b"3", b"4", b"5")
            assert [m.data for m in await puller.fetch(batch, 5.0)] == [b"3", b"4", b"5"][:batch]
            if batch == 1:
                assert [m.data for m in await other.fetch(5, 5.0)] == [b"4", b"5"]

            # nothing at all: a timeout (nats' TimeoutError, a TimeoutError)
            with pytest.raises(nats.errors.TimeoutError):
                await puller.fetch(batch, 0.3)
        finally:
            await puller.stop()
            await other.stop()
