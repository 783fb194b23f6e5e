"""Horizontal scale: three executor processes share one pool; thirty tasks each complete exactly
once, every executor takes part, and killing one mid-task loses nothing."""

from __future__ import annotations

from typing import Any

import pytest

from .support import (
    Stack,
    completions,
    executor_id,
    submit,
    task_record,
    wait_until,
    workflow_events,
)

pytestmark = pytest.mark.e2e


@pytest.mark.stack(
    executors=3,
    env={
        "PROVISIONING_EXECUTOR_ACK_WAIT_SECONDS": "3",
        "PROVISIONING_EXECUTOR_MAX_CONCURRENT_TASKS": "2",
    },
)
def test_three_executors_thirty_tasks_exactly_once(stack: Stack) -> None:
    services = {executor_id(stack, s): s for s in stack.executors}
    tasks: list[dict[str, Any]] = [
        {"id": f"sleep{i:02}", "action": "builtin.sleep", "args": {"seconds": 1}} for i in range(24)
    ]
    tasks += [
        {
            "id": f"server{i}",
            "action": "server.create",
            "args": {"infra": "wuji", "server": {"hostname": f"scale-{i}"}, "delay_seconds": 1},
        }
        for i in range(6)
    ]
    wf_id = submit(stack.http, tasks)

    def busy_victim() -> str | None:
        """An executor that has completed a task and is running another one."""
        view = stack.http.get(f"/workflows/{wf_id}")[1]
        finished = {t["executor_id"] for t in view["tasks"] if t["status"] == "completed"}
        running = {t["executor_id"] for t in view["tasks"] if t["status"] == "running"}
        return next(iter(sorted(finished & running)), None)

    victim_id = wait_until(busy_victim, 20, 0.05, what="an executor to be mid-task")
    services[victim_id].kill9()

    view = stack.http.wait_workflow(wf_id, timeout=60)
    assert view["status"] == "completed", view
    assert len(view["tasks"]) == 30
    assert all(t["status"] == "completed" and t["attempt"] == 1 for t in view["tasks"])
    # exactly once: one accepted completion per task, whatever was redelivered
    assert completions(workflow_events(stack, wf_id)) == {t["id"]: 1 for t in tasks}
    # every executor did some of the work (the victim before it died)
    assert {t["executor_id"] for t in view["tasks"]} == set(services)
    # what the victim had started and not finished was redelivered and finished elsewhere
    started_on: dict[str, set[str]] = {}
    for kind, data in workflow_events(stack, wf_id):
        if kind == "task" and data["status"] == "running":
            started_on.setdefault(data["task_id"], set()).add(data["executor_id"])
    interrupted = [
        t["id"]
        for t in view["tasks"]
        if victim_id in started_on.get(t["id"], ()) and t["executor_id"] != victim_id
    ]
    assert interrupted, started_on
    for task_id in interrupted:
        assert task_record(stack, wf_id, task_id).delivery >= 2, task_id
    outputs = [t["output"] for t in view["tasks"] if t["id"].startswith("server")]
    assert sorted(o["hostname"] for o in outputs) == [f"scale-{i}" for i in range(6)]
