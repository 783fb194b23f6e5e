"""A helper task whose cancellation is swallowed still stops (shared.cancellation)."""

from __future__ import annotations

import asyncio
import sys

from shared.cancellation import cancel_and_wait


def test_a_swallowed_cancellation_does_not_keep_a_task_alive() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        replies: list[asyncio.Future[None]] = []
        rounds = 0

        async def keep_alive() -> None:  # like the executor's keep-alive: requests in a loop
            nonlocal rounds
            while True:
                rounds += 1
                reply: asyncio.Future[None] = loop.create_future()
                replies.append(reply)
                await asyncio.wait_for(reply, 5)  # what nats-py does for every request

        task = asyncio.create_task(keep_alive())
        await asyncio.sleep(0)
        replies[-1].set_result(None)  # the reply and the cancellation in one loop iteration
        task.cancel()
        for _ in range(3):
            await asyncio.sleep(0)
        if sys.version_info < (3, 12):  # wait_for returned the reply: the cancel is gone
            assert not task.done() and rounds == 2
        assert await cancel_and_wait(task, timeout_s=2)
        assert task.done()

    asyncio.run(scenario())


def test_a_task_that_will_not_stop_is_given_up_on() -> None:
    async def scenario() -> None:
        listening = False

        async def deaf() -> None:
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if listening:
                        raise

        task = asyncio.create_task(deaf())
        await asyncio.sleep(0)
        assert await cancel_and_wait(task, timeout_s=0.3) is False
        assert not task.done()
        listening = True  # let asyncio.run end
        assert await cancel_and_wait(task, timeout_s=1)

    asyncio.run(scenario())
