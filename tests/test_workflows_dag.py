"""The DAG engine on a real stack: dispatch as soon as dependencies complete, fan-out and fan-in,
priority under saturation, failure policy, retries with backoff, timeouts."""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from typing import Any

import pytest

from .support import Stack, wait_until

pytestmark = pytest.mark.e2e


def submit(stack: Stack, definition: dict[str, Any]) -> str:
    status, reply = stack.http.post("/workflows", definition)
    assert status == 202, reply
    return str(reply["workflow_id"])


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def tasks_of(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in view["tasks"]}


def sleep(task_id: str, seconds: float, *deps: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "action": "builtin.sleep",
        "args": {"seconds": seconds},
        "depends_on": list(deps),
        **fields,
    }


def noop(task_id: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "action": "builtin.noop", "depends_on": list(deps), **fields}


def test_dispatch_as_soon_as_dependencies_complete(stack: Stack) -> None:
    fan = [f"f{i}" for i in range(6)]
    wf_id = submit(
        stack,
        {
            "name": "shape",
            "tasks": [
                noop("root"),
                sleep("slow", 1.5, "root"),
                sleep("fast", 0.1, "root"),
                noop("after-fast", "fast"),
                *(sleep(f, 0.4, "root") for f in fan),
                noop("join", "slow", "after-fast", *fan),
            ],
        },
    )
    view = stack.http.wait_workflow(wf_id)
    assert view["status"] == "completed", json.dumps(view, indent=2)
    tasks = tasks_of(view)
    start = {k: ts(t["started_at"]) for k, t in tasks.items()}
    end = {k: ts(t["finished_at"]) for k, t in tasks.items()}
    for task_id, task in tasks.items():
        for dep in task["depends_on"]:
            assert start[task_id] >= end[dep], (task_id, dep)
    # not level by level: after-fast ran while slow, its "cousin", was still running
    assert start["after-fast"] < end["slow"], (start["after-fast"], end["slow"])
    # fan-out: the six ran side by side; fan-in: join waited for every one of them
    assert max(start[f] for f in fan) < min(end[f] for f in fan)
    assert start["join"] >= max(end[f] for f in [*fan, "slow", "after-fast"])
    assert all(t["attempt"] == 1 for t in tasks.values())


@pytest.mark.stack(
    executors=1,
    env={
        "PROVISIONING_EXECUTOR_MAX_CONCURRENT_TASKS": "1",
        "PROVISIONING_SCHEDULER_DISPATCH_HEADROOM": "0",
    },
)
def test_higher_priority_goes_first_when_executors_are_saturated(stack: Stack) -> None:
    gate = submit(stack, {"name": "gate", "tasks": [sleep("gate", 2.0)]})
    wait_until(
        lambda: stack.http.get(f"/workflows/{gate}")[1]["tasks"][0]["status"] == "running",
        what="the gate to hold the only slot",
    )
    # A backlog across two workflows: task priorities, and the workflow's priority for tasks
    # that set none. Ties keep their submission order.
    first = submit(
        stack,
        {
            "name": "backlog-1",
            "priority": 2,
            "tasks": [
                noop("p0", priority=0),
                noop("p5a", priority=5),
                noop("m3", priority=-3),
                noop("p10", priority=10),
                noop("wf2"),  # the workflow's priority, 2
                noop("p5b", priority=5),
                noop("after-p10", "p10", priority=100),  # ready only once p10 completed
            ],
        },
    )
    second = submit(
        stack,
        {
            "name": "backlog-2",
            "priority": 7,
            "tasks": [noop("wf7"), noop("p1", priority=1), noop("p6", priority=6)],
        },
    )
    for wf_id in (first, second):  # both taken by the scheduler while the gate still runs
        wait_until(lambda wf_id=wf_id: "source" in stack.http.get(f"/workflows/{wf_id}")[1])
    assert stack.http.get(f"/workflows/{gate}")[1]["status"] == "running"

    starts: list[tuple[datetime, str]] = []
    for wf_id in (first, second):
        view = stack.http.wait_workflow(wf_id)
        assert view["status"] == "completed", view
        starts += [(ts(t["started_at"]), t["id"]) for t in view["tasks"]]
    gate_end = ts(stack.http.get(f"/workflows/{gate}")[1]["tasks"][0]["finished_at"])
    assert all(start >= gate_end for start, _ in starts)
    order = [task_id for _, task_id in sorted(starts)]
    assert order == [
        "p10",
        "after-p10",  # became ready with priority 100, ahead of everything still waiting
        "wf7",
        "p6",
        "p5a",
        "p5b",
        "wf2",
        "p1",
        "p0",
        "m3",
    ], order


FAILURE_SHAPE = [
    # boom fails (times out) while "runner" is running and "after-runner" waits for it
    sleep("boom", 30, timeout_seconds=0.5),
    sleep("runner", 1.5),
    noop("after-runner", "runner"),
    noop("child", "boom"),
    noop("grandchild", "child"),
    noop("other-child", "boom", "runner"),
]


def test_on_failure_stop_and_continue(stack: Stack) -> None:
    stop = submit(stack, {"name": "stop", "on_failure": "stop", "tasks": FAILURE_SHAPE})
    cont = submit(stack, {"name": "continue", "on_failure": "continue", "tasks": FAILURE_SHAPE})

    view = stack.http.wait_workflow(stop)
    assert view["status"] == "failed", json.dumps(view, indent=2)
    tasks = tasks_of(view)
    assert tasks["boom"]["status"] == "failed" and tasks["boom"]["reason"] == "timeout"
    assert tasks["runner"]["status"] == "completed"  # it had started: stop lets it finish
    assert tasks["after-runner"]["status"] == "cancelled"  # it had not: cancelled
    assert tasks["after-runner"]["attempt"] == 0 and tasks["after-runner"]["started_at"] is None
    assert "boom" in tasks["after-runner"]["error"]
    for task_id in ("child", "grandchild", "other-child"):
        assert tasks[task_id]["status"] == "skipped", task_id
        assert tasks[task_id]["reason"] == "dependency_failed"
        assert tasks[task_id]["attempt"] == 0
    assert view["counts"] == {"failed": 1, "completed": 1, "cancelled": 1, "skipped": 3}
    assert "boom" in view["error"]

    view = stack.http.wait_workflow(cont)
    assert view["status"] == "failed", json.dumps(view, indent=2)
    tasks = tasks_of(view)
    assert tasks["boom"]["status"] == "failed"
    assert tasks["runner"]["status"] == "completed"
    assert tasks["after-runner"]["status"] == "completed"  # the independent branch finished
    assert ts(tasks["after-runner"]["started_at"]) > ts(tasks["boom"]["finished_at"])
    for task_id in ("child", "grandchild", "other-child"):
        assert tasks[task_id]["status"] == "skipped", task_id
    assert view["counts"] == {"failed": 1, "completed": 2, "skipped": 3}


def gaps(task: dict[str, Any]) -> list[float]:
    attempts = task["attempts"]
    return [
        (ts(b["started_at"]) - ts(a["finished_at"])).total_seconds()
        for a, b in itertools.pairwise(attempts)
    ]


def test_retries_with_capped_exponential_backoff_and_timeouts(stack: Stack) -> None:
    retried = submit(
        stack,
        {
            "name": "retries",
            "tasks": [
                {
                    "id": "flaky",
                    "action": "builtin.fail",
                    "args": {"message": "no capacity"},
                    "retries": 3,
                    # waits 0.3 s, then 0.6 s (3 s uncapped), then 0.6 s (30 s uncapped)
                    "backoff": {"initial_seconds": 0.3, "multiplier": 10, "max_seconds": 0.6},
                },
                noop("after", "flaky"),
            ],
        },
    )
    timeouts = submit(
        stack,
        {
            "name": "timeouts",
            "on_failure": "continue",
            "tasks": [
                sleep("too-slow", 30, timeout_seconds=0.5),
                sleep(
                    "too-slow-twice",
                    30,
                    timeout_seconds=0.3,
                    retries=1,
                    backoff={"initial_seconds": 0.1},
                ),
                sleep("in-time", 0.2, timeout_seconds=5),
                # a Nushell subprocess past its timeout: its process group is killed
                {
                    "id": "nu-slow",
                    "action": "server.create",
                    "args": {"infra": "t", "server": {"hostname": "slow-1"}, "delay_seconds": 30},
                    "timeout_seconds": 1,
                },
            ],
        },
    )

    view = stack.http.wait_workflow(retried)
    assert view["status"] == "failed", view
    flaky = tasks_of(view)["flaky"]
    assert flaky["status"] == "failed" and flaky["attempt"] == 4 and flaky["max_attempts"] == 4
    assert [a["attempt"] for a in flaky["attempts"]] == [1, 2, 3, 4]
    assert all(a["outcome"] == "failed" and a["error"] == "no capacity" for a in flaky["attempts"])
    assert all(a["executor_id"] for a in flaky["attempts"])
    first, second, third = gaps(flaky)
    assert first >= 0.3, gaps(flaky)
    assert 0.6 <= second < 2.5, gaps(flaky)  # capped: 3 s without the cap
    assert 0.6 <= third < 10, gaps(flaky)  # capped: 30 s without the cap
    assert tasks_of(view)["after"]["status"] == "skipped"

    view = stack.http.wait_workflow(timeouts)
    tasks = tasks_of(view)
    assert view["status"] == "failed", view
    too_slow = tasks["too-slow"]
    assert too_slow["status"] == "failed" and too_slow["reason"] == "timeout", too_slow
    assert "timed out after 0.5s" in too_slow["error"]
    assert too_slow["duration_seconds"] < 5
    twice = tasks["too-slow-twice"]
    assert twice["status"] == "failed" and twice["attempt"] == 2
    assert [a["reason"] for a in twice["attempts"]] == ["timeout", "timeout"]
    assert tasks["in-time"]["status"] == "completed"
    nu_slow = tasks["nu-slow"]
    assert nu_slow["status"] == "failed" and nu_slow["reason"] == "timeout", nu_slow
    assert nu_slow["duration_seconds"] < 10
