"""The bus against a real NATS server: idempotent bootstrap, dedup, backpressure."""

from __future__ import annotations

import asyncio

import msgspec
import nats.js.errors
import pytest
from nats.js.api import RetentionPolicy

from shared import subjects
from shared.bus import Bus
from shared.config import load_config
from shared.errors import BusUnavailable, QueueFull


def _config(url: str, **nats: object) -> object:
    config = load_config(environ={"XDG_CONFIG_HOME": "/nonexistent"})
    return msgspec.structs.replace(config.nats, url=url, **nats)


async def test_bootstrap_is_idempotent_and_applies_changes(nats_url: str) -> None:
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        await bus.bootstrap()
        info = await bus.js.stream_info(subjects.STREAM_DISPATCH)
        assert info.config.retention == RetentionPolicy.WORK_QUEUE
        assert (
            await bus.js.stream_info(subjects.STREAM_EVENTS)
        ).config.retention == RetentionPolicy.LIMITS
        await bus.js.consumer_info(subjects.STREAM_COMMANDS, subjects.CONSUMER_COMMANDS)
        await bus.kv.workflows.put("k", b"v")
    async with Bus(_config(nats_url, events_max_age_seconds=3600.0), name="t2") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()  # a changed stream config is applied, not an error
        assert (await bus.js.stream_info(subjects.STREAM_EVENTS)).config.max_age == 3600.0
        assert (await bus.kv.workflows.get("k")).value == b"v"  # data survives


async def test_publish_with_msg_id_never_duplicates(nats_url: str) -> None:
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        first = await bus.publish("prov.cmd.submit.x", b"1", msg_id="same")
        again = await bus.publish("prov.cmd.submit.x", b"1", msg_id="same")
        assert again.duplicate and again.seq == first.seq
        assert (await bus.js.stream_info(subjects.STREAM_COMMANDS)).state.messages == 1


async def test_full_queue_refuses_new_work(nats_url: str) -> None:
    async with Bus(_config(nats_url, queue_max_messages=2), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        await bus.publish("prov.cmd.submit.a", b"1")
        await bus.publish("prov.cmd.submit.b", b"2")
        with pytest.raises(QueueFull):
            await bus.publish("prov.cmd.submit.c", b"3")


async def test_connect_gives_up_clearly_when_asked(unused_tcp_port: int) -> None:
    bus = Bus(_config(f"nats://127.0.0.1:{unused_tcp_port}"), name="t")  # type: ignore[arg-type]
    with pytest.raises(BusUnavailable, match="cannot reach NATS"):
        await bus.connect(retry_for_s=0.5)


async def test_bucket_changes_are_applied(nats_url: str) -> None:
    async with Bus(_config(nats_url, events_max_age_seconds=3600.0), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
    async with Bus(_config(nats_url, events_max_age_seconds=7200.0), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        info = await bus.js.stream_info(f"KV_{subjects.BUCKET_PROGRESS}")
        assert info.config.max_age == 7200.0


async def test_publish_all_stores_every_message_in_order(nats_url: str) -> None:
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        messages = [(f"prov.evt.wf{i % 3}", str(i).encode()) for i in range(600)]
        await bus.publish_all(messages, chunk=256)  # three chunks
        sub = await bus.js.pull_subscribe("prov.evt.>", stream=subjects.STREAM_EVENTS)
        got: list[bytes] = []
        while len(got) < len(messages):
            got += [m.data for m in await sub.fetch(len(messages) - len(got), timeout=5)]
        assert got == [data for _, data in messages]
        assert (await bus.js.stream_info(subjects.STREAM_EVENTS)).state.messages == 600


async def test_bootstrap_does_not_retry_a_configuration_error(nats_url: str) -> None:
    """Only what a cluster that is still starting answers is retried; 3 replicas on a server
    that is not in a cluster is reported at once."""
    async with Bus(_config(nats_url, replicas=3), name="t") as bus:  # type: ignore[arg-type]
        with pytest.raises(nats.js.errors.APIError, match="non-clustered"):
            await asyncio.wait_for(bus.bootstrap(), 10)


async def test_reading_a_queue_whole_pages_and_skips_what_was_consumed(nats_url: str) -> None:
    """What waits in a work queue, read in batched direct gets of a page each (one replica),
    or from the stream's leader (replicas, where a lagging replica could answer a direct
    get): the same messages, in order, without those already consumed."""
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        filter_ = subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS]
        assert await bus.read_stream(subjects.STREAM_REPORTS, filter_) == []
        await bus.publish_many(
            [(f"prov.report.batch.t{i}", str(i).encode(), None, None) for i in range(7)]
        )
        sub = await bus.js.pull_subscribe_bind(
            subjects.CONSUMER_REPORTS, stream=subjects.STREAM_REPORTS
        )
        for msg in await sub.fetch(2):  # consumed: gone from the queue
            await msg.ack_sync()
        paged = await bus.read_stream(subjects.STREAM_REPORTS, filter_, page=2)
        assert [data for _, data in paged] == [b"2", b"3", b"4", b"5", b"6"]
        assert [seq for seq, _ in paged] == sorted(seq for seq, _ in paged)
    async with Bus(_config(nats_url, replicas=3), name="t") as bus:  # type: ignore[arg-type]
        leader = await bus.read_stream(subjects.STREAM_REPORTS, filter_)
        assert leader == paged


async def test_buckets_are_read_by_direct_gets_with_one_replica(nats_url: str) -> None:
    """With one replica the checkpoints are read as direct gets (cheaper on both ends); a
    bucket made before (no direct gets) is brought to it by the next bootstrap."""
    name = f"KV_{subjects.BUCKET_TASKS}"
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        info = await bus.js.stream_info(name)
        assert info.config.allow_direct
        info.config.allow_direct = False  # as an older version made it
        await bus.js.update_stream(info.config)
        await bus.bootstrap()
        assert (await bus.js.stream_info(name)).config.allow_direct
        await bus.kv.tasks.put("k", b"v")
        assert (await bus.kv.tasks.get("k")).value == b"v"


async def test_the_last_message_of_several_subjects_in_one_read(nats_url: str) -> None:
    """An executor reads its fetched group's checkpoints in one batched direct get: the newest
    revision of each key that exists, none for one that does not; not with replicas."""
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        await bus.kv.tasks.put("w.a", b"1")
        second = await bus.kv.tasks.put("w.a", b"2")
        third = await bus.kv.tasks.put("w.b", b"3")
        pre = f"$KV.{subjects.BUCKET_TASKS}."
        found = await bus.read_last(
            f"KV_{subjects.BUCKET_TASKS}", [pre + k for k in ("w.a", "w.b", "w.c")]
        )
        assert {s: (seq, data) for s, (seq, _, data) in found.items()} == {
            pre + "w.a": (second, b"2"),
            pre + "w.b": (third, b"3"),
        }
    async with Bus(_config(nats_url, replicas=3), name="t") as bus:  # type: ignore[arg-type]
        with pytest.raises(BusUnavailable):
            await bus.read_last(f"KV_{subjects.BUCKET_TASKS}", [pre + "w.a"])


async def test_a_queue_then_the_last_messages_in_one_round_trip(nats_url: str) -> None:
    """An executor's fence reads the reports queue, then the checkpoints, as two direct gets
    sent together: the same answers as the two reads made one after the other; a queue longer
    than a page is read whole, and the checkpoints again after it; not with replicas."""
    pre = f"$KV.{subjects.BUCKET_TASKS}."
    kv = f"KV_{subjects.BUCKET_TASKS}"
    reports = subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS]
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        assert await bus.read_stream_then_last(subjects.STREAM_REPORTS, reports, kv, []) == (
            [],
            {},
        )
        await bus.publish_many(
            [(f"prov.report.batch.t{i}", str(i).encode(), None, None) for i in range(5)]
        )
        await bus.kv.tasks.put("w.a", b"1")
        queue, last = await bus.read_stream_then_last(
            subjects.STREAM_REPORTS, reports, kv, [pre + "w.a", pre + "w.b"], page=2
        )
        assert [data for _, data in queue] == [b"0", b"1", b"2", b"3", b"4"]
        assert {s: data for s, (_, _, data) in last.items()} == {pre + "w.a": b"1"}
        one_page = await bus.read_stream_then_last(
            subjects.STREAM_REPORTS, reports, kv, [pre + "w.a"]
        )
        assert one_page == (
            await bus.read_stream(subjects.STREAM_REPORTS, reports),
            await bus.read_last(kv, [pre + "w.a"]),
        )
    async with Bus(_config(nats_url, replicas=3), name="t") as bus:  # type: ignore[arg-type]
        with pytest.raises(BusUnavailable):
            await bus.read_stream_then_last(subjects.STREAM_REPORTS, reports, kv, [pre + "w.a"])


async def test_the_queue_and_the_checkpoint_never_both_miss_a_consumed_report(
    nats_url: str,
) -> None:
    """The fence's order, against the server: a "scheduler" writes a checkpoint, then consumes
    the report it holds, over and over, while readers look for every report stored so far
    either still queued or in the checkpoint. The two reads sent together never miss one; the
    same two reads in the wrong order, by a reader slow between them, do (the harness can
    fail)."""
    key = "w.fence"
    subject = f"$KV.{subjects.BUCKET_TASKS}.{key}"
    kv = f"KV_{subjects.BUCKET_TASKS}"
    reports = subjects.STREAM_SUBJECTS[subjects.STREAM_REPORTS]
    async with Bus(_config(nats_url), name="t") as bus:  # type: ignore[arg-type]
        await bus.bootstrap()
        await bus.kv.tasks.put(key, b"0")
        consumer = await bus.js.pull_subscribe_bind(
            subjects.CONSUMER_REPORTS, stream=subjects.STREAM_REPORTS
        )
        stored = 0
        done = asyncio.Event()

        async def scheduler() -> None:
            nonlocal stored
            for i in range(1, 301):
                await bus.publish_many([(f"prov.report.batch.f{i}", str(i).encode(), None, None)])
                stored = i
                (msg,) = await consumer.fetch(1)
                await bus.kv.tasks.put(key, msg.data)  # the checkpoint first
                await msg.ack_sync()  # then the report leaves the queue
            done.set()

        async def missed(right: bool) -> int:
            misses = 0
            while not done.is_set():
                before = stored
                if right:
                    queue, last = await bus.read_stream_then_last(
                        subjects.STREAM_REPORTS, reports, kv, [subject]
                    )
                else:
                    last = await bus.read_last(kv, [subject])
                    await asyncio.sleep(0.002)  # a reader that is slow for a moment
                    queue = await bus.read_stream(subjects.STREAM_REPORTS, reports)
                seen = {int(data) for _, data in queue}
                checkpoint = int(last[subject][2])
                misses += sum(1 for i in range(checkpoint + 1, before + 1) if i not in seen)
            return misses

        writer = asyncio.create_task(scheduler())
        right, wrong = await asyncio.gather(missed(True), missed(False))
        await writer
        assert right == 0
        assert wrong > 0
