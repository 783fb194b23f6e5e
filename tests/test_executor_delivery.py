"""Long tasks, lost executors and redeliveries, with real processes: the ack deadline is kept
alive, a killed executor's task finishes elsewhere, a stopped executor's late result is fenced,
and a task found finished on redelivery is acked without running again."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime

import pytest

from shared import subjects
from shared.messages import TaskDispatch, TaskFinished, encode

from .support import (
    PROBE_ENV,
    Stack,
    completions,
    dispatch_backlog,
    executor_id,
    publish,
    start_executor,
    submit,
    task_of,
    task_processes,
    task_record,
    wait_until,
    workflow_events,
)

pytestmark = pytest.mark.e2e

ACK_WAIT = {"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3"}


def _server(task_id: str, hostname: str, delay: float) -> dict[str, object]:
    return {
        "id": task_id,
        "action": "server.create",
        "args": {"infra": "wuji", "server": {"hostname": hostname}, "delay_seconds": delay},
    }


def _running_on(stack: Stack, wf_id: str, task_id: str) -> str:
    """Wait until the task runs (its nu process is up); return the executor's id."""

    def running() -> str | None:
        task = task_of(stack.http, wf_id, task_id)
        live = task["status"] == "running" and task_processes(f"{wf_id}.{task_id}")
        return task["executor_id"] if live else None

    return str(wait_until(running, 20, what=f"{task_id} to run"))


def _create_pool_consumer(stack: Stack, pool: str, ack_wait_s: float) -> None:
    """What the first executor of a pool does: create the pool's durable consumer."""
    from shared.bus import Bus
    from shared.config import load_config

    async def main() -> None:
        config = load_config(
            environ={"NATS_URL": stack.nats.url, "XDG_CONFIG_HOME": "/nonexistent"}
        )
        async with Bus(config.nats, name="test") as bus:
            await bus.ensure_pool_consumer(pool, ack_wait_s)

    asyncio.run(main())


@pytest.mark.stack(env=ACK_WAIT)
def test_long_tasks_keep_their_ack_deadline(stack: Stack) -> None:
    """7 s tasks with a 3 s ack wait are never redelivered: on an executor configured like its
    pool's consumer, and on one configured with 60 s whose pool consumer says 3 s (the
    consumer's ack wait is the one that counts)."""
    first = executor_id(stack, stack.executors[0])
    _create_pool_consumer(stack, "long", 3)  # as a first executor of pool "long" would have
    other = start_executor(
        stack, "--pool", "long", env={"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "60"}
    )
    long_b = {**_server("b", "long-b", 7), "pool": "long"}
    wf_id = submit(stack.http, [_server("a", "long-a", 7), long_b])
    view = stack.http.wait_workflow(wf_id, timeout=60)
    assert view["status"] == "completed", view
    by_id = {t["id"]: t for t in view["tasks"]}
    assert by_id["a"]["executor_id"] == first
    assert by_id["b"]["executor_id"] == executor_id(stack, other)
    for task_id in by_id:
        record = task_record(stack, wf_id, task_id)
        assert (record.attempt, record.delivery) == (1, 1), task_id
    events = workflow_events(stack, wf_id)
    assert sum(1 for k, d in events if k == "task" and d["status"] == "running") == 2
    assert "consumer has ack_wait 3s (configured here: 60s)" in other.log()


@pytest.mark.stack(executors=2, env={**ACK_WAIT, **PROBE_ENV})
def test_killed_executor_task_completes_on_another(stack: Stack) -> None:
    # a task that is quiet for seconds: nothing but the parent-death signal stops its nu early
    task = {"id": "k", "action": "probe.progress", "args": {"hold_seconds": 5}}
    wf_id = submit(stack.http, [task])
    victim_id = _running_on(stack, wf_id, "k")
    ids = {executor_id(stack, s): s for s in stack.executors}
    victim = ids.pop(victim_id)
    (survivor_id,) = ids
    orphans = {pid for pid, _ in task_processes(f"{wf_id}.k")}
    assert orphans

    victim.kill9()
    wait_until(
        lambda: not orphans & {pid for pid, _ in task_processes(f"{wf_id}.k")},
        2,
        what="the killed executor's nu to die with it",
    )
    view = stack.http.wait_workflow(wf_id, timeout=40)
    task = view["tasks"][0]
    assert view["status"] == "completed", view
    assert task["executor_id"] == survivor_id
    assert task["attempt"] == 1
    assert task["output"] == {"posted": True}
    record = task_record(stack, wf_id, "k")
    assert record.delivery == 2
    assert completions(workflow_events(stack, wf_id)) == {"k": 1}


@pytest.mark.stack(env=ACK_WAIT)
def test_stopped_executor_late_result_is_fenced(stack: Stack) -> None:
    stopped = stack.executors[0]
    stopped_id = executor_id(stack, stopped)
    wf_id = submit(stack.http, [_server("s", "stop-1", 4)])
    assert _running_on(stack, wf_id, "s") == stopped_id

    stopped.signal(signal.SIGSTOP)  # past the ack wait: the task goes to another executor
    try:
        taker = start_executor(stack)
        taker_id = executor_id(stack, taker)
        wait_until(
            lambda: task_record(stack, wf_id, "s").delivery == 2,
            20,
            what="the redelivery to start on the other executor",
        )
        # while delivery 2 runs, a result from delivery 1 arrives: the scheduler fences it
        late = TaskFinished(
            workflow_id=wf_id,
            task_id="s",
            attempt=1,
            delivery=1,
            executor_id=stopped_id,
            outcome="failed",
            started_at=datetime.now(UTC),
            finished_at=datetime.now(UTC),
            reason="exit_code",
            error="late result",
        )
        publish(stack, subjects.report_subject(wf_id, "s"), encode(late))
        wait_until(
            lambda: any(
                f"{wf_id}.s" in line and "fenced" in line
                for line in stack.scheduler.log().splitlines()
            ),
            10,
            what="the scheduler to fence the late report",
        )
        running = task_of(stack.http, wf_id, "s")
        assert running["status"] == "running" and running["executor_id"] == taker_id, running
        view = stack.http.wait_workflow(wf_id, timeout=40)
    finally:
        stopped.signal(signal.SIGCONT)
    task = view["tasks"][0]
    assert view["status"] == "completed", view
    assert task["executor_id"] == taker_id and task["error"] is None
    record = task_record(stack, wf_id, "s")
    assert (record.attempt, record.delivery) == (1, 2)

    # resumed, the first executor learns its delivery was taken over and drops its result
    wait_until(
        lambda: f"{wf_id}.s attempt 1 delivery 1 was taken over" in stopped.log(),
        15,
        what="the resumed executor to notice",
    )
    assert stack.http.get(f"/workflows/{wf_id}")[1]["tasks"][0]["executor_id"] == taker_id
    assert completions(workflow_events(stack, wf_id)) == {"s": 1}


@pytest.mark.stack(env=PROBE_ENV)
def test_redelivered_finished_task_is_acked_not_run_again(stack: Stack) -> None:
    executor = stack.executors[0]
    args = {"lines": 3, "width": 2, "pause_seconds": 0.7}

    def redeliver(wf_id: str, task_id: str) -> None:
        dispatch = TaskDispatch(
            workflow_id=wf_id,
            task_id=task_id,
            attempt=1,
            action="probe.chatty",
            args=args,
            timeout_seconds=60,
        )
        subject = subjects.dispatch_subject("default", wf_id, task_id)
        publish(stack, subject, encode(dispatch), msg_id=f"{wf_id}.{task_id}.1.again")

    def lines(wf_id: str, task_id: str) -> list[str]:
        return [e["line"] for e in stack.http.get(f"/tasks/{wf_id}.{task_id}/logs")[1]["lines"]]

    # 1. finished and checkpointed as completed
    done = submit(stack.http, [{"id": "c", "action": "probe.chatty", "args": args}])
    assert stack.http.wait_workflow(done)["status"] == "completed"
    redeliver(done, "c")
    wait_until(lambda: dispatch_backlog(stack) == 0, 15, what="the redelivery to be acked")
    assert f"{done}.c attempt 1 is completed" in executor.log()
    assert lines(done, "c") == ["line 1 xx", "line 2 xx", "line 3 xx"]  # ran once

    # 2. finished, but the scheduler (stopped) has not taken the report in yet
    args = {**args, "pause_seconds": 1.5}
    pending = submit(stack.http, [{"id": "c", "action": "probe.chatty", "args": args}])
    wait_until(lambda: task_of(stack.http, pending, "c")["status"] == "running", 20)
    assert stack.scheduler.stop() == 0
    wait_until(lambda: f"{pending}.c attempt 1 completed" in executor.log(), 20)
    redeliver(pending, "c")
    wait_until(lambda: dispatch_backlog(stack) == 0, 15, what="the redelivery to be acked")
    assert f"{pending}.c attempt 1 already finished; not running it again" in executor.log()

    stack.scheduler.start()
    view = stack.http.wait_workflow(pending, timeout=30)
    assert view["status"] == "completed"
    assert view["tasks"][0]["output"] == {"lines": 3}
    assert lines(pending, "c") == ["line 1 xx", "line 2 xx", "line 3 xx"]
    assert completions(workflow_events(stack, pending)) == {"c": 1}
