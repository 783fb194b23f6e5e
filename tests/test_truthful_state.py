"""What the API says ran is what ran: cancels, stops, retries and restarts against the record.

Each test breaks the record on purpose the way an adversary would (cancel in the middle of a
burst, stop on a failure among thousands, cancel before the scheduler took the submission,
restart executors under a long task, cancel right behind a retry, read a workflow the
scheduler has not taken yet) and compares the API with what the executors' logs say ran.
"""

from __future__ import annotations

import re
import signal
from collections import defaultdict
from typing import Any

import pytest

from .support import (
    Stack,
    executor_id,
    stream_state,
    submit,
    task_of,
    wait_until,
)

pytestmark = pytest.mark.e2e


def executor_runs(stack: Stack, wf_id: str) -> dict[str, list[tuple[int, str]]]:
    """``task -> [(attempt, outcome)]`` of every run any executor of the stack logged."""
    pattern = re.compile(rf"\b{wf_id}\.([A-Za-z0-9_-]+) attempt (\d+) (\w+) in [\d.]+s")
    runs: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for service in stack.executors:
        for task, attempt, outcome in pattern.findall(service.log()):
            runs[task].append((int(attempt), outcome))
    return runs


def wait_run(stack: Stack, wf_id: str, run: int, timeout: float = 120) -> dict[str, Any]:
    """The workflow once its ``run``-th run has ended."""

    def ended() -> dict[str, Any] | None:
        status, view = stack.http.get(f"/workflows/{wf_id}?tasks=false")
        done = view["status"] in ("completed", "failed", "cancelled")
        return view if status == 200 and view["runs"] == run and done else None

    result: dict[str, Any] = wait_until(ended, timeout, 0.2, what=f"run {run} of {wf_id}")
    return result


def tasks_of(stack: Stack, wf_id: str) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in stack.http.get(f"/workflows/{wf_id}")[1]["tasks"]}


def assert_record_matches_runs(stack: Stack, wf_id: str) -> dict[str, dict[str, Any]]:
    """Every task an executor completed is completed in the API, and no task the API shows
    completed lacks a run; cancelled tasks completed nowhere."""
    tasks = tasks_of(stack, wf_id)

    def logged() -> bool:  # an executor logs a run just after reporting it
        runs = executor_runs(stack, wf_id)
        return all(
            any(o == "completed" for _, o in runs.get(t, ()))
            for t, v in tasks.items()
            if v["status"] == "completed"
        )

    wait_until(logged, 15, what="the executors' log lines of every completed task")
    runs = executor_runs(stack, wf_id)
    for task_id, view in tasks.items():
        completed_runs = [a for a, o in runs.get(task_id, ()) if o == "completed"]
        if completed_runs:
            assert view["status"] == "completed", (task_id, view, runs[task_id])
        if view["status"] == "cancelled":
            assert not completed_runs, (task_id, view)
    return tasks


@pytest.mark.stack(executors=2)
def test_cancel_in_a_burst_reports_what_ran_and_a_retry_runs_nothing_twice(stack: Stack) -> None:
    wf_id = submit(
        stack.http, [{"id": f"t{i}", "action": "builtin.noop"} for i in range(2000)], name="burst"
    )

    def some_done() -> bool:
        counts = stack.http.get(f"/workflows/{wf_id}?tasks=false")[1].get("counts") or {}
        return counts.get("completed", 0) >= 200

    wait_until(some_done, 60, 0.05, what="a few hundred tasks to complete")
    assert stack.http.post(f"/workflows/{wf_id}/cancel")[0] == 202
    view = stack.http.wait_workflow(wf_id, timeout=120)
    assert view["status"] == "cancelled"
    tasks = assert_record_matches_runs(stack, wf_id)
    completed = {t for t, v in tasks.items() if v["status"] == "completed"}
    cancelled = {t for t, v in tasks.items() if v["status"] == "cancelled"}
    assert completed and cancelled and len(completed) + len(cancelled) == 2000
    # a task that finished after the cancel says so
    late = [v for v in tasks.values() if v["status"] == "completed" and v.get("note")]
    assert all("cancelled" in v["note"] for v in late)

    assert stack.http.post(f"/workflows/{wf_id}/retry")[0] == 202
    assert wait_run(stack, wf_id, 2)["status"] == "completed"
    runs = executor_runs(stack, wf_id)
    twice = [t for t in completed if sum(o == "completed" for _, o in runs[t]) != 1]
    assert not twice, twice[:10]


@pytest.mark.stack(executors=2)
def test_a_stop_among_thousands_reports_what_ran(stack: Stack) -> None:
    tasks = [{"id": f"t{i}", "action": "builtin.noop"} for i in range(2000)]
    tasks.insert(1000, {"id": "boom", "action": "builtin.fail"})
    wf_id = submit(stack.http, tasks, name="stop-burst", on_failure="stop")
    view = stack.http.wait_workflow(wf_id, timeout=120)
    assert view["status"] == "failed"
    seen = assert_record_matches_runs(stack, wf_id)
    assert seen["boom"]["status"] == "failed"
    assert stack.http.post(f"/workflows/{wf_id}/retry")[0] == 202
    wait_run(stack, wf_id, 2)
    runs = executor_runs(stack, wf_id)
    done_first = [t for t, v in seen.items() if v["status"] == "completed"]
    assert all(sum(o == "completed" for _, o in runs[t]) == 1 for t in done_first)


def test_a_cancel_sent_before_the_scheduler_took_the_submission_dispatches_nothing(
    stack: Stack,
) -> None:
    for trial in range(3):
        before = stream_state(stack.nats.url, "PROV_DISPATCH")["last_seq"]
        stack.scheduler.signal(signal.SIGSTOP)  # the submission waits in the queue
        try:
            wf_id = submit(
                stack.http,
                [
                    {"id": f"s{i}", "action": "builtin.sleep", "args": {"seconds": 5}}
                    for i in range(5)
                ],
                name=f"early-cancel-{trial}",
            )
            assert stack.http.post(f"/workflows/{wf_id}/cancel")[0] == 202
        finally:
            stack.scheduler.signal(signal.SIGCONT)
        view = stack.http.wait_workflow(wf_id, timeout=30)
        assert view["status"] == "cancelled" and view["counts"] == {"cancelled": 5}
        assert all(t["attempt"] == 0 for t in view["tasks"]), view["tasks"]
        assert stream_state(stack.nats.url, "PROV_DISPATCH")["last_seq"] == before
        assert not executor_runs(stack, wf_id)


@pytest.mark.stack(
    env={
        "PROVISIONING_EXECUTOR_SHUTDOWN_GRACE_SECONDS": "1",
        "PROVISIONING_EXECUTOR_MAX_DELIVERIES": "3",
    }
)
@pytest.mark.slow
def test_rolling_restarts_hand_a_long_task_back_without_failing_it(stack: Stack) -> None:
    """Each graceful restart hands the task back: more restarts than max_deliveries, and the
    task still completes (before, it failed with reason max_deliveries)."""
    wf_id = submit(
        stack.http,
        [{"id": "long", "action": "builtin.sleep", "args": {"seconds": 3}}],
        name="rolling",
    )
    current = executor_id(stack, stack.executors[0])
    for restart in range(5):

        def running_on(executor: str = current) -> bool:
            task = task_of(stack.http, wf_id, "long")
            return task["status"] == "running" and task["executor_id"] == executor

        wait_until(running_on, 30, what=f"the task to run on {current} (restart {restart})")
        old = stack.executors.pop()
        assert old.stop() == 0  # SIGTERM: a graceful stop that hands the task back
        new = stack.new_executor(restart + 1).start()
        stack.executors.append(new)
        current = executor_id(stack, new)
    view = stack.http.wait_workflow(wf_id, timeout=60)
    task = view["tasks"][0]
    assert view["status"] == "completed", task
    assert task["attempt"] == 1 and task.get("reason") != "max_deliveries", task
    assert task["handbacks"] >= 4, task


def test_cancel_right_after_a_retry_is_accepted_and_wins(stack: Stack) -> None:
    wf_id = submit(
        stack.http,
        [{"id": "slow", "action": "builtin.sleep", "args": {"seconds": 30}}],
        name="retry-then-cancel",
    )
    wait_until(lambda: task_of(stack.http, wf_id, "slow")["status"] == "running")
    assert stack.http.post(f"/workflows/{wf_id}/cancel")[0] == 202
    assert stack.http.wait_workflow(wf_id, timeout=30)["status"] == "cancelled"
    for run in (2, 3):
        status, reply = stack.http.post(f"/workflows/{wf_id}/retry")
        assert status == 202 and reply["run"] == run, reply
        status, reply = stack.http.post(f"/workflows/{wf_id}/cancel")  # at once
        assert status == 202, reply
        assert wait_run(stack, wf_id, run, 30)["status"] == "cancelled"
        view = stack.http.get(f"/workflows/{wf_id}")[1]
        assert view["tasks"][0]["status"] == "cancelled", view["tasks"][0]


def test_an_accepted_workflow_is_visible_before_the_scheduler_takes_it(stack: Stack) -> None:
    stack.scheduler.signal(signal.SIGSTOP)
    try:
        wf_id = submit(stack.http, [{"id": "a", "action": "builtin.noop"}], name="not-yet-taken")
        listed = stack.http.get("/workflows")[1]["workflows"]
        mine = [w for w in listed if w["workflow_id"] == wf_id]
        assert mine and mine[0]["status"] == "queued", listed[:3]
        queued = stack.http.get("/workflows?status=queued&name=not-yet-taken")[1]["workflows"]
        assert [w["workflow_id"] for w in queued] == [wf_id]
        status, reply = stack.http.post(f"/workflows/{wf_id}/retry")
        assert status == 409 and "not run yet" in reply["error"]["message"], reply
        # it exists (not a 404): nothing of it awaits approval yet
        for decision, body in (("approve", {}), ("reject", {"reason": "no"})):
            status, reply = stack.http.post(f"/workflows/{wf_id}/{decision}", body)
            assert status == 409 and "waits for the scheduler" in reply["error"]["message"], reply
            assert reply["error"]["details"]["workflow_status"] == "queued", reply
        # a plan accepted, not taken: it is planning, and applying it is refused as not ready
        status, plan = stack.http.post(
            "/workflows?plan=true",
            {"name": "plan", "tasks": [{"id": "a", "action": "builtin.noop"}]},
        )
        assert status == 202, plan
        status, reply = stack.http.post(f"/plans/{plan['plan_id']}/apply", {})
        assert status == 409 and reply["error"]["details"]["plan_status"] == "planning", reply
        status, task = stack.http.get(f"/tasks/{wf_id}.a")
        assert status == 200 and task["status"] == "pending" and task["attempt"] == 0, task
        status, logs = stack.http.get(f"/tasks/{wf_id}.a/logs")
        assert status == 200 and logs["lines"] == [], logs
        assert stack.http.get(f"/tasks/{wf_id}.zz")[0] == 404
        status, reply = stack.http.post(f"/tasks/{wf_id}.a/progress", {"progress": 5})
        assert status == 409 and "has not started" in reply["error"]["message"], reply
        assert stack.http.post(f"/tasks/{wf_id}.zz/progress", {"progress": 5})[0] == 404
    finally:
        stack.scheduler.signal(signal.SIGCONT)
    assert stack.http.wait_workflow(wf_id)["status"] == "completed"
