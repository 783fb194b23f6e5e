"""Capacity and routing with real executor processes: never more tasks running than slots, a
task's pool decides which executors may take it, heartbeats announce executors and expire, and
SIGTERM drains an executor: short tasks finish, long ones are handed back and finish elsewhere."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Any

import pytest

from shared import subjects

from .support import (
    Stack,
    completions,
    executor_id,
    nats_run,
    start_executor,
    submit,
    task_of,
    task_record,
    wait_until,
    workflow_events,
)

pytestmark = pytest.mark.e2e


def _max_overlap(tasks: list[dict[str, Any]]) -> int:
    """The most tasks that were running at once, from their start and finish times."""
    edges = []
    for task in tasks:
        edges.append((datetime.fromisoformat(task["started_at"]), 1))
        edges.append((datetime.fromisoformat(task["finished_at"]), -1))
    running = peak = 0
    for _, step in sorted(edges):  # at a tie a finish (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    return peak


def _executors(stack: Stack) -> dict[str, dict[str, Any]]:
    status, body = stack.http.get("/executors")
    assert status == 200, body
    return {e["id"]: e for e in body["executors"]}


@pytest.mark.stack(env={"PROVISIONING_EXECUTOR_MAX_CONCURRENT_TASKS": "2"})
def test_slots_pools_and_heartbeats(stack: Stack) -> None:
    default_id = executor_id(stack, stack.executors[0])
    sleeps = [{"id": f"t{i}", "action": "builtin.sleep", "args": {"seconds": 1}} for i in range(6)]
    gpu = {"id": "gpu", "action": "builtin.noop", "pool": "gpu"}
    wf_id = submit(stack.http, [*sleeps, gpu])

    seen_running = 0
    deadline = time.monotonic() + 30
    while True:
        view = stack.http.get(f"/workflows/{wf_id}")[1]
        beat = _executors(stack)[default_id]
        assert beat["running"] <= 2 and len(beat["running_tasks"]) <= 2, beat
        seen_running = max(seen_running, beat["running"])
        if view["counts"].get("completed", 0) == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert view["counts"].get("completed") == 6, view
    by_id = {t["id"]: t for t in view["tasks"]}
    done = [by_id[t["id"]] for t in sleeps]
    assert {t["executor_id"] for t in done} == {default_id}
    assert _max_overlap(done) == 2  # both slots used, never a third task
    assert seen_running >= 1
    # no executor serves pool gpu yet: its task waits instead of running anywhere else
    assert by_id["gpu"]["status"] in ("pending", "queued"), by_id["gpu"]
    assert view["status"] == "running"

    gpu_exec = start_executor(stack, "--pool", "gpu", "--max-concurrent-tasks", "1")
    gpu_id = executor_id(stack, gpu_exec)
    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "completed", view
    assert task_of(stack.http, wf_id, "gpu")["executor_id"] == gpu_id

    listed = _executors(stack)
    assert (listed[default_id]["pool"], listed[default_id]["slots"]) == ("default", 2)
    assert (listed[gpu_id]["pool"], listed[gpu_id]["slots"]) == ("gpu", 1)
    for entry in listed.values():
        assert entry["alive"] and entry["running"] == 0 and entry["last_beat"]

    # a silent executor stops counting after three missed beats; its key expires by TTL
    gpu_exec.kill9()
    gone = wait_until(
        lambda: not (e := _executors(stack)[gpu_id])["alive"] and e,
        10,
        what="the killed executor to be reported dead",
    )
    assert gone["last_beat_age_seconds"] >= 3

    async def bucket_ttl(nc: Any) -> float:
        kv = await nc.jetstream().key_value(subjects.BUCKET_EXECUTORS)
        return float((await kv.status()).ttl or 0)

    assert nats_run(stack.nats.url, bucket_ttl) > 0

    # a graceful stop takes the executor off the list at once
    assert stack.executors[0].stop() == 0
    assert default_id not in _executors(stack)


@pytest.mark.stack(env={"PROVISIONING_EXECUTOR_SHUTDOWN_GRACE_SECONDS": "3"})
def test_sigterm_finishes_short_tasks_and_hands_back_long_ones(stack: Stack) -> None:
    leaving = stack.executors[0]
    leaving_id = executor_id(stack, leaving)

    def server(task_id: str, delay: float) -> dict[str, Any]:
        args = {"infra": "wuji", "server": {"hostname": f"drain-{task_id}"}, "delay_seconds": delay}
        return {"id": task_id, "action": "server.create", "args": args}

    wf_id = submit(stack.http, [server("short", 1.5), server("long", 5)])
    wait_until(
        lambda: all(
            task_of(stack.http, wf_id, t)["status"] == "running" for t in ("short", "long")
        ),
        20,
        what="both tasks to run",
    )
    leaving.signal(signal.SIGTERM)
    other = start_executor(stack)  # comes up while the first one drains
    other_id = executor_id(stack, other)
    assert leaving.proc is not None and leaving.proc.wait(20) == 0, leaving.log()[-3000:]
    log = leaving.log()
    assert "waiting up to 3s for 2 running tasks" in log  # both were running at SIGTERM
    assert "handing 1 unfinished tasks back for redelivery" in log
    assert leaving_id not in _executors(stack)

    view = stack.http.wait_workflow(wf_id, timeout=40)
    assert view["status"] == "completed", view
    by_id = {t["id"]: t for t in view["tasks"]}
    assert by_id["short"]["executor_id"] == leaving_id  # finished within the grace
    assert by_id["long"]["executor_id"] == other_id  # handed back, run again elsewhere
    assert (task_record(stack, wf_id, "short").delivery, by_id["short"]["attempt"]) == (1, 1)
    assert (task_record(stack, wf_id, "long").delivery, by_id["long"]["attempt"]) == (2, 1)
    assert by_id["long"]["output"]["hostname"] == "drain-long"
    assert completions(workflow_events(stack, wf_id)) == {"short": 1, "long": 1}
