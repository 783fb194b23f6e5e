"""Checkpoints: kill -9 the scheduler in the middle of a workflow, restart it, and the workflow
completes with no task lost and no completed task run again."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest

from .support import Stack, logged_runs, wait_until

pytestmark = pytest.mark.e2e


def statuses(stack: Stack, wf_id: str) -> dict[str, str]:
    status, view = stack.http.get(f"/workflows/{wf_id}")
    assert status == 200, view
    return {t["id"]: t["status"] for t in view["tasks"]}


@pytest.mark.slow
@pytest.mark.stack(executors=2)
def test_scheduler_killed_twice_mid_workflow_resumes_from_checkpoints(stack: Stack) -> None:
    width = 6
    tasks: list[dict[str, Any]] = [
        {  # a Nushell side effect: a second run would report the server as existing
            "id": "server",
            "action": "server.create",
            "args": {"infra": "k9", "server": {"hostname": "k9-1"}, "delay_seconds": 1.5},
        }
    ]
    for i in range(width):
        tasks += [
            {"id": f"a{i}", "action": "builtin.sleep", "args": {"seconds": 0.6}},
            {
                "id": f"b{i}",
                "action": "builtin.sleep",
                "args": {"seconds": 0.6},
                "depends_on": [f"a{i}"],
            },
            {
                "id": f"c{i}",
                "action": "builtin.sleep",
                "args": {"seconds": 0.3},
                "depends_on": [f"b{i}"],
            },
        ]
    tasks.append(
        {
            "id": "join",
            "action": "builtin.noop",
            "depends_on": ["server", *(f"c{i}" for i in range(width))],
        }
    )
    status, accepted = stack.http.post("/workflows", {"name": "crashy", "tasks": tasks})
    assert status == 202
    wf_id = accepted["workflow_id"]
    # and a task that keeps failing, waiting out its backoff while the scheduler is down
    status, accepted = stack.http.post(
        "/workflows",
        {
            "name": "flaky",
            "tasks": [
                {
                    "id": "flaky",
                    "action": "builtin.fail",
                    "retries": 2,
                    "backoff": {"initial_seconds": 1.2, "multiplier": 1},
                }
            ],
        },
    )
    assert status == 202
    flaky_id = accepted["workflow_id"]

    # first crash: some tasks done, others running, the rest waiting
    wait_until(lambda: "completed" in statuses(stack, wf_id).values(), what="a first task")
    stack.scheduler.kill9()
    crashed_at = statuses(stack, wf_id)  # the checkpoints as the crash left them
    assert set(crashed_at.values()) - {"completed"}, crashed_at
    time.sleep(1.0)  # executors keep going: their reports wait in JetStream
    stack.scheduler.start()

    # second crash, later in the workflow, restarted at once
    wait_until(
        lambda: sum(s == "completed" for s in statuses(stack, wf_id).values()) > width * 2,
        what="the second layer",
    )
    stack.scheduler.kill9()
    stack.scheduler.start()
    t0 = time.monotonic()
    view = stack.http.wait_workflow(wf_id, timeout=60)
    recovery_s = time.monotonic() - t0
    assert view["status"] == "completed", json.dumps(view, indent=2)

    for task in view["tasks"]:  # no task lost, none run twice
        assert task["status"] == "completed", task
        assert task["attempt"] == 1 and len(task["attempts"]) == 1, task
        assert logged_runs(stack, wf_id, task["id"]) == [(1, "completed")], task["id"]
    server = next(t for t in view["tasks"] if t["id"] == "server")
    assert server["output"]["existed"] is False

    flaky = stack.http.wait_workflow(flaky_id, timeout=30)["tasks"][0]
    assert flaky["status"] == "failed" and flaky["attempt"] == 3, flaky
    assert logged_runs(stack, flaky_id, "flaky", 3) == [(1, "failed"), (2, "failed"), (3, "failed")]
    starts = [datetime.fromisoformat(a["started_at"]) for a in flaky["attempts"]]
    ends = [datetime.fromisoformat(a["finished_at"]) for a in flaky["attempts"]]
    assert all((s - e).total_seconds() >= 1.2 for e, s in zip(ends, starts[1:], strict=False))

    scheduler_log = stack.scheduler.log()
    assert scheduler_log.count("scheduler running: 2 active workflows recovered") >= 1
    print(f"completed {recovery_s:.1f}s after the second restart")
