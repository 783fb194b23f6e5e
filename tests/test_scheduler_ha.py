"""More than one scheduler: exactly one is active (a lease in JetStream KV); a standby takes over
within seconds when the active one dies, with no workflow lost or doubled."""

from __future__ import annotations

import signal
import time

import pytest

from .support import Service, Stack, logged_runs, wait_until

pytestmark = pytest.mark.e2e


def _active(schedulers: list[Service]) -> Service:
    return wait_until(
        lambda: next((s for s in schedulers if "scheduler running" in s.log()), None),
        30,
        what="an active scheduler",
    )


def _chain_and_fan(stack: Stack, width: int = 12) -> str:
    tasks = [{"id": "root", "action": "builtin.sleep", "args": {"seconds": 0.5}}]
    tasks += [
        {"id": f"f{i}", "action": "builtin.sleep", "args": {"seconds": 0.4}, "depends_on": ["root"]}
        for i in range(width)
    ]
    tasks += [
        {"id": "join", "action": "builtin.noop", "depends_on": [f"f{i}" for i in range(width)]}
    ]
    tasks += [
        {
            "id": f"c{i}",
            "action": "builtin.sleep",
            "args": {"seconds": 0.3},
            "depends_on": [f"c{i - 1}" if i else "join"],
        }
        for i in range(6)
    ]
    status, body = stack.http.post("/workflows", {"name": "ha", "tasks": tasks})
    assert status == 202
    return str(body["workflow_id"])


def test_standby_takes_over_after_kill9(stack: Stack) -> None:
    standby = Service("scheduler-2", ["scheduler"], stack.env, stack.log_dir).start()
    try:
        schedulers = [stack.scheduler, standby]
        active = _active(schedulers)
        other = standby if active is stack.scheduler else stack.scheduler
        wait_until(lambda: "standing by" in other.log(), 30, what="the standby")
        assert "scheduler running" not in other.log()

        wf_id = _chain_and_fan(stack)
        wait_until(
            lambda: stack.http.get(f"/workflows/{wf_id}")[1]["counts"].get("completed", 0) >= 3, 60
        )
        active.kill9()
        killed_at = time.monotonic()
        wait_until(lambda: "scheduler running" in other.log(), 30, what="the standby to take over")
        takeover_s = time.monotonic() - killed_at
        assert takeover_s < 15, takeover_s

        view = stack.http.wait_workflow(wf_id, timeout=90)
        assert view["status"] == "completed", view
        for task in view["tasks"]:
            assert task["status"] == "completed" and task["attempt"] == 1, task
            assert logged_runs(stack, wf_id, task["id"]) == [(1, "completed")], task["id"]
        print(f"standby took over {takeover_s:.1f}s after kill -9")
    finally:
        standby.stop()


def test_graceful_stop_hands_over_at_once(stack: Stack) -> None:
    standby = Service("scheduler-2", ["scheduler"], stack.env, stack.log_dir).start()
    try:
        active = _active([stack.scheduler, standby])
        other = standby if active is stack.scheduler else stack.scheduler
        wait_until(lambda: "standing by" in other.log(), 30)
        active.signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        assert active.proc is not None and active.proc.wait(30) == 0
        wait_until(lambda: "scheduler running" in other.log(), 15, what="the standby to take over")
        assert time.monotonic() - stopped_at < 8  # released, not expired
        assert "released the scheduler lease" in active.log()
        status, body = stack.http.post(
            "/workflows", {"name": "after", "tasks": [{"id": "a", "action": "builtin.noop"}]}
        )
        assert status == 202
        assert stack.http.wait_workflow(body["workflow_id"])["status"] == "completed"
    finally:
        standby.stop()
