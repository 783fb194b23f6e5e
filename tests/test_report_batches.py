"""Reports in batches (services/executor/reports.py), with real processes: a report inside a
batch counts for the fences exactly as one sent alone, and an executor or a scheduler that dies
while batches are in flight loses nothing and runs nothing twice."""

from __future__ import annotations

import time
from typing import Any

import pytest

from shared import subjects
from shared.messages import (
    ReportBatch,
    TaskDispatch,
    TaskFinished,
    decode_report_message,
    encode,
)

from .faults import Audit, audit_workflow
from .support import (
    Stack,
    dispatch_backlog,
    nats_run,
    publish,
    submit,
    task_of,
    task_runs,
    wait_until,
)

pytestmark = pytest.mark.e2e

ACK_WAIT = {"PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3"}
TASKS = 10  # one executor's slots: they start, and end, together


def _sleeps(n: int, seconds: float) -> list[dict[str, Any]]:
    return [
        {"id": f"s{i}", "action": "builtin.sleep", "args": {"seconds": seconds}} for i in range(n)
    ]


def _waiting_reports(stack: Stack) -> list[Any]:
    """Every message still in the reports queue, decoded (what the scheduler has not taken)."""

    async def body(nc: Any) -> list[bytes]:
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM_REPORTS)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                found.append((await js.get_msg(subjects.STREAM_REPORTS, seq)).data)
            except Exception:  # deleted: consumed
                continue
        return found

    return [decode_report_message(data) for data in nats_run(stack.nats.url, body)]


def _batched(stack: Stack) -> bool:
    return "reports in batches" in "".join(e.log() for e in stack.executors)


@pytest.mark.stack(executors=1)
def test_a_finished_report_inside_a_batch_keeps_a_redelivery_from_running(stack: Stack) -> None:
    """Tasks finish while the scheduler is stopped: their results wait in the reports queue,
    several in one batch. Each attempt is then delivered again: the executor finds its result
    inside the batch and acks the delivery without running the task a second time."""
    wait_until(lambda: _batched(stack), 20, what="the executor to batch its reports")
    executor = stack.executors[0]
    wf_id = submit(stack.http, _sleeps(TASKS, 1.5))
    wait_until(
        lambda: all(
            task_of(stack.http, wf_id, f"s{i}")["status"] == "running" for i in range(TASKS)
        ),
        20,
        what="all to run",
    )
    assert stack.scheduler.stop() == 0
    wait_until(
        lambda: all(task_runs(executor.log(), wf_id, f"s{i}") for i in range(TASKS)),
        20,
        what="all to finish",
    )

    # the precondition: results of this workflow wait inside a batch, not only alone
    waiting = _waiting_reports(stack)
    inside = {
        r.task_id
        for m in waiting
        if isinstance(m, ReportBatch)
        for r in m.reports
        if isinstance(r, TaskFinished) and r.workflow_id == wf_id
    }
    assert len(inside) >= 2, waiting

    for i in range(TASKS):
        again = TaskDispatch(wf_id, f"s{i}", 1, "builtin.sleep", {"seconds": 1.5}, 60.0)
        subject = subjects.dispatch_subject("default", wf_id, f"s{i}")
        publish(stack, subject, encode(again), msg_id=f"{wf_id}.s{i}.1.again")
    wait_until(lambda: dispatch_backlog(stack) == 0, 20, what="the redeliveries to be acked")
    for task_id in inside:
        assert f"{wf_id}.{task_id} attempt 1 already finished; not running it again" in (
            executor.log()
        ), task_id

    stack.scheduler.start()
    audit = Audit()
    view = audit_workflow(stack, wf_id, audit, timeout=60)  # each ran exactly once
    assert all(t["status"] == "completed" for t in view["tasks"])
    audit.fault("redelivery of a result reported in a batch", len(inside))
    audit.report("report batch fence")


@pytest.mark.slow
@pytest.mark.stack(executors=2, env=ACK_WAIT)
def test_executor_killed_with_batches_in_flight_loses_nothing_and_runs_nothing_twice(
    stack: Stack,
) -> None:
    """kill -9 of an executor in the middle of a burst of short tasks: some of its results are
    stored in batches, some are queued to be, some tasks are running. Every task completes
    once (each run logged once, one ``completed`` event), the killed executor's unreported
    tasks run again on the survivor after the ack wait, its reported ones do not."""
    audit = Audit()
    wait_until(lambda: _batched(stack), 20, what="the executors to batch their reports")
    victim = stack.executors[0]
    for round_ in range(2):
        wf_id = submit(stack.http, _sleeps(60, 0.2))

        def done(wf_id: str = wf_id) -> int:
            view = stack.http.get(f"/workflows/{wf_id}?tasks=false")[1]
            return int(view.get("counts", {}).get("completed", 0))

        wait_until(lambda: done() >= 15, 60, 0.02, what="a quarter of the tasks to finish")
        victim.kill9()
        audit.fault("executor kill -9 with batches in flight")
        view = audit_workflow(stack, wf_id, audit, timeout=120)
        assert view["status"] == "completed"
        victim.start()
        wait_until(lambda: stack.executors_alive() == 2, 30, what="the executor to come back")
        if round_ == 0:
            wait_until(lambda: _batched(stack), 20)
    assert audit.redelivered > 0, "the kill hit no running task"
    audit.report("executor killed with report batches")


@pytest.mark.slow
@pytest.mark.stack(executors=2, env=ACK_WAIT)
def test_scheduler_killed_in_batched_steps_resumes_exactly_once(stack: Stack) -> None:
    """kill -9 of the scheduler twice while batches of reports stream in: each batch it had
    fetched but not acknowledged comes again to its successor, whose fences apply each report
    once. Every task completes once."""
    audit = Audit()
    wait_until(lambda: _batched(stack), 20, what="the executors to batch their reports")
    wf_id = submit(stack.http, _sleeps(300, 0.1))

    def completed() -> int:
        view = stack.http.get(f"/workflows/{wf_id}?tasks=false")[1]
        return int(view.get("counts", {}).get("completed", 0))

    for at_least in (20, 120):
        wait_until(lambda n=at_least: completed() >= n, 60, 0.02, what=f"{at_least} done")
        stack.scheduler.kill9()
        audit.fault("scheduler kill -9 during batched steps")
        time.sleep(0.5)  # reports keep coming while it is away
        stack.scheduler.start()
        wait_until(stack.scheduler_active, 30, what="the scheduler to take over")
    view = audit_workflow(stack, wf_id, audit, timeout=120)
    assert view["status"] == "completed"
    audit.report("scheduler killed with report batches")
