"""Scale: a 10,000-task workflow is accepted, validated and scheduled; the scheduler's memory does
not keep finished workflows. Figures are measured and printed (see docs/performance.md), never
asserted: a slow machine must not fail these tests."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .support import Stack, proc_status, stream_state, wait_until

pytestmark = pytest.mark.e2e

TASKS = 10_000
GROUPS = 100  # fan-out from one root into 100 groups of 99 tasks, fan-in per group and overall


def scale_definition() -> dict[str, Any]:
    tasks: list[dict[str, Any]] = [{"id": "root", "action": "builtin.noop"}]
    per_group = (TASKS - 2) // GROUPS - 1
    for g in range(GROUPS):
        members = [f"g{g}-t{i}" for i in range(per_group)]
        tasks += [{"id": m, "action": "builtin.noop", "depends_on": ["root"]} for m in members]
        tasks.append({"id": f"g{g}-join", "action": "builtin.noop", "depends_on": members})
    tasks.append(
        {"id": "end", "action": "builtin.noop", "depends_on": [f"g{g}-join" for g in range(GROUPS)]}
    )
    while len(tasks) < TASKS:  # top up with independent tasks
        tasks.insert(1, {"id": f"extra-{len(tasks)}", "action": "builtin.noop"})
    return {"name": "scale-10k", "tasks": tasks}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.stack(executors=2)
def test_ten_thousand_tasks(stack: Stack) -> None:
    definition = scale_definition()
    assert len(definition["tasks"]) == TASKS
    body = json.dumps(definition).encode()
    scheduler_pid = stack.scheduler.proc.pid  # type: ignore[union-attr]
    rss_before = proc_status(scheduler_pid)["VmRSS"]

    t0 = time.monotonic()
    status, accepted = stack.http.post("/workflows", raw=body, timeout=60)
    accept_s = time.monotonic() - t0
    assert status == 202, accepted
    assert accepted["tasks"] == TASKS
    wf_id = accepted["workflow_id"]

    def finished() -> dict[str, Any] | None:
        page = stack.http.get("/workflows?limit=10")[1]
        return next(
            (
                w
                for w in page["workflows"]
                if w["workflow_id"] == wf_id and w["status"] in ("completed", "failed")
            ),
            None,
        )

    summary = wait_until(finished, timeout=120, interval=0.5, what="10k tasks")
    wall_s = time.monotonic() - t0
    assert summary["status"] == "completed", summary
    peak_kb = proc_status(scheduler_pid)["VmHWM"]

    status, view = stack.http.get(f"/workflows/{wf_id}", timeout=60)
    assert status == 200
    assert view["counts"] == {"completed": TASKS}
    tasks = {t["id"]: t for t in view["tasks"]}
    created = datetime.fromisoformat(view["created_at"])
    first_queued = min(datetime.fromisoformat(t["queued_at"]) for t in tasks.values())
    last_finished = max(datetime.fromisoformat(t["finished_at"]) for t in tasks.values())
    for task in tasks.values():  # the DAG was respected at this size too
        assert task["attempt"] == 1
        for dep in task["depends_on"]:
            assert task["started_at"] >= tasks[dep]["finished_at"], (task["id"], dep)
    figures = {
        "tasks": TASKS,
        "body_bytes": len(body),
        "accept_s": round(accept_s, 3),
        "first_dispatch_s": round((first_queued - created).total_seconds(), 3),
        "completion_s": round((last_finished - created).total_seconds(), 3),
        "wall_s": round(wall_s, 3),
        "scheduler_rss_before_mb": round(rss_before / 1024, 1),
        "scheduler_peak_rss_mb": round(peak_kb / 1024, 1),
        "scheduler_cpu_s": round(cpu_seconds(scheduler_pid), 2),
        "nats_cpu_s": round(cpu_seconds(stack.nats.proc.pid), 2),  # type: ignore[union-attr]
        "executors_cpu_s": round(sum(cpu_seconds(e.proc.pid) for e in stack.executors), 2),  # type: ignore[union-attr]
    }
    print("\nscale-10k " + json.dumps(figures))


ACTIVE_RE = re.compile(r"workflow (\w+) (\w+): \d+ tasks in [\d.]+s; (\d+) workflows active")


@pytest.mark.stack(executors=1)
def test_finished_workflows_leave_the_schedulers_memory(stack: Stack) -> None:
    """After N finished workflows nothing of them is kept: the active set is empty again and the
    resident memory does not grow with N."""
    scheduler_pid = stack.scheduler.proc.pid  # type: ignore[union-attr]
    definition = {
        "name": "short",
        "tasks": [
            {"id": "a", "action": "builtin.noop"},
            {"id": "b", "action": "builtin.noop", "depends_on": ["a"]},
            {"id": "c", "action": "builtin.fail", "depends_on": ["a"]},
        ],
    }
    rss: list[int] = []
    for _ in range(3):
        for _ in range(100):
            assert stack.http.post("/workflows", definition)[0] == 202
        wait_until(
            lambda: (
                stream_state(stack.nats.url, "PROV_COMMANDS")["messages"] == 0
                and not stack.http.get("/workflows?status=queued,running&limit=1")[1]["workflows"]
            ),
            timeout=60,
            interval=0.3,
            what="every workflow to end",
        )
        wait_until(
            lambda: (m := ACTIVE_RE.findall(stack.scheduler.log())) and m[-1][2] == "0",
            timeout=10,
            what="the scheduler to log an empty active set",
        )
        rss.append(proc_status(scheduler_pid)["VmRSS"])
    ended = ACTIVE_RE.findall(stack.scheduler.log())
    assert len(ended) == 300 and {status for _, status, _ in ended} == {"failed"}
    assert len({wf_id for wf_id, _, _ in ended}) == 300  # each ended (and was evicted) once
    print(f"\nscheduler RSS after 100, 200, 300 finished workflows: {[r // 1024 for r in rss]} MB")
    # memory does not follow the number of finished workflows (generous: allocator noise)
    assert rss[2] - rss[1] < 8 * 1024, rss
